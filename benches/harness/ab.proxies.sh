# A/B in one run: registers two ipgate builds side by side with the shared harness, so a
# change on the hot path is measured against its baseline in the same interleaved rounds
# (paired ratios), not across runs. Use through benches/harness/ab.sh.
# IPGATE_AB_MORE="name=/path/to/ipgate ..." adds more builds to the same rounds.
IPGATE_HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for v in IPGATE_BIN IPGATE_BASELINE_BIN; do
    [[ -x ${!v} ]] || die "$v=${!v} is not an executable"
done
for pair in "ipgate_base=$IPGATE_BASELINE_BIN" "ipgate=$IPGATE_BIN" ${IPGATE_AB_MORE:-}; do
    [[ -x ${pair#*=} ]] || die "${pair#*=} is not an executable"
    register_proxy "${pair%%=*}" \
        "${pair#*=} run -c @@CONF@@" \
        "$IPGATE_HARNESS_DIR/ipgate.toml.tmpl" 1 1 \
        block=close \
        health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
        setup='umask 077 && printf %s "$(openssl rand -hex 32)" >@@DIR@@/admin.token'
done
