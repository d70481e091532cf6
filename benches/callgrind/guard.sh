#!/usr/bin/env bash
# The hot path's regression guard: instructions per proxied request (callgrind, see run.sh),
# in `proxy::handle` and in the whole process, for HTTP/1.1 plain, HTTP/1.1 over TLS and
# HTTP/2 over TLS, against the baseline committed in benches/callgrind/baseline.txt. Fails
# when a figure is more than LIMIT (default 3) percent above its baseline.
#
#   cargo build --release && benches/callgrind/guard.sh                 # ~1.5 minutes
#   benches/callgrind/guard.sh --update     # after a change that is meant to cost more (or
#                                           # less): writes the new figures as the baseline
#
# Instruction counts do not depend on what else the machine does, so the guard needs no
# quiet machine. Run it before merging a change to the request path. It is not in .ci/run:
# the release build it needs takes longer than the two minutes CI has for it.
# Needs valgrind, nginx and h2load (nghttp2-client).
#
# The whole process's count moves by a few percent between runs (the event loop's wake-ups
# depend on timing even under valgrind). So each figure is taken REPEAT (3) times:
# proxy::handle's least count is compared with the baseline's (it repeats to within 1 %), and
# the whole process's least count with the baseline's greatest, so that only a cost above
# the noise fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${BIN:-$ROOT/target/release/ipgate}
BASELINE=${BASELINE:-$ROOT/benches/callgrind/baseline.txt}
LIMIT=${LIMIT:-3}
[[ -x $BIN ]] || { echo "$BIN missing: cargo build --release" >&2; exit 2; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "${REPEAT:-3}"); do
    "$ROOT/benches/callgrind/run.sh" "$BIN" | tee -a "$out"
done
# run.sh prints: binary mode per-request [ratio] per-request-in-handle [ratio]
now=$(awk '$2 ~ /^(h1|h1tls|h2)$/ {
        if (!($2 in lo) || $3 < lo[$2]) lo[$2] = $3
        if (!($2 in hi) || $3 > hi[$2]) hi[$2] = $3
        if (!($2 in h) || $4 < h[$2]) h[$2] = $4
    }
    END {for (m in lo) print m, lo[m], hi[m], h[m]}' "$out" | sort)
if [[ ${1:-} == --update ]]; then
    {
        echo "# mode  whole-process-least  whole-process-greatest  proxy::handle-least"
        echo "# (instructions per request over REPEAT runs: benches/callgrind/guard.sh --update)"
        echo "$now"
    } >"$BASELINE"
    echo "baseline written: $BASELINE"
    exit 0
fi
[[ -f $BASELINE ]] || { echo "no baseline: benches/callgrind/guard.sh --update" >&2; exit 2; }
echo "$now" | python3 -c '
import sys
base = {}
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip():
        continue
    mode, lo, hi, handle = line.split()
    base[mode] = (int(lo), int(hi), int(handle))
limit = float(sys.argv[2])
failed = False
for line in sys.stdin:
    mode, lo, hi, handle = line.split()
    blo, bhi, bh = base[mode]
    for name, v, b in (("whole process", int(lo), bhi), ("proxy::handle", int(handle), bh)):
        change = (v / b - 1) * 100
        mark = "ok"
        if change > limit:
            mark = "OVER +%g %%" % limit
            failed = True
        print(f"{mode:6} {name:14} {v:8} vs {b:8}  {change:+6.2f} %  {mark}")
sys.exit(1 if failed else 0)
' "$BASELINE" "$LIMIT"
