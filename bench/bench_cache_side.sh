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
# shellcheck source=bench/cache_common.sh
. "$(dirname "$0")/cache_common.sh"
start_redis
write_request "$tmp/req.bin"
names=() addrs=() maddrs=() pids=()
for spec in "$@"; do
    IFS=: read -r name build args <<<"$spec"
    # shellcheck disable=SC2086
    start_daemon "$build" "$model" "redis://127.0.0.1:$rport/0" "$tmp/$name.log" $args
    pids+=("$dpid") names+=("$name") addrs+=("$addr") maddrs+=("$maddr")
done
echo "== $(nproc) cores, $(date -u '+%F %T UTC')," \
    "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== h2load -c $c -m 1 -n $n, $runs runs per daemon, alternating"
for r in $(seq "$runs"); do
    for i in "${!names[@]}"; do
        h0=$(hits "${maddrs[$i]}")
        t0=$(cpu_ticks "${pids[$i]}")
        out=$(h2load -c "$c" -m 1 -n "$n" -d "$tmp/req.bin" -H 'content-type: application/grpc' \
            -H 'te: trailers' "http://${addrs[$i]}/lightmoe.v1.LightMoE/Complete")
        t1=$(cpu_ticks "${pids[$i]}")
        h1=$(hits "${maddrs[$i]}")
        rps=$(sed -n 's/^finished in .*s, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
        ok=$(sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
        echo "${names[$i]} run $r: $(printf '%.0f' "$rps") req/s, $ok ok, hits +$((h1 - h0))," \
            "server CPU $(us_per_request $((t1 - t0)) "$n") us/request," \
            "load $(cut -d' ' -f1 /proc/loadavg)"
        if [ "$ok" != "$n" ] || [ $((h1 - h0)) != "$n" ]; then
            echo "${names[$i]}: not every request succeeded as a hit" >&2
            exit 1
        fi
    done
done
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
