# A/B in one run: registers two ipgate builds side by side with the shared harness, so a
# change on the hot path is measured against its baseline in the same interleaved rounds
# (paired ratios), not across runs. Use through benches/harness/ab.sh.
# IPGATE_AB_MORE="name=/path/to/ipgate ..." adds more builds to the same rounds.
source "$(dirname "${BASH_SOURCE[0]}")/ipgate.proxies.sh"      # `ipgate`: the build under test
register_ipgate ipgate_base "$IPGATE_BASELINE_BIN"
for pair in ${IPGATE_AB_MORE:-}; do
    register_ipgate "${pair%%=*}" "${pair#*=}"
done
