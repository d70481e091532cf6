#!/usr/bin/env python3
"""Writes the small MaxMind-format databases tests/geo.rs uses, with Python's mmdb-writer
(pip install mmdb-writer netaddr). Check one with Debian's mmdblookup:
    mmdblookup --file asn.mmdb --ip 127.0.10.5 autonomous_system_number
Run it here to rebuild them: python3 make.py
"""
from mmdb_writer import MMDBWriter, MmdbU32
from netaddr import IPSet


def asn_db(path, networks):
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-ASN",
                   description={"en": "ipgate test ASN database"})
    for net, asn, org in networks:
        w.insert_network(IPSet([net]), {"autonomous_system_number": MmdbU32(asn),
                                         "autonomous_system_organization": org})
    w.to_db_file(path)


def country_db(path, networks):
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country",
                   description={"en": "ipgate test country database"})
    for net, code in networks:
        w.insert_network(IPSet([net]), {"country": {"iso_code": code}})
    w.to_db_file(path)


# 127.0.10.0/24: a cloud to block; 127.0.13.0/24: crawlers to challenge; 2001:db8:64::/48 too.
asn_db("asn.mmdb", [
    ("127.0.10.0/24", 64500, "Test Cloud"),
    ("127.0.13.0/24", 64502, "Test Crawlers"),
    ("2001:db8:64::/48", 64500, "Test Cloud"),
])
# The next version: the cloud grew into 127.0.15.0/24.
asn_db("asn-next.mmdb", [
    ("127.0.10.0/24", 64500, "Test Cloud"),
    ("127.0.13.0/24", 64502, "Test Crawlers"),
    ("127.0.15.0/24", 64500, "Test Cloud"),
    ("2001:db8:64::/48", 64500, "Test Cloud"),
])
country_db("country.mmdb", [("127.0.11.0/24", "NL"), ("127.0.12.0/24", "DE")])

# For the policy bench (benches/policy.rs): 10,000 networks of 2,000 autonomous systems, as
# a real ASN database holds hundreds of thousands. Deterministic: the same file every run.
asn_db("asn-10k.mmdb", [
    (f"{10 + i // 65536}.{(i // 256) % 256}.{i % 256}.0/24", 64512 + i % 2000, f"AS {i % 2000}")
    for i in range(0, 10000 * 7, 7)
])
