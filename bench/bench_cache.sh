#!/usr/bin/env bash
# bench_cache.sh: the exact-answer cache benchmark of docs/PERF.md.
#
#   bench/bench_cache.sh BUILD_DIR MODEL_DIR [SECONDS] [REPEATS]
#
# 1. redis-benchmark -t get (1, 16, 64 clients) against a fresh redis-server:
#    the ceiling of any Redis-backed lookup on this machine (one thread, one
#    event loop, N connections);
# 2. lightmoed (default settings: rpc_threads = one per core) with
#    cache_url = memory, then = redis://: bench_cache_rpc with 1, 16 and 64
#    clients sending one greedy Complete request that is a hit after the
#    first call (the tool fails if any answer is not cached), driven like
#    redis-benchmark (--mode loop: one thread, N channels); then 16 clients
#    once more with --mode threads (a thread per client: the first version
#    of the tool, kept for comparison with older rows of docs/PERF.md).
# Each line says its mode, the client's CPU per call and the load average.
# Every lightmoed configuration runs REPEATS times (default 3, interleaved):
# on a shared machine single runs of the same configuration differ by 2x,
# so compare medians.
set -euo pipefail
build=${1:?build dir}
model=${2:?model dir}
secs=${3:-5}
reps=${4:-3}
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.5; rm -rf "$tmp"' EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== date: $(date -u '+%F %T UTC'), commit $(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --dir "$tmp" --save "" --appendonly no \
    >"$tmp/redis.log" 2>&1 &
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "== redis-benchmark -t get -n 100000 -d 3 (ceiling)"
for _ in $(seq "$reps"); do
    for c in 1 16 64; do
        echo "clients $c: $(redis-benchmark -p "$rport" -t get -n 100000 -c "$c" --csv | tail -1)" \
            " load $(cut -d' ' -f1 /proc/loadavg)"
    done
done

run_daemon() { # $1 = cache url; sets addr and dpid
    local port
    port=$(free_port)
    addr=127.0.0.1:$port
    "$build/daemon/lightmoed" --model "$model" --listen "$addr" --metrics-listen "" \
        --config /dev/null --cache-url "$1" --log-level warn 2>"$tmp/lightmoed.log" &
    dpid=$!
    # Ready when a request is answered (the tool's priming call) and then cached.
    for _ in $(seq 300); do
        "$build/bench/bench_cache_rpc" --target "$addr" --clients 1 --seconds 0.05 \
            --prompt "What is the capital of France?" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "lightmoed did not become ready:" >&2; cat "$tmp/lightmoed.log" >&2; exit 1
}
for url in memory "redis://127.0.0.1:$rport/0"; do
    run_daemon "$url"
    echo "== lightmoed cache_url=$url at $addr: cache hits through gRPC (Complete)"
    for _ in $(seq "$reps"); do
        for run in "loop 1" "loop 16" "loop 64" "threads 16"; do
            set -- $run
            echo "$("$build/bench/bench_cache_rpc" --target "$addr" --clients "$2" \
                --seconds "$secs" --mode "$1" --prompt "What is the capital of France?")" \
                " load $(cut -d' ' -f1 /proc/loadavg)"
        done
    done
    kill "$dpid"; wait "$dpid" 2>/dev/null || true
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
