#!/usr/bin/env bash
# cuda_device_run.sh: what the CUDA numbers in docs/PERF.md were made with,
# on the lent H100, from a checkout holding (git-ignored):
#   .devbundle/libs.txz  .devbundle/bins.tgz   programs built on the dev machine:
#       cmake -S . -B build-gpu -DCMAKE_CUDA_ARCHITECTURES=90a && cmake --build build-gpu -j2
#       ../shared/tools/device-bundle /tmp/bund build-gpu/tools/lightmoe \
#           build-gpu/tests/cuda/test_cuda_kernels build-gpu/bench/bench_cuda
#       (cd /tmp/bund && tar cJf libs.txz lib run && tar czf bins.tgz bin) ; cp bench/peer_transformers.py /tmp/bund/bin
#   (to fit the 64 MiB carry with fixtures: -DCMAKE_CUDA_ARCHITECTURES=90a-real keeps SASS only,
#    which xz compresses about 6x, and lib/libnvJitLink* can go: the GPU machine has its own)
#   .fixtures/<name>                           copies of ../shared/fixtures/<name>
# Writes logs under $OUT (the device tool's output folder) and prints a summary.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=/tmp/b; mkdir -p $B; tar xJf .devbundle/libs.txz -C $B; tar xzf .devbundle/bins.tgz -C $B
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,clocks.max.sm,driver_version --format=csv,noheader; date -u
# 1. every kernel against its CPU twin, the forward pass (batched == alone, paths agree, graph replay)
timeout 120 $B/bin/test_cuda_kernels all > $OUT/tests.txt 2>&1; echo "tests rc=$?"
# 2. verify on the fixtures: default, portable, each INT4 kernel forced, graphs off
for f in .fixtures/*; do
  timeout 90 $B/bin/lightmoe verify --model $f --device cuda --row-tol 1e-2 --batch
  timeout 90 $B/bin/lightmoe verify --model $f --device cuda --row-tol 1e-2 --portable --quiet
  for p in gemv mma; do LIGHTMOE_CUDA_PATH=$p timeout 90 $B/bin/lightmoe verify --model $f --device cuda --row-tol 1e-2 --quiet; done
  LIGHTMOE_CUDA_GRAPHS=0 timeout 90 $B/bin/lightmoe verify --model $f --device cuda --row-tol 1e-2 --quiet
done 2>&1 | grep -E "^verify|FAIL|row "
# 3. ceilings, kernels vs cuBLAS, decode and prefill of qwen3-30b-a3b and qwen1.5-moe-a2.7b shapes
timeout 300 $B/bin/bench_cuda > $OUT/bench.txt 2>&1; echo "bench rc=$?"
# 4. sanitizers on the test suite
for t in norm moe attn int4 forward; do
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 $B/bin/test_cuda_kernels $t > $OUT/memcheck_$t.txt 2>&1
  echo "memcheck $t rc=$? $(tail -1 $OUT/memcheck_$t.txt)"
done
timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 $B/bin/test_cuda_kernels attn > $OUT/racecheck_attn.txt 2>&1
echo "racecheck attn rc=$? $(tail -1 $OUT/racecheck_attn.txt)"
# 5. a synthesized GPTQ checkpoint through model_load + backend_cuda (8 of 48 layers), and the peer
timeout 200 $B/bin/lightmoe synth --arch qwen3_moe --preset qwen3-30b-a3b --gptq --layers 8 /tmp/q3
timeout 200 $B/bin/bench_cuda decode prefill --model qwen3 --dir /tmp/q3 | grep -v breakdown
PYTHONUNBUFFERED=1 timeout 200 python3 $B/bin/peer_transformers.py qwen15
PYTHONUNBUFFERED=1 timeout 200 python3 $B/bin/peer_transformers.py qwen3 --layers 12
