#!/usr/bin/env bash
# Side-by-side load benchmark: ipgate against nginx and HAProxy doing the same work (TLS
# termination, the same 100k-CIDR deny list, a per-client rate limit that never fires),
# driven by the shared harness in ../shared/bench, in interleaved rounds (see its README).
#
#   cargo build --release
#   benches/harness/run.sh                       # 5 rounds x 4 s, every scenario (~10 min)
#   ROUNDS=1 DURATION=2 LOAD_REPS=1 benches/harness/run.sh     # smoke test (~2 min)
#   SCENARIOS="ka_plain h2_tls" benches/harness/run.sh         # a subset
#
# Needs: apt-get install -y nginx haproxy wrk nghttp2-client openssl gcc libssl-dev
# The harness is copied to target/bench-harness (it writes its inputs and flood client
# there); results go to target/bench-results/<date-time>/summary.txt (OUT= to change).
# Every load run ends by itself; traffic goes to 127.0.0.1 only; every process the harness
# starts is stopped on exit. Other knobs (PIN_MODES, CONNS, ...): ../shared/bench/README.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
WORK=$ROOT/target/bench-harness
[[ -x $SHARED/bench.sh ]] || { echo "no harness at $SHARED (set SHARED_BENCH)" >&2; exit 1; }
mkdir -p "$WORK"
cp -r "$SHARED"/. "$WORK"/
chmod -R u+w "$WORK"
export IPGATE_BIN=${IPGATE_BIN:-$ROOT/target/release/ipgate}
[[ -x $IPGATE_BIN ]] || { echo "$IPGATE_BIN missing: cargo build --release" >&2; exit 1; }
export EXTRA_PROXIES="${EXTRA_PROXIES_OVERRIDE:-$ROOT/benches/harness/ipgate.proxies.sh}"
export ROUNDS=${ROUNDS:-5}
export OUT=${OUT:-$ROOT/target/bench-results/$(date +%Y%m%d-%H%M%S)}
echo "results: $OUT" >&2
exec "$WORK/bench.sh"
