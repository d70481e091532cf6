# Registers ipgate with the shared harness (sourced by bench.sh; see run.sh). As the
# harness's own examples/gateway.proxies.sh, with this directory's config template.
# block=close: a blocked client is closed right after accept, before TLS.
# ab.proxies.sh and attack.proxies.sh source this file and add builds with register_ipgate.
IPGATE_HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Each instance gets a random admin token in its own directory.
IPGATE_TOKEN_SETUP='umask 077 && printf %s "$(openssl rand -hex 32)" >@@DIR@@/admin.token'

# register_ipgate NAME BIN [SETUP]: one ipgate build in the harness's slot; SETUP replaces the
# token hook (it must write the token too).
register_ipgate() {
    [[ -x $2 ]] || die "$1: $2 is not an executable (cargo build --release first)"
    register_proxy "$1" \
        "$2 run -c @@CONF@@" \
        "$IPGATE_HARNESS_DIR/ipgate.toml.tmpl" 1 1 \
        block=close \
        health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
        setup="${3:-$IPGATE_TOKEN_SETUP}"
}

register_ipgate ipgate "$IPGATE_BIN"
