#!/usr/bin/env python3
"""Whole-proxy load benchmark on loopback: requests per second and ipgate's own CPU time per
request, through ipgate versus straight to the backend, in interleaved rounds of one run.

    cargo build --release
    python3 benches/load/run.py                  # 5 rounds x 5 s (~2 min)
    ROUNDS=3 DURATION=3 python3 benches/load/run.py

ipgate runs with a 100k-CIDR block list (as in ../shared/bench) that never matches the
load's 127.0.0.1 and a rate limit far above reach, so every request pays for the decision
and the limiter. Any status but 200 stops the run. Needs wrk and nginx (the backend: one worker answering `200 ok`); h2load (nghttp2-client)
adds an HTTP/2 row. Debian: apt-get install -y wrk nginx nghttp2-client.
Every process started is stopped at the end; every load run stops by itself (wrk -d).
Traffic goes to 127.0.0.1 only. For the side-by-side run against nginx and HAProxy as
proxies, see the shared load harness (docs/benchmarks.md).
"""

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROUNDS = int(os.environ.get("ROUNDS", "5"))
DURATION = int(os.environ.get("DURATION", "5"))
CONNS = int(os.environ.get("CONNS", "64"))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IPGATE = os.environ.get("IPGATE_BIN", os.path.join(ROOT, "target/release/ipgate"))
BACKEND, PLAIN, TLS, ADMIN = 18080, 18101, 18102, 18109
CLK = os.sysconf("SC_CLK_TCK")

procs = []


def stop_all(*_):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def cpu_seconds(pid):
    """utime + stime of every thread of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def tree_cpu_seconds(pid):
    """CPU seconds of a process and its direct children (nginx master + workers)."""
    total = cpu_seconds(pid)
    for task in os.listdir("/proc"):
        if task.isdigit():
            try:
                with open(f"/proc/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    total += (int(fields[11]) + int(fields[12])) / CLK
            except (OSError, IndexError, ValueError):
                pass
    return total


def wait_http(url, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer 200 within {timeout}s")


def run_wrk(url):
    out = subprocess.run(
        ["timeout", str(DURATION + 30), "wrk", "-t1", f"-c{CONNS}", f"-d{DURATION}s", "--latency", url],
        capture_output=True, text=True, check=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}
    return reqs, int(errors.group(1)) if errors else 0, float(p50.group(1)) * scale[p50.group(2)]


def run_h2load(url):
    out = subprocess.run(
        ["timeout", str(DURATION + 30), "h2load", "-t1", f"-c{CONNS}", "-m10", f"-D{DURATION}", url],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    done, ok = int(m.group(1)), int(m.group(2))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}
    return done, done - ok, float(mean.group(1)) * scale[mean.group(2)]


def main():
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: apt-get install -y wrk nginx nghttp2-client")
    if not os.access(IPGATE, os.X_OK):
        sys.exit(f"{IPGATE} missing: cargo build --release")
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    work = tempfile.mkdtemp(prefix="ipgate-load-")
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(f"""worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx.err;
events {{ worker_connections 4096; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{BACKEND}; location / {{ return 200 "ok"; }} }} }}
""")
    # The shared harness's deny list: 100k IPv4 CIDRs (half /32, half /16../28), never 127/8.
    import random
    rng, seen = random.Random(42), set()
    while len(seen) < 100_000:
        addr = rng.getrandbits(32)
        if (addr >> 24) in (0, 127) or (addr >> 24) >= 224:
            continue
        plen = 32 if rng.getrandbits(1) else 16 + rng.randrange(13)
        seen.add(f"{addr >> 24}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}/{plen}")
    with open(f"{work}/deny.txt", "w") as f:
        f.write("\n".join(sorted(seen)) + "\n")
    with open(f"{work}/ipgate.toml", "w") as f:
        f.write(f"""[gateway]
state_dir = "state"
[[listener]]
addr = "127.0.0.1:{PLAIN}"
[[listener]]
addr = "127.0.0.1:{TLS}"
tls = true
[tls]
self_signed = true
[admin]
addr = "127.0.0.1:{ADMIN}"
[rate_limit]                   # evaluated on every request, never reached (as in ../shared/bench)
requests_per_second = 1000000
burst = 1000000
[lists.deny]
action = "block"
files = ["deny.txt"]
[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:{BACKEND}"
""")
    devnull = open(os.devnull, "w")
    backend = subprocess.Popen(["nginx", "-c", f"{work}/nginx.conf", "-g", "daemon off;"],
                               stdout=devnull, stderr=devnull)
    procs.append(backend)
    # Access log on (the default), written to /dev/null: its cost is part of the figure.
    gw = subprocess.Popen([IPGATE, "run", "-c", f"{work}/ipgate.toml"], stdout=devnull,
                          stderr=open(f"{work}/ipgate.err", "w"))
    procs.append(gw)
    try:
        wait_http(f"http://127.0.0.1:{BACKEND}/")
        wait_http(f"http://127.0.0.1:{PLAIN}/")
        targets = [
            ("ka_plain", "direct", lambda: run_wrk(f"http://127.0.0.1:{BACKEND}/")),
            ("ka_plain", "ipgate", lambda: run_wrk(f"http://127.0.0.1:{PLAIN}/")),
            ("ka_tls", "ipgate", lambda: run_wrk(f"https://127.0.0.1:{TLS}/")),
        ]
        if shutil.which("h2load"):
            targets.append(("h2_tls", "ipgate", lambda: run_h2load(f"https://127.0.0.1:{TLS}/")))
        results = {(s, t): [] for s, t, _ in targets}
        for r in range(ROUNDS):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for scenario, target, fn in order:
                c0, b0 = cpu_seconds(gw.pid), tree_cpu_seconds(backend.pid)
                t0 = time.time()
                reqs, bad, p50 = fn()
                elapsed = time.time() - t0
                c1, b1 = cpu_seconds(gw.pid), tree_cpu_seconds(backend.pid)
                us = (c1 - c0) * 1e6 / reqs if target == "ipgate" and reqs else None
                backend_us = (b1 - b0) * 1e6 / reqs if reqs else 0
                server_us = backend_us + (us or 0)
                if bad:
                    sys.exit(f"{scenario} {target}: {bad} unexpected statuses; the figures would be wrong")
                results[(scenario, target)].append((reqs / elapsed, us, p50, bad, server_us))
                print(f"round {r + 1} {scenario:9} {target:7} {reqs / elapsed:9.0f} req/s"
                      f"  p50 {p50:.2f} ms  bad {bad}  server CPU {server_us:.1f} us/req"
                      + (f"  ipgate CPU {us:.1f} us/req" if us else ""), flush=True)
        direct = [x[0] for x in results[("ka_plain", "direct")]]
        print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {ROUNDS} rounds x {DURATION}s,"
              f" -c{CONNS}; medians (min-max); ratio x direct is paired per round\n")
        print("| scenario | target | req/s | x direct | p50 ms (h2: mean) | ipgate CPU us/req"
              " | server CPU us/req (ipgate + backend) | bad |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (scenario, target), rows in results.items():
            rps = [x[0] for x in rows]
            ratio = [a / b for a, b in zip(rps, direct)]
            us = [x[1] for x in rows if x[1] is not None]
            fmt = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
            print(f"| {scenario} | {target} | {statistics.median(rps):.0f} ({min(rps):.0f}-{max(rps):.0f})"
                  f" | {fmt(ratio)} | {statistics.median([x[2] for x in rows]):.2f}"
                  f" | {fmt(us) if us else '-'} | {fmt([x[4] for x in rows])} | {sum(x[3] for x in rows)} |")
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
