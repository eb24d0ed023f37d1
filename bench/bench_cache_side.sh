#!/usr/bin/env bash
# bench_cache_side.sh: Redis-backed cache hits of several lightmoed builds or
# settings side by side (docs/PERF.md, cache, "Sixth run").
#
#   bench/bench_cache_side.sh MODEL_DIR C N RUNS NAME:BUILD_DIR:LIGHTMOED_ARGS...
#
# One fresh redis-server; each daemon (cache_url = redis://, its extra
# options, e.g. "--rpc-threads 1") is started and primed with
# bench_cache_rpc (the greedy request bench_cache.sh uses, stored at once);
# then h2load -c C -m 1 -n N runs alternate between the daemons RUNS times,
# so that every configuration sees the same machine. Each line: req/s,
# requests that succeeded, the rise of lightmoe_cache_hits_total, the
# server's CPU per request (/proc/PID/stat) and the load average. Exits 1
# when a request failed or was not a hit.
set -euo pipefail
model=${1:?model dir}
c=${2:?connections}
n=${3:?requests per run}
runs=${4:?runs}
shift 4
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.5; rm -rf "$tmp"' EXIT
free_port() {
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --dir "$tmp" --save "" --appendonly no \
    >"$tmp/redis.log" 2>&1 &
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
python3 -c '
import struct, sys
p = b"What is the capital of France?"
m = b"\x0a" + bytes([len(p)]) + p + b"\x18\x10" + b"\x25\0\0\0\0"
sys.stdout.buffer.write(b"\0" + struct.pack(">I", len(m)) + m)' >"$tmp/req.bin"
names=() addrs=() maddrs=() pids=()
for spec in "$@"; do
    IFS=: read -r name build args <<<"$spec"
    port=$(free_port)
    mport=$(free_port)
    # shellcheck disable=SC2086
    "$build/daemon/lightmoed" --model "$model" --listen "127.0.0.1:$port" \
        --metrics-listen "127.0.0.1:$mport" --config /dev/null \
        --cache-url "redis://127.0.0.1:$rport/0" --log-level warn $args 2>"$tmp/$name.log" &
    pids+=($!) names+=("$name") addrs+=("127.0.0.1:$port") maddrs+=("127.0.0.1:$mport")
    for _ in $(seq 300); do
        "$build/bench/bench_cache_rpc" --target "127.0.0.1:$port" --clients 1 --seconds 0.05 \
            --prompt "What is the capital of France?" >/dev/null 2>&1 && break
        sleep 0.2
    done
done
hits() {
    python3 -c 'import sys, urllib.request as u
for l in u.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode().splitlines():
    if l.startswith("lightmoe_cache_hits_total "): print(l.split()[1])' "$1"
}
echo "== $(nproc) cores, $(date -u '+%F %T UTC')," \
    "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== h2load -c $c -m 1 -n $n, $runs runs per daemon, alternating"
for r in $(seq "$runs"); do
    for i in "${!names[@]}"; do
        h0=$(hits "${maddrs[$i]}")
        t0=$(awk '{print $14 + $15}' "/proc/${pids[$i]}/stat")
        out=$(h2load -c "$c" -m 1 -n "$n" -d "$tmp/req.bin" -H 'content-type: application/grpc' \
            -H 'te: trailers' "http://${addrs[$i]}/lightmoe.v1.LightMoE/Complete")
        t1=$(awk '{print $14 + $15}' "/proc/${pids[$i]}/stat")
        h1=$(hits "${maddrs[$i]}")
        rps=$(sed -n 's/^finished in .*s, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
        ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
        echo "${names[$i]} run $r: $(printf '%.0f' "$rps") req/s, $ok ok, hits +$((h1 - h0))," \
            "server CPU $(awk -v t=$((t1 - t0)) -v n="$n" -v hz="$(getconf CLK_TCK)" \
                'BEGIN {printf "%.1f", t / hz / n * 1e6}') us/request," \
            "load $(cut -d' ' -f1 /proc/loadavg)"
        if [ "$ok" != "$n" ] || [ $((h1 - h0)) != "$n" ]; then
            echo "${names[$i]}: not every request succeeded as a hit" >&2
            exit 1
        fi
    done
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
