#!/usr/bin/env python3
"""User and system CPU per request, apart, of ipgate and HAProxy under the shared harness's load.

The shared harness (../shared/bench) reads each proxy's CPU as one figure (schedstat). This
script splits it: it starts again the backend and the `base` instances a harness run rendered
(the commands in RUN/pids, the configs in RUN/run/), drives the same loads (wrk -t1 -c64
keep-alive, plain and TLS; h2load -t1 -c64 -m10) in interleaved rounds, and reads each
proxy's utime and stime from /proc/PID/stat around every run. Prints, per scenario, user and
system microseconds per request, median (min-max) over the rounds, and ipgate's ratios to
HAProxy (paired per round).

    benches/harness/run.sh                       # once, to render the configs
    benches/harness/usersys.py target/bench-results/<run>        # ROUNDS=5 DURATION=4
    TARGETS="haproxy ipgate ipgate_base" benches/harness/usersys.py target/bench-results/ab-x

Loopback only; every load ends by itself (-d, -D); every process it starts is stopped by
PID on exit. The harness must not be running (same ports).
"""
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

ROUNDS = int(os.environ.get("ROUNDS", "5"))
DURATION = int(os.environ.get("DURATION", "4"))
TARGETS = os.environ.get("TARGETS", "haproxy ipgate").split()
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def commands(run):
    """name -> command line, for the backend and each `NAME-base` instance."""
    out = {}
    with open(os.path.join(run, "pids")) as f:
        for line in f:
            cmd = line.split(maxsplit=2)[2].strip()
            m = re.search(r"/run/([^/]+)/", cmd)
            if m and (m.group(1) == "backend" or m.group(1).endswith("-base")):
                out[m.group(1).removesuffix("-base")] = cmd
    return out


def ports(cmd):
    """(plain, tls) ports from the instance's config."""
    conf = cmd.split()[-1]
    text = open(conf).read()
    if conf.endswith(".toml"):
        found = re.findall(r'addr = "127\.0\.0\.1:(\d+)"\s*\n(tls = true)?', text)
        plain = next(p for p, tls in found if not tls)
        tls = next(p for p, tls in found if tls)
    else:
        binds = re.findall(r"bind 127\.0\.0\.1:(\d+)( ssl)?", text)
        plain = next(p for p, ssl in binds if not ssl)
        tls = next(p for p, ssl in binds if ssl)
    return int(plain), int(tls)


def ready(port, secs=10):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def cpu(pid):
    """(user, system) CPU ticks of the whole process (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def load(scenario, port):
    """Runs one load; how many requests succeeded."""
    if scenario == "h2_tls":
        args = ["h2load", "-t1", "-c64", "-m10", "-D", str(DURATION),
                f"https://127.0.0.1:{port}/"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=DURATION + 30).stdout
        m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    else:
        scheme = "https" if scenario == "ka_tls" else "http"
        args = ["wrk", "-t1", "-c64", "-d", f"{DURATION}s", f"{scheme}://127.0.0.1:{port}/"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=DURATION + 30).stdout
        m = re.search(r"(\d+) requests in", out)
        if re.search(r"Non-2xx|Socket errors", out):
            sys.exit(f"{scenario} on {port}: errors\n{out}")
    if not m:
        sys.exit(f"{scenario} on {port}: no result\n{out}")
    return int(m.group(1))


def fmt(values):
    return f"{statistics.median(values):6.2f} ({min(values):.2f}-{max(values):.2f})"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    cmds = commands(run)
    started = []

    def stop(*_):
        for p in started:
            p.send_signal(signal.SIGTERM)
        for p in started:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        started.append(subprocess.Popen(cmds["backend"].split(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        if not ready(18080):
            sys.exit("the backend did not start")
        targets = {}
        for name in TARGETS:
            p = subprocess.Popen(cmds[name].split(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            started.append(p)
            targets[name] = (p.pid, ports(cmds[name]))
            if not ready(targets[name][1][0]):
                sys.exit(f"{name} did not start")
        scenarios = ["ka_plain", "ka_tls", "h2_tls"]
        got = {}  # (scenario, target) -> [(user_us, sys_us)] per round
        for r in range(ROUNDS):
            order = TARGETS if r % 2 == 0 else TARGETS[::-1]
            for scenario in scenarios:
                for name in order:
                    pid, (plain, tls) = targets[name]
                    u0, s0 = cpu(pid)
                    n = load(scenario, plain if scenario == "ka_plain" else tls)
                    u1, s1 = cpu(pid)
                    got.setdefault((scenario, name), []).append(
                        ((u1 - u0) * TICK_US / n, (s1 - s0) * TICK_US / n))
                    print(f"r{r + 1} {scenario:8} {name:12} {n:8} req  user "
                          f"{(u1 - u0) * TICK_US / n:6.2f}  sys {(s1 - s0) * TICK_US / n:6.2f} us/req",
                          file=sys.stderr)
        print(f"CPU us per request, user and system apart: median (min-max) of {ROUNDS} rounds "
              f"of {DURATION} s; ratios paired per round to haproxy")
        print(f"{'scenario':9} {'target':12} {'user us':20} {'sys us':20} "
              f"{'user x haproxy':20} {'sys x haproxy':20} {'total x haproxy':20}")
        for scenario in scenarios:
            base = got[(scenario, "haproxy")]
            for name in TARGETS:
                rows = got[(scenario, name)]
                users = [u for u, _ in rows]
                syss = [s for _, s in rows]
                line = f"{scenario:9} {name:12} {fmt(users):20} {fmt(syss):20} "
                if name != "haproxy":
                    xu = [u / b[0] for (u, _), b in zip(rows, base)]
                    xs = [s / b[1] for (_, s), b in zip(rows, base)]
                    xt = [(u + s) / (b[0] + b[1]) for (u, s), b in zip(rows, base)]
                    line += f"{fmt(xu):20} {fmt(xs):20} {fmt(xt):20}"
                print(line)
    finally:
        stop()


if __name__ == "__main__":
    main()
