#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable for the same
# binary and inputs whatever else the machine does, so a hot-path change can be compared
# with its baseline when wall-clock CPU figures are too noisy. For each binary given, and
# each of HTTP/1.1 plain, HTTP/1.1 over TLS and HTTP/2 over TLS, it counts the whole
# process's instructions for N and for 2N keep-alive requests (h2load, one connection) and
# reports the difference divided by N: start-up and shutdown cancel out. It reports the same
# for `proxy::handle` alone (inclusive: all of ipgate's own per-request code), which repeats
# to within 0.1 %; the whole-process figure moves by a few percent with the event loop's
# timing.
#
#   benches/callgrind/run.sh BASELINE_BIN [OTHER_BIN ...]     # N=2000 by default
#
# Needs valgrind, nginx (the backend) and h2load (nghttp2-client). Loopback only; every
# process it starts is stopped by PID.
set -euo pipefail
N=${N:-2000}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# KEEP=DIR keeps every callgrind output there (callgrind_annotate DIR/FILE to see where).
keep=${KEEP:-}
# N free loopback ports, distinct (all held open until each is known, so no two are the same).
ports() {
    python3 -c 'import socket, sys
s = [socket.socket() for _ in range(int(sys.argv[1]))]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))' "$1"
}
port() { ports 1; }

backend=$(port)
cat >"$work/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/nginx.err;
events {}
http { access_log off; server { listen 127.0.0.1:$backend; location / { return 200 "ok"; } } }
CONF
nginx -c "$work/nginx.conf" & pids+=($!)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# count BIN REQUESTS MODE -> total instructions of the gateway process
count() {
    local bin=$1 n=$2 mode=$3 plain tls admin out
    read -r plain tls admin < <(ports 3)
    out="$work/cg.$RANDOM"
    mkdir -p "$out"
    printf 'x%.0s' {1..40} >"$out/token"
    cat >"$out/ipgate.toml" <<CONF
[gateway]
state_dir = "$out/state"
workers = 1
[[listener]]
addr = "127.0.0.1:$plain"
tls = false
[[listener]]
addr = "127.0.0.1:$tls"
tls = true
[tls]
certificates = [{ cert = "$work/cert.pem", key = "$work/key.pem" }]
[admin]
addr = "127.0.0.1:$admin"
token_file = "$out/token"
[log]
access = "off"
[privacy]
log_ip = "none"
[rate_limit]
requests_per_second = 1000000
burst = 1000000
[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:$backend"
CONF
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" "$bin" run -c "$out/ipgate.toml" \
        >"$out/log" 2>&1 &
    local pid=$!
    pids+=($pid)
    for _ in $(seq 300); do curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    case $mode in
        h1) h2load --h1 -n "$n" -c 1 "http://127.0.0.1:$plain/" >"$out/load" ;;
        h1tls) h2load --h1 -n "$n" -c 1 "https://127.0.0.1:$tls/" >"$out/load" ;;
        h2) h2load -n "$n" -c 1 -m 10 "https://127.0.0.1:$tls/" >"$out/load" ;;
    esac
    grep -q "$n succeeded" "$out/load" || { cat "$out/load" "$out/log" >&2; exit 1; }
    kill -TERM "$pid"; wait "$pid" || true
    if [[ -n $keep ]]; then mkdir -p "$keep"; cp "$out/callgrind.out" "$keep/$(basename "$bin").$mode.$n.out"; fi
    local handle
    handle=$(callgrind_annotate --inclusive=yes "$out/callgrind.out" 2>/dev/null |
        awk '/proxy\.rs:ipgate::(serve::)?proxy::handle::\{\{closure\}\}/ && !v {gsub(",", "", $1); v = $1}
             END {print v + 0}')
    echo "$(awk '/^summary:/ {print $2}' "$out/callgrind.out") ${handle:-0}"
}

printf '%-40s %-6s %-32s %s\n' binary mode "instructions per request" "in proxy::handle"
declare -A base base_h
ratio() { python3 -c "print(f' ({$1/$2:.3f}x baseline)')"; }
for bin in "$@"; do
    for mode in h1 h1tls h2; do
        read -r a ah < <(count "$bin" "$N" "$mode")
        read -r b bh < <(count "$bin" $((2 * N)) "$mode")
        per=$(( (b - a) / N )) per_h=$(( (bh - ah) / N ))
        r="" rh=""
        if [[ -z ${base[$mode]:-} ]]; then
            base[$mode]=$per base_h[$mode]=$per_h
        else
            r=$(ratio "$per" "${base[$mode]}")
            (( ${base_h[$mode]} > 0 )) && rh=$(ratio "$per_h" "${base_h[$mode]}")
        fi
        printf '%-40s %-6s %-32s %s\n' "$bin" "$mode" "$per$r" "$per_h$rh"
    done
done
