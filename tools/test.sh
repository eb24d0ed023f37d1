#!/usr/bin/env bash
# test.sh: build lightmoe and run every test, twice: a release build (with
# the CUDA backend compiled when nvcc is present; GPU tests skip without a
# GPU and say so) and an AddressSanitizer + UndefinedBehaviorSanitizer
# build of the CPU code. Exits non-zero if anything fails.
#
#   tools/test.sh            both builds
#   tools/test.sh --fast     release build only
#   LIGHTMOE_TEST_JOBS=N     parallel ctest jobs (default: cores)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${LIGHTMOE_TEST_JOBS:-$(nproc)}
fast=0
[ "${1:-}" = "--fast" ] && fast=1
# --package (or CI=true): also build the .deb, install it with dpkg, run it,
# remove and purge it (needs root; changes the system).

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

echo "== release build (build/)"
# CUDA code is compiled (never run: CI has no GPU) for sm_90a only, as CI
# requires; release packages build the fat binary (sm_80;86;89;90a), which
# takes four times as long. LIGHTMOE_CUDA_ARCHS overrides.
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CUDA_ARCHITECTURES="${LIGHTMOE_CUDA_ARCHS:-90a}" >/dev/null
cmake --build build -j"$(nproc)"
if [ "${CI:-}" = true ] || [ "${1:-}" = --package ]; then
  echo "== package: build, lintian, install, check-config, remove, purge"
  tools/test-package.sh build
fi
(cd build && ctest --output-on-failure -j"$jobs")

if [ $fast = 0 ]; then
  echo "== AddressSanitizer + UndefinedBehaviorSanitizer build (build-asan/)"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DLIGHTMOE_SANITIZE=ON \
        -DLIGHTMOE_CUDA=OFF >/dev/null
  cmake --build build-asan -j"$(nproc)"
  (cd build-asan && ctest --output-on-failure -j"$jobs" -LE no_asan)
fi
