#!/usr/bin/env bash
# quality.sh: the measurements of docs/QUALITY.md, re-runnable.
#
#   tools/quality.sh BUILD_DIR FIXTURES WORK_DIR [DEVICE]
#
# Builds the calibration text (tools/make-calib.py: docstrings of the Python
# packages on this machine, never eval.safetensors), quantizes trained-moe
# with every setting of the table, and measures each one with
# `lightmoe perplexity --baseline` against the bf16 model. Prints one
# markdown row per setting; logs of every command go to WORK_DIR/logs/. A
# command whose log is already complete is not run again (delete the log
# to redo it).
set -euo pipefail
build=${1:?build dir}; fix=${2:?fixtures}; work=${3:?work dir}; dev=${4:-cpu}
lm=$build/tools/lightmoe
src=$fix/trained-moe
ev=$src/eval.safetensors
mkdir -p "$work/logs"
calib=$work/calib.txt
[ -s "$calib" ] || python3 "$(dirname "$0")/make-calib.py" --out "$calib" --max-mb 8
# tensor bytes of the bf16 source (all tensors) and of its quantizable Linears
bf16_all=$(python3 - "$src" <<'EOF'
import json, struct, sys, glob
tot = 0
for f in glob.glob(sys.argv[1] + "/model*.safetensors"):
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        h = json.loads(fh.read(n))
    tot += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")
print(tot)
EOF
)

# run LOG CMD...: run CMD > LOG unless LOG already holds a finished run
run() {
  local log=$1; shift
  if [ -s "$log" ] && grep -q -E '^(perplexity|quantized linears)' "$log"; then return; fi
  "$@" > "$log" 2>&1
}

row() { # name, perplexity log, quantize log (or -)
  local name=$1 plog=$2 qlog=$3
  local ppl ratio kl top1 loaded fileb linb lin16
  ppl=$(awk '/^perplexity/ {print $2}' "$plog")
  ratio=$(awk '/^baseline/ {print $NF}' "$plog")
  kl=$(awk '/^KL/ {print $4}' "$plog")
  top1=$(awk '/^KL/ {print $(NF)}' "$plog")
  loaded=$(awk '/^weight bytes as loaded/ {print $NF}' "$plog")
  if [ "$qlog" != - ]; then
    fileb=$(awk '/^wrote/ {print $5}' "$qlog")
    linb=$(awk '/^quantized linears/ {print $4}' "$qlog")
    lin16=$(awk '/^quantized linears/ {gsub(/[^0-9]/,"",$9); print $9}' "$qlog")
    printf '| %s | %s | %s | %s | %s | %s (%.1f%%) | %s (%.1f%%) | %.1f%% |\n' "$name" "$ppl" \
      "$ratio" "$kl" "$top1" "$fileb" "$(echo "100*(1-$fileb/$bf16_all)" | bc -l)" \
      "$loaded" "$(echo "100*(1-$loaded/$bf16_loaded)" | bc -l)" \
      "$(echo "100*(1-$linb/$lin16)" | bc -l)"
  else
    printf '| %s | %s | %s | %s | %s | - | %s (%.1f%%) | - |\n' "$name" "$ppl" "$ratio" "$kl" \
      "$top1" "$loaded" "$(echo "100*(1-$loaded/$bf16_loaded)" | bc -l)"
  fi
}

run "$work/logs/bf16.ppl" \
  "$lm" perplexity --device "$dev" --model "$src" --eval "$ev" --baseline "$src"
bf16_loaded=$(awk '/^weight bytes as loaded/ {print $NF}' "$work/logs/bf16.ppl")
echo "| setting | perplexity | ratio to bf16 | KL(bf16‖q) | top-1 agr. | file tensor bytes (vs bf16) | bytes as loaded (vs bf16) | quantized Linears vs bf16 |"
echo "|---|---|---|---|---|---|---|---|"
row "bf16" "$work/logs/bf16.ppl" -
for g in 64 32; do
  for sym in sym asym; do
    for m in rtn gptq gptq-act; do
      name="g$g-$sym-$m"
      out=$work/$name
      args=(--group "$g" "--$sym" --quiet)
      case $m in
        rtn) args+=(--method rtn) ;;
        gptq) args+=(--method gptq --calib "$calib" --nsamples 128 --seqlen 256) ;;
        gptq-act) args+=(--method gptq --act-order --calib "$calib" --nsamples 128 --seqlen 256) ;;
      esac
      run "$work/logs/$name.quant" "$lm" quantize --model "$src" --out "$out" "${args[@]}"
      run "$work/logs/$name.ppl" \
        "$lm" perplexity --device "$dev" --model "$out" --eval "$ev" --baseline "$src"
      row "$name" "$work/logs/$name.ppl" "$work/logs/$name.quant"
    done
  done
  run "$work/logs/load-int4-g$g.ppl" "$lm" perplexity --device "$dev" --model "$src" \
    --quantize int4 --group "$g" --eval "$ev" --baseline "$src"
  row "load-time --quantize int4 g$g (RTN asym)" "$work/logs/load-int4-g$g.ppl" -
done
