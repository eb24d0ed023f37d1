#!/usr/bin/env bash
# quant_cli.sh: `lightmoe quantize` / `lightmoe perplexity` from the command
# line: clear errors for bad inputs, and on the trained fixture (calibrated
# on numpy's docstrings via tools/make-calib.py) GPTQ beats RTN in every
# layer's held-out reconstruction error and in final-logit KL to bf16.
#
#   quant_cli.sh LIGHTMOE FIXTURES WORK_DIR SOURCE_DIR [EVAL_ROWS]
# (EVAL_ROWS: rows of eval.safetensors for the KL comparison, 4; 0 skips
# the GPTQ-vs-RTN part: sanitizer builds, where an -O0 forward is slow)
set -euo pipefail
lm=$1; fix=$2; work=$3; srcdir=$4; rows=${5:-4}
tm=$fix/trained-moe
rm -rf "$work"; mkdir -p "$work"

fail() { echo "FAIL: $*"; exit 1; }
expect_fail() { # regex, command...
  local re=$1 out; shift
  if out=$("$@" 2>&1); then fail "succeeded: $*"; fi
  grep -q -- "$re" <<<"$out" || fail "'$re' not in the output of $*: $out"
  echo "ok: $re"
}

echo "hello world" > "$work/short.txt"
mkdir -p "$work/llama"
echo '{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "vocab_size": 64,
  "num_attention_heads": 2, "intermediate_size": 64}' > "$work/llama/config.json"
expect_fail "already quantized" "$lm" quantize --model "$fix/qwen2moe-tiny-gptq" --out "$work/x" --method rtn
expect_fail "does not divide" "$lm" quantize --model "$fix/qwen2moe-tiny" --out "$work/x" --method rtn --group 64
expect_fail "multiple of 32" "$lm" quantize --model "$tm" --out "$work/x" --method rtn --group 48
expect_fail "llama" "$lm" quantize --model "$work/llama" --out "$work/x" --method rtn
expect_fail "needs calibration" "$lm" quantize --model "$tm" --out "$work/x"
expect_fail "calibration text too short" "$lm" quantize --model "$tm" --out "$work/x" --calib "$work/short.txt" --group 64
expect_fail "act-order applies to GPTQ" "$lm" quantize --model "$tm" --out "$work/x" --method rtn --act-order
expect_fail "bad value for --device" "$lm" quantize --model "$tm" --out "$work/x" --method rtn --device gpu
expect_fail "input_ids" "$lm" perplexity --model "$tm" --eval "$tm/reference.safetensors"
expect_fail "int4" "$lm" perplexity --model "$tm" --eval "$tm/eval.safetensors" --quantize int8

[ "$rows" -gt 0 ] || exit 0

python3 "$srcdir/tools/make-calib.py" --out "$work/calib.txt" --max-mb 1 \
  /usr/lib/python3/dist-packages/numpy
"$lm" quantize --quiet --model "$tm" --out "$work/rtn" --method rtn --group 64 --asym > "$work/rtn.log"
"$lm" quantize --quiet --model "$tm" --out "$work/gptq" --group 64 --asym --calib "$work/calib.txt" \
  --nsamples 64 --seqlen 128 --heldout 8 > "$work/gptq.log"
cat "$work/gptq.log"
n=$(grep -c "^layer" "$work/gptq.log")
[ "$n" = 6 ] || fail "expected 6 layer reports, got $n"
# "(RTN e, r x)": r = RTN error / GPTQ error must exceed 1 in every layer
awk '/^layer/ { r = $0; sub(/.*RTN [^,]*, /, "", r); sub(/x\).*/, "", r);
                if (r + 0 <= 1.0) { print "FAIL: " $0; bad = 1 } }
     END { exit bad }' "$work/gptq.log"
for m in rtn gptq; do
  "$lm" perplexity --model "$work/$m" --eval "$tm/eval.safetensors" --rows "$rows" --baseline "$tm" \
    > "$work/$m.ppl" 2>/dev/null
  cat "$work/$m.ppl"
done
kl_rtn=$(awk '/^KL/ {print $4}' "$work/rtn.ppl")
kl_gptq=$(awk '/^KL/ {print $4}' "$work/gptq.ppl")
awk -v a="$kl_gptq" -v b="$kl_rtn" 'BEGIN { exit !(a < b) }' || fail "KL: GPTQ $kl_gptq not below RTN $kl_rtn"
echo "ok: KL(bf16 || GPTQ) $kl_gptq < KL(bf16 || RTN) $kl_rtn"
