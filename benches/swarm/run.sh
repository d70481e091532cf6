#!/usr/bin/env bash
# The swarm benchmark (benches/swarm/README.md): 500 clients, one loopback address each, at 2
# to 5 requests per second, against an upstream that serves about 200 per second, and one
# visitor who browses and solves the challenge. One run per mode, each with a fresh upstream
# and proxy:
#   quiet   the visitor alone, through ipgate (challenge "auto", never saturated)
#   limits  ipgate with per-address rate limits only (10/s, burst 20)
#   auto    the same plus the challenge in auto mode
#   nginx   nginx with limit_req (10r/s, burst 20, nodelay)
# Prints a Markdown table; the raw JSON lines stay in a temp folder, whose path it prints.
#
#   cargo build --release && benches/swarm/run.sh          # ~2.5 min after the builds
#   MODES="quiet auto" DURATION=10 benches/swarm/run.sh
#
# It builds only the load tool (cargo build --release --example swarm) and runs the release
# ipgate as it finds it. Needs python3 and curl, and Debian's nginx for the nginx mode.
# Loopback only, no root; every process it starts is stopped by its PID, and every load run
# stops by itself (window + warm-up + 10 s at most).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
IPGATE_BIN=${IPGATE_BIN:-$root/target/release/ipgate}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
MODES=${MODES:-quiet limits auto nginx}
DURATION=${DURATION:-20}         # the counted window of each mode, in seconds
WARMUP=${WARMUP:-5}              # load before the window, not counted
CLIENTS=${CLIENTS:-500}
WORKERS=${WORKERS:-16}           # the upstream's PHP workers...
SERVICE_MS=${SERVICE_MS:-80}     # ...each busy this long per request: 200 req/s
VISITOR_RATE=${VISITOR_RATE:-2}  # the visitor's page views per second
DIFFICULTY=${DIFFICULTY:-16}
AUTO_IN_FLIGHT=${AUTO_IN_FLIGHT:-12}

die() { echo "$*" >&2; exit 1; }
for tool in python3 curl; do command -v "$tool" >/dev/null || die "$tool missing"; done
[[ -x $IPGATE_BIN ]] || die "$IPGATE_BIN missing: cargo build --release"
if [[ " $MODES " == *" nginx "* && ! -x $NGINX_BIN ]]; then
    die "$NGINX_BIN missing: apt-get install -y nginx, or leave nginx out of MODES"
fi
(cd "$root" && cargo build --release --example swarm)
swarm=$root/target/release/examples/swarm
# 500 client connections, as many upstream ones, through one proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d "${TMPDIR:-/tmp}/ipgate-swarm.XXXXXX")
results=$work/results.jsonl
clk=$(getconf CLK_TCK)

