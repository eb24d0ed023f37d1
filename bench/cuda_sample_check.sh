#!/usr/bin/env bash
# cuda_sample_check.sh: the GPU run that sampling on the GPU (engine/cuda_sample.cu,
# LIGHTMOE_CUDA_SAMPLE=1) still needs before it may be on by default
# (docs/PERF.md, round 21). On the lent GPU machine, from a checkout holding
# (git-ignored) a bundle of programs built on the dev machine and the fixtures:
#   cmake -S . -B build-gpu -DCMAKE_CUDA_ARCHITECTURES=90a-real && cmake --build build-gpu -j2
#   ../shared/tools/device-bundle /tmp/bund build-gpu/tools/lightmoe \
#       build-gpu/tests/cuda/test_cuda_kernels build-gpu/bench/bench_cuda
#   rm -f /tmp/bund/lib/libnvJitLink*; (cd /tmp/bund && tar cf - . | xz -T8 -6 > BUNDLE.txz)
#   .fixtures/<name>: copies of ../shared/fixtures/<name>
# Usage: bench/cuda_sample_check.sh BUNDLE.txz   (logs under $OUT, a summary on stdout)
set -u
BUNDLE=${1:?usage: cuda_sample_check.sh BUNDLE.txz}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=/tmp/b; rm -rf $B; mkdir -p $B; xz -dc "$BUNDLE" | tar xf - -C $B
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv,noheader; date -u
# 1. the kernel against its CPU twin (tokens, top ids, rows bit for bit), and through cu_forward
timeout 120 $B/run test_cuda_kernels sample > $OUT/t_sample.txt 2>&1; echo "sample rc=$?"
grep -E "^(ok|FAIL)" $OUT/t_sample.txt | cut -c1-160
timeout 90 $B/run test_cuda_kernels forward > $OUT/t_fwd.txt 2>&1
echo "forward rc=$? $(grep -c '^ok' $OUT/t_fwd.txt) ok $(grep -c FAIL $OUT/t_fwd.txt) FAIL"
# 2. sanitizers on the small rows
for tool in memcheck racecheck; do
  timeout 200 compute-sanitizer --tool $tool --error-exitcode 9 $B/bin/test_cuda_kernels samplek \
      > $OUT/${tool}_sample.txt 2>&1
  echo "$tool samplek rc=$? $(tail -1 $OUT/${tool}_sample.txt)"
done
# 3. end to end: the same seeded generations with picks on the host and on the GPU
#    (fixed-order sums, so that both runs see the same logits)
for f in .fixtures/*; do for S in 1 2 3; do
  for D in 0 1; do
    LIGHTMOE_CUDA_FOLD=0 LIGHTMOE_CUDA_MERGE_O=0 LIGHTMOE_CUDA_SAMPLE=$D timeout 60 $B/run lightmoe \
        generate --model $f --device cuda --prompt "The quick brown fox jumps over" \
        --max-tokens 48 --ignore-eos --temperature 0.9 --top-p 0.95 --top-k 30 \
        --repetition-penalty 1.15 --presence-penalty 0.3 --seed $S --ids --logprobs 2 \
        > $OUT/g_$(basename $f)_${S}_$D.out 2> $OUT/g_$(basename $f)_${S}_$D.err
  done
  a=$(grep "^ids:" $OUT/g_$(basename $f)_${S}_0.err); b=$(grep "^ids:" $OUT/g_$(basename $f)_${S}_1.err)
  echo "generate $(basename $f) seed $S: host / GPU picks $([ -n "$a" ] && [ "$a" = "$b" ] && echo SAME || echo DIFFER)"
done; done
# 4. speed: cu_sample against logits down + sample_pick; whole decode steps with their picks
timeout 150 $B/run bench_cuda sample > $OUT/b_sample.txt 2>&1; echo "bench sample rc=$?"
grep -E "^sample|^ceil" $OUT/b_sample.txt | cut -c1-170
for b in 1 32 128; do
  timeout 150 $B/run bench_cuda decode --model qwen3 --batch $b --pick 2>&1 | grep -E "^decode" | cut -c1-170
done
