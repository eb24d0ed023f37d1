#!/usr/bin/env bash
# quickstart.sh: on a fresh Debian 12 machine, install what lightmoe needs,
# build it, synthesize the small default model (random weights, a byte-level
# tokenizer and a ChatML template) and run the daemon on it in the
# foreground, with the embedded in-process answer cache.
#
#   sudo tools/quickstart.sh
#   LIGHTMOE_MODEL=/path/to/hf/checkpoint sudo -E tools/quickstart.sh
#
# Then, from another terminal:
#   build/tools/lightmoe complete --server 127.0.0.1:50051 --prompt "Hello"
#   curl -s 127.0.0.1:9464/metrics
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
model=${LIGHTMOE_MODEL:-$PWD/build/models/tiny}
if [ ! -f "$model/config.json" ]; then
  echo "quickstart: synthesizing the default model into $model"
  build/tools/lightmoe synth --arch qwen2_moe --preset tiny "$model"
fi
echo "quickstart: serving $model on 127.0.0.1:50051 (metrics on 127.0.0.1:9464)"
exec build/daemon/lightmoed --model "$model" --listen 127.0.0.1:50051 \
     --metrics-listen 127.0.0.1:9464 --cache-url memory "$@"
