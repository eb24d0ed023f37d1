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
#    of the tool, kept for comparison with older rows of docs/PERF.md);
# 3. the same daemons driven by h2load (nghttp2's HTTP/2 load generator, C,
#    one thread, N connections with one request in flight each: -c N -m 1,
#    redis-benchmark's shape) sending the same request as raw gRPC frames,
#    with 1, 16 and 64 connections. h2load does not read grpc-status, so
#    each run checks through lightmoed's /metrics that
#    lightmoe_cache_hits_total rose by exactly the number of requests h2load
#    completed (and that every one completed): the bench fails otherwise.
#    Latency percentiles come from h2load's per-request --log-file; the
#    server's CPU per request from /proc/PID/stat.
# Each line says its mode, the client's CPU per call (bench_cache_rpc) or
# the server's (h2load) and the load average. H2LOAD_N (default 100000)
# sets the requests of one h2load run (a third of it with 1 connection);
# without h2load on PATH part 3 is skipped, and says so. LIGHTMOED_ARGS adds
# lightmoed options (e.g. "--rpc-threads 1"); BENCH_RPC=0 skips part 2;
# BENCH_STORES=redis (or memory) runs one of the two daemons only.
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
# shellcheck source=bench/cache_common.sh
. "$(dirname "$0")/cache_common.sh"

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== date: $(date -u '+%F %T UTC'), commit $(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start_redis
echo "== redis-benchmark -t get -n 100000 -d 3 (ceiling)"
for _ in $(seq "$reps"); do
    for c in 1 16 64; do
        echo "clients $c: $(redis-benchmark -p "$rport" -t get -n 100000 -c "$c" --csv | tail -1)" \
            " load $(cut -d' ' -f1 /proc/loadavg)"
    done
done

write_request "$tmp/req.bin"
h2load_run() { # $1 = connections; one line, or exit 1 when a request was not a hit
    local c=$1 n=${H2LOAD_N:-100000} h0 h1 t0 t1 out ok rps
    [ "$c" = 1 ] && n=$((n / 3))
    rm -f "$tmp/h2.log" # h2load appends to it
    h0=$(hits "$maddr")
    f0=$(followers "$maddr")
    t0=$(cpu_ticks "$dpid")
    out=$(h2load -c "$c" -m 1 -n "$n" -d "$tmp/req.bin" -H 'content-type: application/grpc' \
        -H 'te: trailers' --log-file "$tmp/h2.log" "http://$addr/lightmoe.v1.LightMoE/Complete")
    t1=$(cpu_ticks "$dpid")
    h1=$(hits "$maddr")
    f1=$(followers "$maddr")
    ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
    rps=$(sed -n 's/^finished in .*s, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
    if [ "$ok" != "$n" ] || [ $((h1 - h0)) != "$n" ]; then
        echo "h2load clients $c: $ok of $n requests succeeded, cache hits rose by $((h1 - h0)):" \
            "not every request was a hit" >&2
        echo "$out" >&2
        exit 1
    fi
    echo "h2load clients $c: $(printf '%.0f' "$rps") req/s, $n requests, all hits;" \
        "latency ms $(cut -f3 "$tmp/h2.log" | sort -n | awk '{v[NR] = $1}
            END {printf "p50 %.3f p90 %.3f p99 %.3f p99.9 %.3f",
                 v[int(NR * .5)] / 1e3, v[int(NR * .9)] / 1e3, v[int(NR * .99)] / 1e3,
                 v[int(NR * .999)] / 1e3}');" \
        "server CPU $(us_per_request $((t1 - t0)) "$n") us/request;" \
        "followers $(awk -v f=$((f1 - f0)) -v n="$n" 'BEGIN {printf "%.0f%%", 100 * f / n}')" \
        " load $(cut -d' ' -f1 /proc/loadavg)"
}

for url in memory "redis://127.0.0.1:$rport/0"; do
    case "${BENCH_STORES:-memory redis}" in *"${url%%:*}"*) ;; *) continue ;; esac
    # shellcheck disable=SC2086
    start_daemon "$build" "$model" "$url" "$tmp/lightmoed.log" ${LIGHTMOED_ARGS:-}
    echo "== lightmoed cache_url=$url at $addr ${LIGHTMOED_ARGS:-}: cache hits through gRPC" \
        "(Complete)"
    for _ in $(seq "$reps"); do
        [ "${BENCH_RPC:-1}" = 0 ] && break
        for run in "loop 1" "loop 16" "loop 64" "threads 16"; do
            # shellcheck disable=SC2086 # "mode clients": two words
            set -- $run
            echo "$("$build/bench/bench_cache_rpc" --target "$addr" --clients "$2" \
                --seconds "$secs" --mode "$1" --prompt "$CACHE_PROMPT")" \
                " load $(cut -d' ' -f1 /proc/loadavg)"
        done
    done
    if command -v h2load >/dev/null; then
        echo "== lightmoed cache_url=$url: cache hits through gRPC, h2load -m 1 (raw frames)"
        for _ in $(seq "$reps"); do
            for c in 1 16 64; do
                h2load_run "$c"
            done
        done
    else
        echo "== h2load not found (Debian: nghttp2-client): h2load runs skipped"
    fi
    kill "$dpid"; wait "$dpid" 2>/dev/null || true
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
