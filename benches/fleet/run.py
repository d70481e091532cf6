#!/usr/bin/env python3
"""Fleet benchmark: three ipgate processes sharing bans through one redis-server,
all on loopback, every process started and stopped here, bounded in time (~1 minute).

    cargo build --release
    python3 benches/fleet/run.py            # RATE=1000 SECONDS=10 GATEWAYS=3 by default

Reports:
- propagation: from the moment a ban is acknowledged (201) by one gateway to the moment
  another gateway enforces it (its lookup says "block"), p50 / p99 / max, quiet and under load;
- throughput: bans per second the fleet takes (spread over the gateways, each acknowledged
  only once durable locally) while the propagation of sampled bans is measured.

Needs redis-server (Debian package) and the release binary. Nothing but 127.0.0.1 is used.
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("IPGATE_BIN", os.path.join(ROOT, "target/release/ipgate"))
RATE = int(os.environ.get("RATE", "1000"))
SECONDS = float(os.environ.get("SECONDS", "10"))
GATEWAYS = int(os.environ.get("GATEWAYS", "3"))
SAMPLES = int(os.environ.get("SAMPLES", "200"))

procs = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def start_redis(port):
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    procs.append(p)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit("redis-server did not start")


CONFIG = """
[gateway]
state_dir = "state"
workers = 1
[[listener]]
addr = "127.0.0.1:0"
tls = false
[admin]
addr = "127.0.0.1:0"
token_file = "admin.token"
[log]
access = "off"
[privacy]
max_retention = "1h"
[fleet]
redis = "redis://127.0.0.1:{port}/0"
gateway_id = "g{i}"
[demo_upstream]
addr = "127.0.0.1:0"
[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:9"
"""


class Gateway:
    def __init__(self, work, i, redis_port):
        self.dir = os.path.join(work, f"g{i}")
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "ipgate.toml"), "w") as f:
            f.write(CONFIG.format(port=redis_port, i=i))
        self.log = open(os.path.join(self.dir, "log"), "w+")
        self.proc = subprocess.Popen([BIN, "run", "-c", os.path.join(self.dir, "ipgate.toml")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        procs.append(self.proc)
        self.admin = None
        for _ in range(300):
            self.log.seek(0)
            text = self.log.read()
            m = re.search(r"admin listening addr=([0-9.]+):(\d+)", text)
            if m and "fleet: connected" in text:
                self.admin = (m.group(1), int(m.group(2)))
                break
            time.sleep(0.02)
        if not self.admin:
            self.log.seek(0)
            sys.exit("gateway did not start:\n" + self.log.read())
        with open(os.path.join(self.dir, "admin.token")) as f:
            self.token = f.read().strip()

    def connect(self):
        return http.client.HTTPConnection(*self.admin, timeout=10)

    def call(self, con, method, path, body=None):
        headers = {"Authorization": f"Bearer {self.token}"}
        data = json.dumps(body) if body is not None else None
        con.request(method, path, body=data, headers=headers)
        r = con.getresponse()
        out = r.read()
        return r.status, out


def ip(n):
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def propagation(gws, first, count, spacing):
    """Bans `count` addresses one by one on gateway k % n; for each, the time from its 201
    to its enforcement on the next gateway."""
    cons = [g.connect() for g in gws]
    times = []
    for k in range(count):
        n = first + k
        src, dst = k % len(gws), (k + 1) % len(gws)
        status, _ = gws[src].call(cons[src], "POST", "/v1/entries",
                                  {"target": ip(n), "action": "block", "ttl": "10m"})
        acked = time.perf_counter()
        assert status == 201, status
        while True:
            _, out = gws[dst].call(cons[dst], "GET", f"/v1/ips/{ip(n)}")
            if json.loads(out)["decision"] == "block":
                times.append(time.perf_counter() - acked)
                break
            if time.perf_counter() - acked > 5:
                times.append(float("inf"))
                break
        time.sleep(spacing)
    return times


def load(gws, first, rate, seconds, done):
    """Bans at `rate` per second in all, spread over the gateways, from 8 threads each."""
    per_thread = rate / (8 * len(gws))
    counts = []
    threads = []

    def worker(g, base):
        con = g.connect()
        sent = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            due = start + sent / per_thread
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            status, _ = g.call(con, "POST", "/v1/entries",
                               {"target": ip(base + sent), "action": "block", "ttl": "10m"})
            if status == 201:
                sent += 1
        counts.append(sent)

    for gi, g in enumerate(gws):
        for t in range(8):
            base = first + (gi * 8 + t) * 1_000_000 // 64
            th = threading.Thread(target=worker, args=(g, base))
            th.start()
            threads.append(th)
    start = time.perf_counter()
    for th in threads:
        th.join()
    done.append((sum(counts), time.perf_counter() - start))


def summary(name, times):
    ms = sorted(t * 1000 for t in times)
    q = statistics.quantiles(ms, n=100)
    return f"{name}: n={len(ms)} p50={q[49]:.1f} ms p99={q[98]:.1f} ms max={ms[-1]:.1f} ms"


def main():
    if not os.access(BIN, os.X_OK):
        sys.exit(f"{BIN} missing: cargo build --release")
    if not shutil.which("redis-server"):
        sys.exit("redis-server missing: apt-get install redis-server")
    work = tempfile.mkdtemp(prefix="ipgate-fleet-bench-")
    try:
        port = free_port()
        start_redis(port)
        gws = [Gateway(work, i + 1, port) for i in range(GATEWAYS)]
        quiet = propagation(gws, 1, SAMPLES, 0.005)
        done = []
        t = threading.Thread(target=load, args=(gws, 100_000, RATE, SECONDS, done))
        t.start()
        time.sleep(0.5)
        busy = propagation(gws, 50_000, max(20, int(SECONDS * 10)), 0.05)
        t.join()
        n, took = done[0]
        # Every ban of the load reached every gateway.
        time.sleep(1)
        last_ok = True
        total = None
        for g in gws:
            con = g.connect()
            _, out = g.call(con, "GET", "/v1/entries?list=block")
            held = len(json.loads(out))
            total = held if total is None else total
            last_ok &= held == total
        print(f"gateways: {GATEWAYS} on one redis-server, loopback; binary {BIN}")
        print(summary("propagation, quiet", quiet))
        print(summary(f"propagation, under load", busy))
        print(f"load: {n} bans acknowledged in {took:.1f} s = {n / took:.0f} bans/s "
              f"(asked {RATE}/s); every gateway holds {total} entries: {'yes' if last_ok else 'NO'}")
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
