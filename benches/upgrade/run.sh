#!/usr/bin/env bash
# The upgrade benchmark (benches/upgrade/README.md): what replacing a running proxy costs
# the clients that keep connecting meanwhile. Three methods, each behind the same 100k-CIDR
# block list, each repeated UPGRADES times under load:
#   upgrade    ipgate upgrade -c CONFIG: the running gateway starts the binary on disk and
#              hands it its listening sockets; the old process drains and exits
#   stopstart  what systemctl restart does: SIGTERM, wait for the exit, ipgate run again
#   nginx      nginx's binary upgrade, the anchor: USR2, then WINCH and QUIT to the old master
# Prints a Markdown table and writes it, with the JSON behind it, to
# target/bench-results/upgrade-<date-time>/.
#
#   cargo build --release && benches/upgrade/run.sh      # about 30 s per method
#   UPGRADES=2 METHODS="stopstart nginx" benches/upgrade/run.sh
#
# It builds nothing: it runs the ipgate at IPGATE_BIN as it finds it. A binary without the
# upgrade subcommand gets "not available" for that method, and the others still run.
# Needs bash 5, python3, ss and ps; Debian's nginx for the nginx method (apt-get install -y
# nginx; without it that row says "not available").
# Loopback only. Every process it starts is stopped by its PID on exit; each method is
# bounded (METHOD_BUDGET seconds of upgrades, every wait has a timeout).
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$root/benches/upgrade
IPGATE_BIN=${IPGATE_BIN:-$root/target/release/ipgate}
NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
METHODS=${METHODS:-upgrade stopstart nginx}
UPGRADES=${UPGRADES:-10}          # replacements per method
CLIENTS=${CLIENTS:-16}            # concurrent load clients, one fresh connection per request
RATE=${RATE:-25}                  # requests per second per client; 0: as fast as it can
SETTLE=${SETTLE:-2}               # seconds of load before the first and after each replacement
LIST_SIZE=${LIST_SIZE:-100000}    # CIDRs in the block list
SEED=${SEED:-1}                   # the list's random seed: the same seed, the same list
NGINX_LIST=${NGINX_LIST:-deny}    # deny: the list as deny lines; geo: as a geo map
METHOD_BUDGET=${METHOD_BUDGET:-100}  # no new replacement starts after this many seconds
KEEP=${KEEP:-0}                   # 1: keep the temp folder (logs, raw per-request lines)
OUT=${OUT:-$root/target/bench-results/upgrade-$(date +%Y%m%d-%H%M%S)}

die() { echo "upgrade bench: $*" >&2; exit 1; }
note() { echo "upgrade bench: $*" >&2; }
[[ -n ${EPOCHREALTIME:-} ]] || die "needs bash 5 (EPOCHREALTIME)"
for tool in python3 ss ps; do command -v "$tool" >/dev/null || die "$tool missing"; done
[[ -x $IPGATE_BIN ]] || die "$IPGATE_BIN missing: run cargo build --release first (this script builds nothing)"
[[ $UPGRADES =~ ^[1-9][0-9]*$ ]] || die "UPGRADES must be a positive integer"
[[ $NGINX_LIST == deny || $NGINX_LIST == geo ]] || die "NGINX_LIST is deny or geo"
for m in $METHODS; do
    [[ $m == upgrade || $m == stopstart || $m == nginx ]] || die "unknown method $m (upgrade, stopstart, nginx)"
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d "${TMPDIR:-/tmp}/ipgate-upgrade.XXXXXX")
load_py=$here/load.py

