#!/usr/bin/env python3
"""Markdown tables of one shared-harness run, for docs/benchmarks.md.

    python3 benches/harness/table.py target/bench-results/<run> [BASELINE]

BASELINE (default `ipgate_base`) is the build the other ipgate builds are compared with.

Reads the run's results.tsv (one row per load run) and load.tsv (list-load probes). Every
cell is the median over rounds with min-max; ratios are paired per round (the runs of one
round are seconds apart) before the median is taken, as the harness's own summary does.
"""

import collections
import csv
import statistics
import sys

SCENARIOS = ["ka_plain", "ka_tls", "h2_tls", "flood_plain", "flood_tls"]
ANCHORS = ["haproxy", "haproxy-tcp", "nginx"]


def fmt(values, digits=1):
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main(run, baseline="ipgate_base"):
    rows = list(csv.DictReader(open(f"{run}/results.tsv"), delimiter="\t"))
    by = collections.defaultdict(dict)  # (scenario, round) -> target -> row
    for r in rows:
        if r["mode"] == "unpinned":
            by[(r["scenario"], r["round"])][r["target"]] = r
    rounds = sorted({k[1] for k in by}, key=int)
    # Every ipgate build of the run (`ipgate`, `ipgate_base`, any IPGATE_AB_MORE), then the
    # anchors; each build other than the baseline gets a paired ratio to it.
    builds = sorted({r["target"] for r in rows if r["target"].startswith("ipgate")})
    proxies = builds + ANCHORS
    print(f"{len(rounds)} rounds; medians (min–max) over rounds; ratios paired per round.\n")
    print("| scenario | proxy | req/s (floods: attempts/s) | p50 us (h2: mean) | proxy CPU us per request"
          " (floods: per attempt) | CPU x HAProxy (floods: x haproxy-tcp) | CPU x nginx |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for scen in SCENARIOS:
        anchor = "haproxy-tcp" if scen.startswith("flood") else "haproxy"
        for proxy in proxies:
            rps, p50, cpu, x_anchor, x_nginx = [], [], [], [], []
            for rnd in rounds:
                runs = by.get((scen, rnd), {})
                r = runs.get(proxy)
                if not r or r["proxy_cpu_us_per_req"] == "-":
                    continue
                rps.append(float(r["rps"]))
                p50.append(float(r["p50_us"]))
                c = float(r["proxy_cpu_us_per_req"])
                cpu.append(c)
                a, n = runs.get(anchor), runs.get("nginx")
                if a and proxy != anchor:
                    x_anchor.append(c / float(a["proxy_cpu_us_per_req"]))
                if n and proxy != "nginx":
                    x_nginx.append(c / float(n["proxy_cpu_us_per_req"]))
            if not cpu:
                continue
            print(f"| {scen} | {proxy} | {fmt(rps, 0)} | {fmt(p50, 0)} | {fmt(cpu)} |"
                  f" {fmt(x_anchor, 2)} | {fmt(x_nginx, 2)} |")
        # An A/B run (benches/harness/ab.sh): each build against the baseline.
        for build in (b for b in builds if b != baseline):
            ab = []
            for rnd in rounds:
                runs = by.get((scen, rnd), {})
                new, base = runs.get(build), runs.get(baseline)
                if new and base and "-" not in (new["proxy_cpu_us_per_req"], base["proxy_cpu_us_per_req"]):
                    ab.append(float(new["proxy_cpu_us_per_req"]) / float(base["proxy_cpu_us_per_req"]))
            if ab:
                print(f"| {scen} | {build} x {baseline} (CPU per request) | | | {fmt(ab, 3)} | | |")

    load = list(csv.DictReader(open(f"{run}/load.tsv"), delimiter="\t"))
    print("\n| proxy | list load s (ready with 100k list − ready empty) | PSS empty MiB |"
          " PSS with 100k list MiB | list cost PSS MiB |")
    print("| --- | --- | --- | --- | --- |")
    for proxy in proxies:
        empty = [r for r in load if r["proxy"] == proxy and r["list"] == "empty"]
        full = [r for r in load if r["proxy"] == proxy and r["list"] == "full"]
        if not empty or not full:
            continue
        med = lambda rs, k: statistics.median(float(r[k]) for r in rs)
        print(f"| {proxy} | {med(full, 'ready_s') - med(empty, 'ready_s'):.3f} |"
              f" {med(empty, 'pss_kb') / 1024:.1f} | {med(full, 'pss_kb') / 1024:.1f} |"
              f" {(med(full, 'pss_kb') - med(empty, 'pss_kb')) / 1024:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])
