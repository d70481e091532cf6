#!/usr/bin/env bash
# Before/after on the hot path: the shared harness with two ipgate builds in the same
# interleaved rounds beside nginx and HAProxy (paired per round, so machine noise cancels).
#
#   git worktree add /tmp/ipgate-base <baseline commit> && (cd /tmp/ipgate-base && cargo build --release)
#   cargo build --release
#   IPGATE_BASELINE_BIN=/tmp/ipgate-base/target/release/ipgate benches/harness/ab.sh
#   python3 benches/harness/table.py target/bench-results/<run>
#   IPGATE_AB_MORE="other=/path/to/ipgate" ...ab.sh     # more builds in the same rounds
#
# The rows `ipgate_base` and `ipgate` are the baseline and the build under test.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${IPGATE_BASELINE_BIN:?set IPGATE_BASELINE_BIN to the baseline build}"
export IPGATE_BASELINE_BIN
export EXTRA_PROXIES_OVERRIDE="$ROOT/benches/harness/ab.proxies.sh"
exec "$ROOT/benches/harness/run.sh"