# --- processes ---------------------------------------------------------------------------
# Every process this script starts, or that a process it started starts in its place (the
# new ipgate of an upgrade, nginx's new master and its workers), is tracked as PID:STARTTIME,
# so a PID that exited and was reused by someone else is never signalled.
tracked=()
starttime() { # field 22 of /proc/PID/stat, the 20th after the command name
    local rest f
    rest=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a f <<<"$rest"
    [[ -n ${f[19]:-} ]] && echo "${f[19]}"
}
track() {
    local st
    st=$(starttime "$1") || return 0 # already gone
    tracked+=("$1:$st")
}
# alive PID: running and not a zombie (a zombie has exited; nobody may reap it here).
alive() {
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
    [[ -n $state && $state != Z ]]
}
# same PID:STARTTIME: the tracked process still exists (alive or not yet reaped).
same() {
    local st
    st=$(starttime "${1%%:*}") || return 1
    [[ $st == "${1##*:}" ]]
}
# wait_gone PID SECONDS: until PID has exited (or is a zombie); 1 on timeout.
wait_gone() {
    local deadline=$(($(now_us) + $2 * 1000000))
    while alive "$1"; do
        (($(now_us) > deadline)) && return 1
        sleep 0.01
    done
    wait "$1" 2>/dev/null || true # reaps it when it is our child
    return 0
}
# children PID: its child processes (this kernel may lack /proc/PID/task/*/children).
children() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }
stop_entry() {
    local pid=${1%%:*} _
    same "$1" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if same "$1" && alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? e c
    trap - EXIT INT TERM
    set +e
    # nginx workers are children of a tracked master; track them before the master goes.
    for e in "${tracked[@]}"; do
        same "$e" || continue
        for c in $(children "${e%%:*}"); do track "$c"; done
    done
    for ((i = ${#tracked[@]} - 1; i >= 0; i--)); do stop_entry "${tracked[i]}"; done
    # A process started in place of one of ours and not tracked yet (the script was stopped
    # between an upgrade and its bookkeeping) still names a file in the temp folder.
    for e in $(pids_naming "$work" 2>/dev/null); do
        for c in $(children "$e"); do stop_entry "$c:$(starttime "$c")"; done
        stop_entry "$e:$(starttime "$e")"
    done
    if [[ $KEEP == 1 ]]; then
        note "kept the temp folder: $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- time --------------------------------------------------------------------------------
# EPOCHREALTIME (bash 5) in the C locale: seconds with a dot and 6 decimals.
now() { echo "$EPOCHREALTIME"; }
now_us() { local t=$EPOCHREALTIME; echo $((10#${t/./})); }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- inputs: the block list and the upstream ---------------------------------------------
note "work folder: $work"
note "generating $LIST_SIZE random IPv4 /32 and /24 entries (none in 127/8, 0/8, 224/3)"
python3 - "$LIST_SIZE" "$SEED" "$work" <<'PY'
import random, sys
count, seed, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
seen, entries = set(), []
while len(entries) < count:
    a = rng.getrandbits(32)
    if a >> 24 in (0, 127) or a >> 24 >= 224:
        continue  # never loopback, where the load comes from, nor non-unicast
    plen = 32 if rng.getrandbits(1) else 24
    if plen == 24:
        a &= 0xFFFFFF00  # host bits clear: nginx warns about set ones
    if (a, plen) in seen:
        continue
    seen.add((a, plen))
    entries.append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}/{plen}")
with open(f"{out}/list.txt", "w") as f:
    f.writelines(e + "\n" for e in entries)
with open(f"{out}/nginx-deny.conf", "w") as f:
    f.writelines(f"deny {e};\n" for e in entries)
with open(f"{out}/nginx-geo.conf", "w") as f:
    f.writelines(f"{e} 1;\n" for e in entries)
PY

python3 "$load_py" upstream --port-file "$work/upstream.port" 2>"$work/upstream.log" &
track $!
for _ in $(seq 100); do [[ -s $work/upstream.port ]] && break; sleep 0.05; done
[[ -s $work/upstream.port ]] || { cat "$work/upstream.log" >&2; die "the upstream did not start"; }
up_port=$(cat "$work/upstream.port")
python3 "$load_py" wait --target "127.0.0.1:$up_port" --timeout 5 >/dev/null || die "the upstream does not answer"

# --- per method --------------------------------------------------------------------------
# Each method writes $dir/result.json: its status, and one line per replacement in
# $dir/replacements.tsv: index, start, end (epoch s), seconds to serving, seconds until the
# old process exited (or -1), ok|failed, a note.

# ipgate_config DIR: writes DIR/ipgate.toml; sets front_port, admin_port, conf.
ipgate_config() {
    local dir=$1
    front_port=$(port) admin_port=$(port) conf=$dir/ipgate.toml
    mkdir -p "$dir/state"
    # The load comes from 127.0.0.1 only, at several hundred requests per second: the
    # default rate limit (50/s per client) and in-flight cap (32) would answer it 429.
    # They stay on, far above what is reached, as nginx has no limit. No access log, as
    # nginx's is off.
    cat >"$conf" <<CONF
[gateway]
state_dir = "$dir/state"
workers = 2

[[listener]]
addr = "127.0.0.1:$front_port"
tls = false

[admin]
addr = "127.0.0.1:$admin_port"
token_file = "$dir/state/admin.token"

[log]
access = "off"

[rate_limit]
requests_per_second = 100000
burst = 100000

[limits]
max_requests_per_client = 1024

[lists.bench]
action = "block"
files = ["$work/list.txt"]

[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:$up_port"
CONF
    "$IPGATE_BIN" check -c "$conf" >"$dir/check.log" 2>&1 || {
        cat "$dir/check.log" >&2
        return 1
    }
}

# ipgate_start DIR: ipgate run in the background, our child; sets proxy_pid.
ipgate_start() {
    local dir=$1
    "$IPGATE_BIN" run -c "$conf" >>"$dir/ipgate.out" 2>>"$dir/ipgate.log" &
    proxy_pid=$!
    track "$proxy_pid"
}

# pids_naming TEXT: PIDs of live processes whose command line contains TEXT, load clients
# and probes aside.
pids_naming() {
    python3 - "$1" <<'PY'
import os, sys
needle = sys.argv[1].encode()
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) == os.getpid():
        continue
    try:
        cmd = open(f"/proc/{p}/cmdline", "rb").read()
        state = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if needle in cmd and state != "Z" and b"load.py" not in cmd:
        print(p)
PY
}
# listener_pids PORT: PIDs holding a listening socket on 127.0.0.1:PORT.
listener_pids() {
    ss -ltnpH "sport = :$1" 2>/dev/null | grep -oE 'pid=[0-9]+' | cut -d= -f2 | sort -u || true
}

# start_load DIR TARGET: the load client in the background until DIR/stop exists; sets load_pid.
start_load() {
    local dir=$1 target=$2
    rm -f "$dir/stop"
    python3 "$load_py" load --target "$target" --clients "$CLIENTS" --rate "$RATE" \
        --duration $((METHOD_BUDGET + 90)) --stop-file "$dir/stop" \
        --out "$dir/load.json" --raw "$dir/load.raw" 2>"$dir/load.log" &
    load_pid=$!
    track "$load_pid"
}
stop_load() {
    local dir=$1
    touch "$dir/stop"
    wait_gone "$load_pid" 30 || note "the load client did not stop in 30 s"
}

write_result() { # DIR METHOD STATUS REASON
    python3 - "$@" <<'PY'
import json, sys
dir, method, status, reason = sys.argv[1:5]
json.dump({"method": method, "status": status, "reason": reason}, open(f"{dir}/result.json", "w"))
PY
}

# budget_left START_US: false once METHOD_BUDGET seconds have passed since START_US.
budget_left() { (($(now_us) - $1 < METHOD_BUDGET * 1000000)); }

run_upgrade() {
    local dir=$1 t0 t1 old new out rc exit_s i start reason=""
    if ! "$IPGATE_BIN" upgrade --help >/dev/null 2>&1; then
        write_result "$dir" upgrade "not available" "$IPGATE_BIN has no upgrade subcommand (built before the feature?)"
        return 0
    fi
    ipgate_config "$dir" || { write_result "$dir" upgrade failed "ipgate check rejects the config"; return 0; }
    ipgate_start "$dir"
    python3 "$load_py" wait --target "127.0.0.1:$front_port" --timeout 30 >/dev/null ||
        { tail -n 20 "$dir/ipgate.log" >&2; write_result "$dir" upgrade failed "ipgate did not serve within 30 s"; return 0; }
    old=$proxy_pid
    start_load "$dir" "127.0.0.1:$front_port"
    start=$(now_us)
    sleep "$SETTLE"
    for ((i = 1; i <= UPGRADES; i++)); do
        budget_left "$start" || { note "upgrade: budget of $METHOD_BUDGET s spent after $((i - 1))"; break; }
        t0=$(now)
        rc=0
        out=$(timeout 60 "$IPGATE_BIN" upgrade -c "$conf" 2>&1) || rc=$?
        t1=$(now)
        echo "$out" >>"$dir/upgrade-cli.log"
        if ((rc != 0)); then
            if grep -q "unrecognized subcommand" <<<"$out"; then
                reason="not available: $IPGATE_BIN has no upgrade subcommand"
            else
                reason="ipgate upgrade exited $rc: $(tr -s '\n' ' ' <<<"$out" | sed 's/ *$//' | cut -c1-300)"
            fi
            printf '%d\t%s\t%s\t%s\t-1\tfailed\t%s\n' "$i" "$t0" "$t1" "$(secs "$t0" "$t1")" "$reason" >>"$dir/replacements.tsv"
            break
        fi
        # The old process drains and exits; then the new one is the PID the CLI names, else
        # the one process left that runs with this config, else the one that holds the port.
        exit_s=-1
        if wait_gone "$old" 40; then exit_s=$(secs "$t0" "$(now)"); else note "upgrade $i: old pid $old still runs 40 s on"; fi
        new=$(grep -oiE 'pid[^0-9]{0,5}[0-9]+' <<<"$out" | grep -oE '[0-9]+' | head -n1 || true)
        if [[ -z $new ]] || ! alive "$new"; then
            new=$(pids_naming "$conf" | grep -vx "$old" | head -n1 || true)
        fi
        if [[ -z $new ]]; then
            new=$(listener_pids "$front_port" | grep -vx "$old" | head -n1 || true)
        fi
        if [[ -z $new ]]; then
            reason="ipgate upgrade exited 0 but no new process runs with $conf"
            printf '%d\t%s\t%s\t%s\t%s\tfailed\t%s\n' "$i" "$t0" "$t1" "$(secs "$t0" "$t1")" "$exit_s" "$reason" >>"$dir/replacements.tsv"
            break
        fi
        track "$new"
        python3 "$load_py" wait --target "127.0.0.1:$front_port" --timeout 5 >/dev/null ||
            note "upgrade $i: no 200 within 5 s after the CLI returned"
        printf '%d\t%s\t%s\t%s\t%s\tok\tpid %s -> %s\n' "$i" "$t0" "$t1" "$(secs "$t0" "$t1")" "$exit_s" "$old" "$new" >>"$dir/replacements.tsv"
        note "upgrade $i: $(secs "$t0" "$t1") s to serving (pid $old -> $new), old exited after ${exit_s} s"
        old=$new
        sleep "$SETTLE"
    done
    stop_load "$dir"
    if [[ -n $reason ]]; then
        local status=failed
        [[ $reason == "not available"* ]] && status="not available" && reason=${reason#not available: }
        write_result "$dir" upgrade "$status" "$reason"
    else
        write_result "$dir" upgrade ok ""
    fi
    for new in $(pids_naming "$conf"); do stop_entry "$new:$(starttime "$new")"; done
}

run_stopstart() {
    local dir=$1 t0 t1 t_exit old i start probe reason=""
    ipgate_config "$dir" || { write_result "$dir" stopstart failed "ipgate check rejects the config"; return 0; }
    ipgate_start "$dir"
    python3 "$load_py" wait --target "127.0.0.1:$front_port" --timeout 30 >/dev/null ||
        { tail -n 20 "$dir/ipgate.log" >&2; write_result "$dir" stopstart failed "ipgate did not serve within 30 s"; return 0; }
    start_load "$dir" "127.0.0.1:$front_port"
    start=$(now_us)
    sleep "$SETTLE"
    for ((i = 1; i <= UPGRADES; i++)); do
        budget_left "$start" || { note "stopstart: budget of $METHOD_BUDGET s spent after $((i - 1))"; break; }
        old=$proxy_pid
        # The probe starts ahead and polls only once told, after the old process exited:
        # any 200 it then gets comes from the new process, and Python's start is not timed.
        rm -f "$dir/probe.ready" "$dir/probe.go" "$dir/probe.out"
        python3 "$load_py" wait --target "127.0.0.1:$front_port" --timeout 60 \
            --ready-file "$dir/probe.ready" --go-file "$dir/probe.go" >"$dir/probe.out" 2>>"$dir/probe.log" &
        probe=$!
        track "$probe"
        for _ in $(seq 1000); do [[ -e $dir/probe.ready ]] && break; sleep 0.01; done
        t0=$(now)
        kill -TERM "$old"
        if ! wait_gone "$old" 40; then
            reason="pid $old still runs 40 s after SIGTERM"
            printf '%d\t%s\t%s\t-1\t-1\tfailed\t%s\n' "$i" "$t0" "$(now)" "$reason" >>"$dir/replacements.tsv"
            break
        fi
        t_exit=$(now)
        touch "$dir/probe.go"
        ipgate_start "$dir"
        if ! wait "$probe" || ! t1=$(cat "$dir/probe.out") || [[ -z $t1 ]]; then
            reason="the new ipgate did not serve within 60 s"
            printf '%d\t%s\t%s\t-1\t%s\tfailed\t%s\n' "$i" "$t0" "$(now)" "$(secs "$t0" "$t_exit")" "$reason" >>"$dir/replacements.tsv"
            break
        fi
        printf '%d\t%s\t%s\t%s\t%s\tok\tpid %s -> %s\n' "$i" "$t0" "$t1" "$(secs "$t0" "$t1")" "$(secs "$t0" "$t_exit")" "$old" "$proxy_pid" >>"$dir/replacements.tsv"
        note "stopstart $i: $(secs "$t0" "$t1") s to serving (old exited after $(secs "$t0" "$t_exit") s)"
        sleep "$SETTLE"
    done
    stop_load "$dir"
    if [[ -n $reason ]]; then write_result "$dir" stopstart failed "$reason"; else write_result "$dir" stopstart ok ""; fi
    alive "$proxy_pid" && stop_entry "$proxy_pid:$(starttime "$proxy_pid")"
}

run_nginx() {
    local dir=$1/nginx t0 t1 old new i start reason="" n exit_s access geo
    if [[ ! -x $NGINX_BIN ]]; then
        write_result "$1" nginx "not available" "$NGINX_BIN missing (apt-get install -y nginx)"
        return 0
    fi
    mkdir -p "$dir/tmp"
    front_port=$(port)
    # deny lines (the default; nginx checks them one by one on each request); geo: the
    # radix-tree map an nginx operator would use for a list this long.
    if [[ $NGINX_LIST == geo ]]; then
        geo="geo \$blocked { default 0; include $work/nginx-geo.conf; }"
        access="if (\$blocked) { return 403; }"
    else
        geo=""
        access="include $work/nginx-deny.conf;"
    fi
    # daemon on, as nginx runs in production: the binary upgrade replaces the master, which
    # a foreground nginx (daemon off, a supervisor's child) is not made for. The pid file,
    # logs and temp paths are private, so a system nginx, if any, is never touched. -e sends
    # the errors from before the config is read here too.
    cat >"$dir/nginx.conf" <<CONF
daemon on;
master_process on;
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log notice;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    $geo
    upstream app { server 127.0.0.1:$up_port; keepalive 32; }
    server {
        listen 127.0.0.1:$front_port;
        $access
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
    local args=(-p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log")
    "$NGINX_BIN" -t "${args[@]}" >"$dir/test.log" 2>&1 ||
        { cat "$dir/test.log" >&2; write_result "$1" nginx failed "nginx -t rejects the config"; return 0; }
    # The binary upgrade re-executes argv[0], so it must be the absolute path.
    "$NGINX_BIN" "${args[@]}" 2>>"$dir/error.log" || { write_result "$1" nginx failed "nginx did not start"; return 0; }
    for _ in $(seq 300); do [[ -s $dir/nginx.pid ]] && break; sleep 0.1; done
    old=$(cat "$dir/nginx.pid" 2>/dev/null || true)
    [[ -n $old ]] && track "$old"
    python3 "$load_py" wait --target "127.0.0.1:$front_port" --timeout 30 >/dev/null ||
        { tail -n 20 "$dir/error.log" >&2; write_result "$1" nginx failed "nginx did not serve within 30 s"; return 0; }
    start_load "$1" "127.0.0.1:$front_port"
    start=$(now_us)
    sleep "$SETTLE"
    for ((i = 1; i <= UPGRADES; i++)); do
        budget_left "$start" || { note "nginx: budget of $METHOD_BUDGET s spent after $((i - 1))"; break; }
        t0=$(now)
        kill -USR2 "$old"
        # The old master renames its pid file to nginx.pid.oldbin and starts the new one,
        # which writes nginx.pid once it has read its config (the 100k list) and taken over
        # the listening sockets.
        new=""
        for _ in $(seq 3000); do
            if [[ -s $dir/nginx.pid.oldbin && -s $dir/nginx.pid ]]; then
                new=$(cat "$dir/nginx.pid" 2>/dev/null || true)
                [[ -n $new && $new != "$old" ]] && alive "$new" && break
                new=""
            fi
            sleep 0.01
        done
        if [[ -z $new ]]; then
            reason="no new master's pid file within 30 s of USR2"
            printf '%d\t%s\t%s\t-1\t-1\tfailed\t%s\n' "$i" "$t0" "$(now)" "$reason" >>"$1/replacements.tsv"
            break
        fi
        track "$new"
        # nginx.pid is written before the new master forks its workers; an operator waits
        # for those before telling the old workers to stop (at most 2 s).
        for _ in $(seq 200); do
            n=$(children "$new" | wc -l)
            ((n >= 2)) && break
            sleep 0.01
        done
        for n in $(children "$new"); do track "$n"; done
        for n in $(children "$old"); do track "$n"; done
        kill -WINCH "$old"
        kill -QUIT "$old"
        t1=$(now)
        exit_s=-1
        if wait_gone "$old" 40; then exit_s=$(secs "$t0" "$(now)"); else note "nginx $i: old master $old still runs 40 s on"; fi
        printf '%d\t%s\t%s\t%s\t%s\tok\tmaster %s -> %s\n' "$i" "$t0" "$t1" "$(secs "$t0" "$t1")" "$exit_s" "$old" "$new" >>"$1/replacements.tsv"
        note "nginx $i: $(secs "$t0" "$t1") s from USR2 to QUIT (master $old -> $new), old exited after ${exit_s} s"
        old=$new
        sleep "$SETTLE"
    done
    stop_load "$1"
    if [[ -n $reason ]]; then write_result "$1" nginx failed "$reason"; else write_result "$1" nginx ok ""; fi
    # Stop the current master (its workers with it) and anything left of old ones.
    for n in $(children "$old"); do track "$n"; done
    alive "$old" && stop_entry "$old:$(starttime "$old")"
}

for method in $METHODS; do
    dir=$work/$method
    mkdir -p "$dir"
    : >"$dir/replacements.tsv"
    note "--- $method: $UPGRADES replacements, $CLIENTS clients at ${RATE}/s each (0: unpaced), ${SETTLE} s between"
    "run_$method" "$dir"
done

mkdir -p "$OUT"
python3 - "$work" "$OUT" "$METHODS" "$UPGRADES" "$CLIENTS" "$RATE" "$SETTLE" "$LIST_SIZE" "$NGINX_LIST" <<'PY'
import json, os, statistics, sys, time
work, out, methods = sys.argv[1], sys.argv[2], sys.argv[3].split()
upgrades, clients, rate, settle, list_size, nginx_list = sys.argv[4:10]
dash = "–"
labels = {
    "upgrade": "ipgate upgrade",
    "stopstart": "stop and start (SIGTERM, ipgate run)",
    "nginx": "nginx binary upgrade (USR2, WINCH, QUIT)",
}
rows, report = [], {
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "cpus": os.cpu_count(),
    "upgrades": int(upgrades), "clients": int(clients), "rate_per_client": float(rate),
    "settle_s": float(settle), "list_size": int(list_size), "nginx_list": nginx_list,
    "methods": {},
}
def ms(v):
    return dash if v is None else f"{v:,.0f} ms" if v >= 100 else f"{v:.1f} ms"
for m in methods:
    d = os.path.join(work, m)
    try:
        result = json.load(open(os.path.join(d, "result.json")))
    except OSError:
        result = {"method": m, "status": "failed", "reason": "no result (the method was cut short)"}
    reps = []
    for line in open(os.path.join(d, "replacements.tsv")):
        f = line.rstrip("\n").split("\t")
        if len(f) < 7:
            continue
        reps.append({"i": int(f[0]), "start": float(f[1]), "end": float(f[2]),
                     "to_serving_s": float(f[3]), "old_exit_s": float(f[4]),
                     "ok": f[5] == "ok", "note": f[6]})
    load = None
    if os.path.exists(os.path.join(d, "load.json")):
        load = json.load(open(os.path.join(d, "load.json")))
    # Failures and waits in a replacement's window (its start to 1 s after the old process
    # exited, or 3 s after the command when that is unknown) against the whole run.
    in_window = None
    if os.path.exists(os.path.join(d, "load.raw")) and reps:
        windows = [(r["start"], r["start"] + (r["old_exit_s"] if r["old_exit_s"] >= 0 else r["to_serving_s"] + 2) + 1)
                   for r in reps]
        fail_in = requests_in = 0
        worst_in = (0.0, None, None)
        for line in open(os.path.join(d, "load.raw")):
            s, w, o = line.split()
            s, w = float(s), float(w)
            if any(a <= s <= b for a, b in windows):
                requests_in += 1
                fail_in += o != "ok"
                if w > worst_in[0]:
                    worst_in = (w, o, s)
        in_window = {"requests": requests_in, "failed": fail_in, "max_wait_ms": round(worst_in[0], 3),
                     "max_wait_outcome": worst_in[1], "max_wait_at": worst_in[2]}
    done = [r for r in reps if r["ok"]]
    entry = dict(result, replacements=reps, load=load, in_replacement_windows=in_window)
    report["methods"][m] = entry
    json.dump(entry, open(os.path.join(out, f"{m}.json"), "w"), indent=1)
    label = labels[m]
    if result["status"] == "not available":
        rows.append(f"| {label} | not available: {result['reason']} | {dash} | {dash} | {dash} | {dash} |")
        continue
    if not load or not done:
        rows.append(f"| {label} | failed: {result['reason'] or 'no replacement done'} | {dash} | {dash} | {dash} | {dash} |")
        continue
    n = len(done)
    failed = load["failed"]
    per = f"{failed / n:.1f} ({failed:,} of {load['requests']:,} requests)"
    # The longest wait of a request started during a replacement; the whole run's if the
    # windows are unknown.
    w = in_window if in_window and in_window["max_wait_outcome"] else \
        {"max_wait_ms": load["max_wait_ms"], "max_wait_outcome": load["max_wait_outcome"]}
    worst = ms(w["max_wait_ms"])
    if w["max_wait_outcome"] not in (None, "ok"):
        worst += f" ({w['max_wait_outcome']})"
    serve = [r["to_serving_s"] * 1000 for r in done]
    serving = f"{ms(statistics.median(serve))}, max {ms(max(serve))}"
    status = "" if result["status"] == "ok" else f" (then failed: {result['reason']})"
    rows.append(f"| {label} | {n}{status} | {per} | {worst} | {ms(load['ok_median_ms'])} | {serving} |")
head = (f"{report['date']}, {report['cpus']} CPUs. {list_size}-entry CIDR block list. Load: {clients} clients,"
        f" a fresh connection per request, {'unpaced' if float(rate) == 0 else f'{float(rate):g} req/s each'},"
        f" 2 s timeout; {settle} s of load before the first replacement and after each."
        f" nginx's list as {'deny lines' if nginx_list == 'deny' else 'a geo map'}.")
table = [head, "",
         "| method | upgrades | failed requests per upgrade | longest new-connection wait | median wait | time to new process serving (median, max) |",
         "| --- | --- | --- | --- | --- | --- |", *rows, ""]
for m, e in report["methods"].items():
    if e.get("load"):
        counts = ", ".join(f"{k} {v:,}" for k, v in e["load"]["counts"].items())
        w = e.get("in_replacement_windows") or {}
        w = {k: f"{v:,}" for k, v in w.items() if k in ("failed", "requests")}
        table.append(f"- {labels[m]}: {counts}. Whole run: longest wait {ms(e['load']['max_wait_ms'])},"
                     f" p99 {ms(e['load']['ok_p99_ms'])}. In the replacement windows:"
                     f" {w.get('failed', dash)} failed of {w.get('requests', dash)}.")
table += ["",
          "Failed requests: all of the run's, over the replacements done. Longest wait: connect + first"
          " byte (or until the failure) of a request started in a replacement's window, from its command"
          " to 1 s after the old process exited. Median wait: the run's successful requests.",
          "Time to new process serving: ipgate upgrade, the CLI's run time; stop and start, from SIGTERM"
          " until a fresh connection got 200 from the new process; nginx, from USR2 until the new master's"
          " pid file and workers exist and the old master has been sent WINCH and QUIT.",
          "Figures compare only within one run on one machine."]
text = "\n".join(table) + "\n"
open(os.path.join(out, "table.md"), "w").write(text)
json.dump(report, open(os.path.join(out, "results.json"), "w"), indent=1)
print(text)
PY
note "results: $OUT"
