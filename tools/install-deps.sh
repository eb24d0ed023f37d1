#!/usr/bin/env bash
# install-deps.sh: install every Debian 12 package lightmoe needs to build,
# test and package itself. Idempotent; needs root (or sudo).
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
PKGS=(
  build-essential cmake pkg-config git
  libgrpc-dev protobuf-c-compiler libprotobuf-c-dev protobuf-compiler
  libhiredis-dev redis-server redis-tools libssl-dev
  libsystemd-dev systemd
  libjansson-dev libpcre2-dev libutf8proc-dev libmicrohttpd-dev
  libopenblas-dev liblapacke-dev
  python3 python3-grpcio python3-protobuf python3-numpy
  openssl dpkg-dev fakeroot lintian rpm file
  nghttp2-client  # h2load, for bench/bench_cache.sh
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
