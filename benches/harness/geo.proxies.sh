# A/B with lists by ASN: `ipgate` (the build under test) runs with a 10,000-network ASN
# database ([geo] asn_database) and a block list by ASN, `ipgate_base` (a build from before
# lists by ASN) with the plain template, in the same interleaved rounds. The load's address
# (127.0.0.1) is in the database, under an ASN the list does not hold: each decision looks it
# up and passes, as for a visitor from a network nobody blocks. Use through geo.sh.
source "$(dirname "${BASH_SOURCE[0]}")/ipgate.proxies.sh"
: "${IPGATE_GEO_DB:?set by geo.sh}"
register_proxy ipgate_geo \
    "$IPGATE_BIN run -c @@CONF@@" \
    "$IPGATE_HARNESS_DIR/ipgate-geo.toml.tmpl" 1 1 \
    block=close \
    health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
    setup="$IPGATE_TOKEN_SETUP && cp $IPGATE_GEO_DB @@DIR@@/asn.mmdb"
register_ipgate ipgate_base "$IPGATE_BASELINE_BIN"
