# attack_tls with the kernel's help (through attack.sh, inside a network namespace):
# registers, beside the build under test (`ipgate`, as ipgate.proxies.sh), `ipgate_fw`: the
# same build and config plus a [firewall] on the instance's own two ports with
# `verdict = "reject"` and `connection_cap = true`, so the listed flooder's SYNs are reset by
# nftables and a client over its connection cap has its SYNs dropped, before ipgate's accept
# queue. Needs root (CAP_NET_ADMIN) and nftables.
#
# Only the `base` instance (the one ka_tls and attack_tls measure) gets the [firewall]: the
# harness checks that its `blocked` instance (which lists 127.0.0.1 itself) closes
# connections after accept, and a kernel reset at connect is "refused" to that check. The
# setup hook tells the two apart by their deny list. Each table is named after its TLS port
# and removed when the instance stops.
#
# With IPGATE_BASELINE_BIN set, a third row `ipgate_base` runs that build as `ipgate` runs
# this one (no firewall): the "before" of a change, in the same rounds.
IPGATE_HARNESS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ -x $IPGATE_BIN ]] || die "IPGATE_BIN=$IPGATE_BIN is not an executable (cargo build --release first)"
command -v nft >/dev/null || die "nft missing: apt-get install -y nftables"
token='umask 077 && printf %s "$(openssl rand -hex 32)" >@@DIR@@/admin.token'
firewall='grep -q -- "-blocked.lst" @@CONF@@ || printf "\n[firewall]\nports = [@@PLAIN_PORT@@, @@TLS_PORT@@]\ntable = \"ipgate_@@TLS_PORT@@\"\nverdict = \"reject\"\nconnection_cap = true\n" >>@@CONF@@'
for pair in "ipgate:$token" "ipgate_fw:$token && { $firewall; }"; do
    register_proxy "${pair%%:*}" \
        "$IPGATE_BIN run -c @@CONF@@" \
        "$IPGATE_HARNESS_DIR/ipgate.toml.tmpl" 1 1 \
        block=close \
        scenarios="ka_tls attack_tls" \
        health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
        setup="${pair#*:}"
done
if [[ -n ${IPGATE_BASELINE_BIN:-} ]]; then
    [[ -x $IPGATE_BASELINE_BIN ]] || die "IPGATE_BASELINE_BIN=$IPGATE_BASELINE_BIN is not an executable"
    register_proxy ipgate_base \
        "$IPGATE_BASELINE_BIN run -c @@CONF@@" \
        "$IPGATE_HARNESS_DIR/ipgate.toml.tmpl" 1 1 \
        block=close \
        scenarios="ka_tls attack_tls" \
        health='http://@@LISTEN_ADDR@@:@@ADMIN_PORT@@/healthz' \
        setup="$token"
fi
