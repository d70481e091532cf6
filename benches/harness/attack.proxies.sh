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
source "$(dirname "${BASH_SOURCE[0]}")/ipgate.proxies.sh"
command -v nft >/dev/null || die "nft missing: apt-get install -y nftables"
firewall='grep -q -- "-blocked.lst" @@CONF@@ || printf "\n[firewall]\nports = [@@PLAIN_PORT@@, @@TLS_PORT@@]\ntable = \"ipgate_@@TLS_PORT@@\"\nverdict = \"reject\"\nconnection_cap = true\n" >>@@CONF@@'
register_ipgate ipgate_fw "$IPGATE_BIN" "$IPGATE_TOKEN_SETUP && { $firewall; }"
if [[ -n ${IPGATE_BASELINE_BIN:-} ]]; then
    register_ipgate ipgate_base "$IPGATE_BASELINE_BIN"
fi
