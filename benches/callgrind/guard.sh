#!/usr/bin/env bash
# The hot path's regression guard: instructions per proxied request (callgrind, see run.sh),
# in `proxy::handle` and in the whole process, for HTTP/1.1 plain, HTTP/1.1 over TLS and
# HTTP/2 over TLS, against the baseline committed in benches/callgrind/baseline.txt. Fails
# when a figure is more than LIMIT (default 3) percent above its baseline.
#
#   cargo build --release && benches/callgrind/guard.sh                 # ~3 minutes
#   benches/callgrind/guard.sh --update     # after a change that is meant to cost more (or
#                                           # less): writes the new figures as the baseline
#
# Instruction counts repeat for the same binary whatever else the machine does, so the guard
# does not need a quiet machine. Run it before merging a change to the request path (it is
# not in .ci/run: the release build alone takes longer than CI's budget for it).
# Needs valgrind, nginx and h2load (nghttp2-client).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/ipgate}
BASELINE=$ROOT/benches/callgrind/baseline.txt
LIMIT=${LIMIT:-3}
[[ -x $BIN ]] || { echo "$BIN missing: cargo build --release" >&2; exit 2; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$ROOT/benches/callgrind/run.sh" "$BIN" | tee "$out"
# run.sh prints: binary mode per-request [ratio] per-request-in-handle [ratio]
now=$(awk 'NR > 1 {print $2, $3, $4}' "$out")
if [[ ${1:-} == --update ]]; then
    {
        echo "# mode  whole-process  proxy::handle   (instructions per request, benches/callgrind/guard.sh --update)"
        echo "$now"
    } >"$BASELINE"
    echo "baseline written: $BASELINE"
    exit 0
fi
[[ -f $BASELINE ]] || { echo "no baseline: benches/callgrind/guard.sh --update" >&2; exit 2; }
python3 - "$BASELINE" "$LIMIT" <<EOF
import sys
base = {}
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip():
        continue
    mode, whole, handle = line.split()
    base[mode] = (int(whole), int(handle))
limit = float(sys.argv[2])
now = {}
for line in """$now""".splitlines():
    mode, whole, handle = line.split()
    now[mode] = (int(whole), int(handle))
failed = False
for mode, (w, h) in sorted(now.items()):
    bw, bh = base[mode]
    for name, v, b in (("whole process", w, bw), ("proxy::handle", h, bh)):
        change = (v / b - 1) * 100
        mark = "ok"
        if change > limit:
            mark = f"OVER +{limit:g} %"
            failed = True
        print(f"{mode:6} {name:14} {v:8} vs {b:8}  {change:+6.2f} %  {mark}")
sys.exit(1 if failed else 0)
EOF
