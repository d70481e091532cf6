#!/usr/bin/env bash
# attack_tls with nftables' help, inside a network namespace of its own (its loopback only;
# the host's firewall is never touched): the shared harness's ka_tls and attack_tls with
# ipgate as configured for the harness (`ipgate`) and the same plus a [firewall] on its own
# ports (`ipgate_fw`: listed addresses reset by the kernel, per-client connection cap in the
# kernel), beside nginx, haproxy and haproxy-tcp. Needs root.
#
#   cargo build --release && benches/harness/attack.sh        # ROUNDS=3 (~3 min)
#   ROUNDS=7 IPGATE_BASELINE_BIN=/tmp/base/target/release/ipgate benches/harness/attack.sh
#                                    # + a baseline build in the same rounds (~7 min)
#
# Results: target/bench-results/<date-time>/summary.txt, as run.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[[ $(id -u) == 0 ]] || { echo "needs root (a network namespace, nftables)" >&2; exit 1; }
command -v nft >/dev/null || { echo "nft missing: apt-get install -y nftables" >&2; exit 1; }
ns=ipgate-bench-$$
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip -n "$ns" link set lo up
export SCENARIOS=${SCENARIOS:-ka_tls attack_tls} ROUNDS=${ROUNDS:-3} LOAD_REPS=${LOAD_REPS:-0}
export EXTRA_PROXIES_OVERRIDE=$ROOT/benches/harness/attack.proxies.sh
ip netns exec "$ns" "$ROOT/benches/harness/run.sh"
