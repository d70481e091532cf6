# attack_tls with the kernel's help (through attack.sh, inside a network namespace):
# registers, beside the build under test (`ipgate`, as ipgate.proxies.sh), `ipgate_fw`: the
# same build and config plus a [firewall] on the instance's own two ports with
# `verdict = "reject"` and `connection_cap = true`, so the listed flooder's SYNs are reset by
# nftables and a client over its connection cap has its SYNs dropped, before ipgate's accept
# queue. Needs root (CAP_NET_ADMIN) and nftables.
#
# Each instance owns a table named after its TLS port, removed when it stops.
IPGATE_HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -x $IPGATE_BIN ]] || die "IPGATE_BIN=$IPGATE_BIN is not an executable (cargo build --release first)"
command -v nft >/dev/null || die "nft missing: apt-get install -y nftables"
mkdir -p "$OUT"
IPGATE_FW_TMPL=$OUT/ipgate-fw.toml.tmpl
{
    cat "$IPGATE_HARNESS_DIR/ipgate.toml.tmpl"
    printf '\n[firewall]\nports = [@@PLAIN_PORT@@, @@TLS_PORT@@]\n'
    printf 'table = "ipgate_@@TLS_PORT@@"\nverdict = "reject"\nconnection_cap = true\n'
} >"$IPGATE_FW_TMPL"
for pair in "ipgate:$IPGATE_HARNESS_DIR/ipgate.toml.tmpl" "ipgate_fw:$IPGATE_FW_TMPL"; do
    register_proxy "${pair%%:*}" \
        "$IPGATE_BIN run -c @@CONF@@" \
        "${pair#*:}" 1 1 \
        block=close \
        scenarios="ka_tls attack_tls" \
        health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
        setup='umask 077 && printf %s "$(openssl rand -hex 32)" >@@DIR@@/admin.token'
done
