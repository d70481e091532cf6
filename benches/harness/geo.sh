#!/usr/bin/env bash
# The hot path with lists by ASN, against a build from before them, in the same rounds
# beside nginx and HAProxy: rows `ipgate` (this build, plain template), `ipgate_geo` (this
# build with a 10,000-network ASN database and a block list by ASN) and `ipgate_base`.
#
#   git worktree add /tmp/ipgate-base <baseline commit> && (cd /tmp/ipgate-base && cargo build --release)
#   cargo build --release
#   IPGATE_BASELINE_BIN=/tmp/ipgate-base/target/release/ipgate benches/harness/geo.sh
#   python3 benches/harness/table.py target/bench-results/<run>
#
# Needs Python's mmdb-writer (pip install mmdb-writer) to write the database into target/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
: "${IPGATE_BASELINE_BIN:?set IPGATE_BASELINE_BIN to the baseline build}"
export IPGATE_BASELINE_BIN
export IPGATE_GEO_DB=$ROOT/target/bench-asn-10k.mmdb
python3 - "$IPGATE_GEO_DB" <<'PY'
import sys
from mmdb_writer import MMDBWriter, MmdbU32
from netaddr import IPSet
w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN",
               description={"en": "ipgate harness ASN database"})
# 9,999 /24s spread over 10.0.0.0/8..11.x (ASNs 64512..66511), and 127.0.0.0/24 (AS 65535).
for i in range(0, 9999 * 7, 7):
    net = f"{10 + i // 65536}.{(i // 256) % 256}.{i % 256}.0/24"
    w.insert_network(IPSet([net]), {"autonomous_system_number": MmdbU32(64512 + i % 2000),
                                    "autonomous_system_organization": f"AS {i % 2000}"})
w.insert_network(IPSet(["127.0.0.0/24"]), {"autonomous_system_number": MmdbU32(65535),
                                           "autonomous_system_organization": "loopback"})
w.to_db_file(sys.argv[1])
PY
export EXTRA_PROXIES_OVERRIDE="$ROOT/benches/harness/geo.proxies.sh"
exec "$ROOT/benches/harness/run.sh"
