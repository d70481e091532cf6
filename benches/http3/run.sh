#!/usr/bin/env bash
# CPU per request of ipgate on HTTP/3 beside HTTP/2 and HTTP/1.1 over TLS, in one run: the
# same gateway (one TLS listener with http3 = true, its built-in demo upstream), the same
# request (GET /). Clients: Debian's h2load for HTTP/1.1 and HTTP/2 (Debian builds it
# without QUIC), and for HTTP/3 h3load (benches/http3/h3load.rs: quinn and h3, the same
# connections and streams in flight). The gateway's user and system CPU are read from
# /proc/PID/stat around each load run; the figure is CPU microseconds per request, and
# HTTP/3's ratio to HTTP/2.
#
#   cargo build --release --example h3load && cargo build --release && benches/http3/run.sh
#   N=20000 C=8 ROUNDS=3 benches/http3/run.sh
#
# Needs h2load (nghttp2-client). Loopback only; the gateway it starts is stopped by PID.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${IPGATE_BIN:-$root/target/release/ipgate}
h3load=${H3LOAD_BIN:-$root/target/release/examples/h3load}
[[ -x $h3load ]] || { echo "$h3load missing: cargo build --release --example h3load" >&2; exit 1; }
N=${N:-20000}
C=${C:-8}
M=${M:-10}
ROUNDS=${ROUNDS:-3}
[[ -x $bin ]] || { echo "$bin missing: cargo build --release" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
work=$(mktemp -d)
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free)
demo=$(free)
cat >"$work/ipgate.toml" <<TOML
[demo_upstream]
addr = "127.0.0.1:$demo"
[gateway]
state_dir = "$work/state"
workers = 2
[[listener]]
addr = "127.0.0.1:$port"
tls = true
http3 = true
[tls]
self_signed = true
[log]
access = "off"
[rate_limit]
requests_per_second = 1000000
burst = 1000000
[limits]
max_requests_per_client = 100000
max_connections_per_client = 100000
[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:$demo"
TOML
mkdir -p "$work/state"
"$bin" check -c "$work/ipgate.toml" >/dev/null
"$bin" run -c "$work/ipgate.toml" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do grep -q "listening addr" "$work/log" && break; sleep 0.1; done
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
tck=$(getconf CLK_TCK)
declare -A total_cpu total_req
run() { # name, h2load args... (h3: h3load)
    local name=$1; shift
    local before after out ok
    before=$(cpu)
    if [[ $name == h3 ]]; then
        out=$("$h3load" "127.0.0.1:$port" "$N" "$C" "$M" 2>&1)
        after=$(cpu)
        ok=$(sed -n 's/^succeeded \([0-9]*\) .*/\1/p' <<<"$out")
    else
        out=$(h2load -n "$N" -c "$C" -m "$M" "$@" "https://127.0.0.1:$port/" 2>&1)
        after=$(cpu)
        ok=$(sed -n 's/.*requests: .* \([0-9]*\) succeeded.*/\1/p' <<<"$out")
    fi
    [[ ${ok:-0} -gt 0 ]] || { echo "$name: no request succeeded:" >&2; echo "$out" | tail -5 >&2; exit 1; }
    total_cpu[$name]=$(( ${total_cpu[$name]:-0} + after - before ))
    total_req[$name]=$(( ${total_req[$name]:-0} + ok ))
}
for _ in $(seq "$ROUNDS"); do
    run h1tls --h1
    run h2 --npn-list=h2
    run h3
done
printf '%-8s %10s %16s\n' proto requests "CPU µs/request"
for p in h1tls h2 h3; do
    us=$(python3 -c "print(round(${total_cpu[$p]} * 1e6 / $tck / ${total_req[$p]}, 1))")
    printf '%-8s %10s %16s\n' "$p" "${total_req[$p]}" "$us"
    eval "us_$p=$us"
done
python3 -c "print('HTTP/3 / HTTP/2 CPU per request: %.2f' % ($us_h3 / $us_h2))"
