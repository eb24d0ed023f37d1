# shellcheck shell=bash disable=SC2154,SC2034  # $tmp is the caller's; addr, maddr, dpid are for it
# cache_common.sh: pieces shared by bench_cache.sh and bench_cache_side.sh
# (sourced, not run). Needs $tmp (a scratch folder) set by the caller.
#
#   free_port                      a free TCP port on 127.0.0.1
#   start_redis                    a fresh redis-server on a free port: sets rport
#   write_request FILE             the h2load request: one gRPC message of
#                                  GenerateRequest{prompt = 1: "What is the capital
#                                  of France?", max_tokens = 3: 16, temperature =
#                                  4: 0.0}, the key bench_cache_rpc's priming call
#                                  stores
#   start_daemon BUILD MODEL URL LOG [OPTIONS...]
#                                  lightmoed with cache_url URL, primed (the
#                                  first call stores the answer): sets addr,
#                                  maddr and dpid; exits 1 if it never answers
#   metric MADDR NAME              the value of an unlabelled metric of the daemon
#   hits MADDR                     lightmoe_cache_hits_total
#   followers MADDR                lightmoe_cache_single_flight_waits_total: requests
#                                  that waited for an identical one's lookup
#   cpu_ticks PID                  user + system clock ticks of PID
#   us_per_request TICKS N         those ticks as microseconds per request
CACHE_PROMPT="What is the capital of France?"

free_port() {
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

start_redis() {
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --dir "$tmp" --save "" --appendonly no \
        >"$tmp/redis.log" 2>&1 &
    for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
}

write_request() {
    python3 -c '
import struct, sys
p = sys.argv[1].encode()
m = b"\x0a" + bytes([len(p)]) + p + b"\x18\x10" + b"\x25\0\0\0\0"
sys.stdout.buffer.write(b"\0" + struct.pack(">I", len(m)) + m)' "$CACHE_PROMPT" >"$1"
}

start_daemon() {
    local build=$1 model=$2 url=$3 log=$4
    shift 4
    addr=127.0.0.1:$(free_port)
    maddr=127.0.0.1:$(free_port)
    "$build/daemon/lightmoed" --model "$model" --listen "$addr" --metrics-listen "$maddr" \
        --config /dev/null --cache-url "$url" --log-level warn "$@" 2>"$log" &
    dpid=$!
    # Ready when a request is answered (the tool's priming call) and then cached.
    for _ in $(seq 300); do
        "$build/bench/bench_cache_rpc" --target "$addr" --clients 1 --seconds 0.05 \
            --prompt "$CACHE_PROMPT" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "lightmoed did not become ready:" >&2
    cat "$log" >&2
    exit 1
}

metric() {
    python3 -c 'import sys, urllib.request as u
for l in u.urlopen("http://%s/metrics" % sys.argv[1], timeout=5).read().decode().splitlines():
    if l.startswith(sys.argv[2] + " "): print(l.split()[1])' "$1" "$2"
}

hits() { metric "$1" lightmoe_cache_hits_total; }
followers() { metric "$1" lightmoe_cache_single_flight_waits_total; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

us_per_request() {
    awk -v t="$1" -v n="$2" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz / n * 1e6}'
}