# PIDs started and not yet reaped; a reaped PID leaves the list, as it may be reused.
pids=()
forget() {
    local keep=() p
    for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    pids=("${keep[@]}")
}
# alive PID: running, not a zombie waiting to be reaped.
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
    [[ -n $state && $state != Z ]]
}
# stop PID: SIGTERM, SIGKILL after 10 s, then reap it.
stop() {
    local _
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 100); do alive "$1" || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget "$1"
}
cleanup() {
    local p
    for p in "${pids[@]}"; do stop "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_http [CURL ARGS] URL: until it answers 2xx, 10 s at most.
wait_http() {
    local _
    for _ in $(seq 100); do
        curl -sf -o /dev/null --max-time 2 "$@" && return 0
        sleep 0.1
    done
    echo "no answer from: $*" >&2
    return 1
}

# start_upstream DIR: a fresh stand-in upstream; sets up_port and up_pid.
start_upstream() {
    up_port=$(port)
    "$swarm" upstream --addr "127.0.0.1:$up_port" --workers "$WORKERS" --service-ms "$SERVICE_MS" \
        2>"$1/upstream.log" &
    up_pid=$!
    pids+=("$up_pid")
    wait_http "http://127.0.0.1:$up_port/__stats" || { cat "$1/upstream.log" >&2; exit 1; }
}

# start_ipgate DIR CHALLENGE: ipgate in front of the upstream, the site's challenge "off" or
# "auto"; sets front_port, admin_port and proxy_pid.
start_ipgate() {
    local dir=$1 challenge=$2
    front_port=$(port) admin_port=$(port)
    {
        cat <<CONF
[gateway]
state_dir = "$dir/state"
[[listener]]
addr = "127.0.0.1:$front_port"
tls = false
[admin]
addr = "127.0.0.1:$admin_port"
token_file = "$dir/admin.token"
[log]
access = "off"
[rate_limit]
requests_per_second = 10
burst = 20
CONF
        # Auto mode: saturated once AUTO_IN_FLIGHT requests wait on the 16 workers; calm
        # for longer than a run before it stops challenging.
        [[ $challenge == off ]] || cat <<CONF
[challenge]
difficulty = $DIFFICULTY
auto_in_flight = $AUTO_IN_FLIGHT
auto_calm = "30s"
CONF
        cat <<CONF
[[site]]
name = "swarm"
hosts = ["*"]
upstream = "http://127.0.0.1:$up_port"
challenge = "$challenge"
CONF
    } >"$dir/ipgate.toml"
    "$IPGATE_BIN" check -c "$dir/ipgate.toml" >"$dir/check.log" 2>&1 || {
        cat "$dir/check.log" >&2
        die "$IPGATE_BIN rejects the config: a build without the challenge? cargo build --release"
    }
    "$IPGATE_BIN" run -c "$dir/ipgate.toml" >"$dir/ipgate.log" 2>&1 &
    proxy_pid=$!
    pids+=("$proxy_pid")
    wait_http "http://127.0.0.1:$admin_port/healthz" &&
        wait_http -H "Host: example.test" "http://127.0.0.1:$front_port/" ||
        { cat "$dir/ipgate.log" >&2; exit 1; }
}

# start_nginx DIR: nginx in front of the upstream, in the foreground, everything of its own
# under DIR/nginx; sets front_port and proxy_pid.
start_nginx() {
    local dir=$1/nginx
    mkdir -p "$dir/tmp"
    front_port=$(port) admin_port=""
    # limit_req_status 429: ipgate answers an address over its limit with 429 too (nginx's
    # default is 503). Keep-alive to the upstream, as ipgate's pool has.
    cat >"$dir/nginx.conf" <<CONF
daemon off;
worker_processes auto;
worker_rlimit_nofile 8192;
pid $dir/nginx.pid;
error_log $dir/error.log error;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    limit_req_zone \$binary_remote_addr zone=per_ip:10m rate=10r/s;
    limit_req_status 429;
    upstream app { server 127.0.0.1:$up_port; keepalive 64; }
    server {
        listen 127.0.0.1:$front_port;
        location / {
            limit_req zone=per_ip burst=20 nodelay;
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
    local args=(-p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log")
    "$NGINX_BIN" -t "${args[@]}" >"$dir/test.log" 2>&1 || { cat "$dir/test.log" >&2; exit 1; }
    "$NGINX_BIN" "${args[@]}" 2>>"$dir/error.log" &
    proxy_pid=$!
    pids+=("$proxy_pid")
    wait_http -H "Host: example.test" "http://127.0.0.1:$front_port/" ||
        { cat "$dir/error.log" >&2; exit 1; }
}

# cpu_ticks PID: utime + stime of the process and its children (nginx's workers), in ticks.
cpu_ticks() {
    local total=0 p f
    for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        read -r -a f < <(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
# issued: ipgate_challenges_total{result="issued"} summed over sites; 0 without ipgate.
issued() {
    [[ -n $admin_port ]] || { echo 0; return; }
    { curl -sf --max-time 5 "http://127.0.0.1:$admin_port/metrics" || true; } |
        awk '/^ipgate_challenges_total\{/ && /result="issued"/ { n += $NF } END { printf "%d\n", n }'
}
# served: requests the upstream has served so far.
served() {
    local n
    n=$({ curl -sf --max-time 5 "http://127.0.0.1:$up_port/__stats" || true; } |
        sed -n 's/.*"served":\([0-9]*\).*/\1/p')
    echo "${n:-0}"
}
snapshot() { echo "$(date +%s.%N) $(cpu_ticks "$proxy_pid") $(issued) $(served)"; }

# measure MODE DIR CLIENTS: one load run against front_port, its line appended to results.
measure() {
    local mode=$1 dir=$2 clients=$3 load before after
    "$swarm" load --target "http://127.0.0.1:$front_port" --host example.test \
        --clients "$clients" --rate-min 2 --rate-max 5 --warmup "$WARMUP" --seconds "$DURATION" \
        --visitor-rate "$VISITOR_RATE" --visitor-solve --label "$mode" \
        >"$dir/load.json" 2>"$dir/load.log" &
    load=$!
    pids+=("$load")
    # The proxy's CPU, its challenges and the upstream's count over the same window as the
    # load's, give or take the few milliseconds the load takes to start.
    sleep "$WARMUP"
    before=$(snapshot)
    sleep "$DURATION"
    after=$(snapshot)
    wait "$load" || { cat "$dir/load.log" >&2; die "$mode: the load failed"; }
    forget "$load"
    python3 - "$dir/load.json" "$mode" "$clk" $before $after >>"$results" <<'PY'
import json, sys
path, mode, clk = sys.argv[1:4]
t0, cpu0, iss0, sv0, t1, cpu1, iss1, sv1 = map(float, sys.argv[4:12])
row = json.loads(open(path).read())
seconds = t1 - t0
cpu = (cpu1 - cpu0) / float(clk)
issued = int(iss1 - iss0)
row.update(mode=mode, proxy="nginx" if mode == "nginx" else "ipgate",
           measured_s=round(seconds, 2),
           upstream_served=int(sv1 - sv0), upstream_rps=round((sv1 - sv0) / seconds, 1),
           proxy_cpu_s=round(cpu, 3), challenges_issued=issued,
           cpu_us_per_challenge=round(cpu * 1e6 / issued, 1) if issued else None)
print(json.dumps(row))
PY
    tail -n1 "$results" >&2
}

echo "results: $results" >&2
for mode in $MODES; do
    dir=$work/$mode
    mkdir -p "$dir"
    start_upstream "$dir"
    case $mode in
        quiet) start_ipgate "$dir" auto; clients=0 ;;
        limits) start_ipgate "$dir" off; clients=$CLIENTS ;;
        auto) start_ipgate "$dir" auto; clients=$CLIENTS ;;
        nginx) start_nginx "$dir"; clients=$CLIENTS ;;
        *) die "unknown mode: $mode (quiet, limits, auto, nginx)" ;;
    esac
    echo "$mode: $clients swarm clients, ${WARMUP} s warm-up, ${DURATION} s counted" >&2
    measure "$mode" "$dir" "$clients"
    stop "$proxy_pid"
    stop "$up_pid"
done

python3 - "$results" "$WORKERS" "$SERVICE_MS" "$CLIENTS" "$WARMUP" "$DURATION" "$DIFFICULTY" <<'PY'
import json, os, sys, time
path = sys.argv[1]
workers, service_ms, clients, warmup, duration, difficulty = map(int, sys.argv[2:8])
rows = [json.loads(line) for line in open(path)]
capacity = workers * 1000 / service_ms
quiet = next((r["visitor_p99_ms"] for r in rows if r["mode"] == "quiet"), None)
dash = "–"
print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs. Upstream: {workers} workers x"
      f" {service_ms} ms = {capacity:.0f} req/s. Swarm: {clients} addresses at 2-5 req/s each."
      f" {warmup} s warm-up, {duration} s counted. Challenge difficulty {difficulty}.\n")
