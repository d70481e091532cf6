# Registers ipgate with the shared harness (sourced by bench.sh; see run.sh). As the
# harness's own examples/gateway.proxies.sh, with this directory's config template.
# block=close: a blocked client is closed right after accept, before TLS (SPEC decision 3).
IPGATE_HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -x $IPGATE_BIN ]] || die "IPGATE_BIN=$IPGATE_BIN is not an executable (cargo build --release first)"
register_proxy ipgate \
    "$IPGATE_BIN run -c @@CONF@@" \
    "$IPGATE_HARNESS_DIR/ipgate.toml.tmpl" 1 1 \
    block=close \
    health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
    setup='umask 077 && printf %s "$(openssl rand -hex 32)" >@@DIR@@/admin.token'