print("| mode | upstream req/s | visitor p50 ms | visitor p99 ms | visitor errors"
      " | ipgate CPU µs per challenged request | p99 ÷ quiet p99 |")
print("| --- | --- | --- | --- | --- | --- | --- |")
fmt = lambda v: dash if v is None else f"{v:g}"
for r in rows:
    p99 = r["visitor_p99_ms"]
    ratio = f"{p99 / quiet:.2f}" if quiet and p99 is not None else dash
    cpu = fmt(r["cpu_us_per_challenge"]) if r["mode"] == "auto" else dash
    errors = f"{r['visitor_errors']} of {r['visitor_requests']}"
    print(f"| {r['mode']} | {r['upstream_rps']:.1f} | {fmt(r['visitor_p50_ms'])} | {fmt(p99)}"
          f" | {errors} | {cpu} | {ratio} |")
print()
for r in rows:
    if r["mode"] == "auto" and quiet:
        ratio = (r["visitor_p99_ms"] or float("inf")) / quiet
        ok = r["upstream_rps"] < capacity and ratio <= 1.5 and r["visitor_errors"] == 0
        print(f"auto: upstream {r['upstream_rps']:.0f} of {capacity:.0f} req/s, visitor p99 "
              f"{ratio:.2f}x quiet, {r['visitor_errors']} errors: goal {'met' if ok else 'NOT met'}")
    if r["mode"] in ("limits", "nginx"):
        share = r["upstream_rps"] / capacity
        print(f"{r['mode']}: the swarm kept the upstream at {share:.0%} of its capacity")
PY
echo "raw JSON lines: $results"
