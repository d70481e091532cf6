#!/usr/bin/env python3
"""Load client and readiness probe for the upgrade benchmark (benches/upgrade/README.md).

Python 3 standard library only. Loopback targets only: it refuses any other address.

  load.py load --target 127.0.0.1:PORT --out summary.json [--raw raw.tsv]
               [--clients 16] [--duration 120] [--stop-file PATH] [--timeout 2]
               [--rate 0] [--fail-pause 0.05] [--host a.test]
      CLIENTS threads, each in a loop: a fresh TCP connection, one request
      (GET / HTTP/1.1, Host, Connection: close), read the answer, close. Per request it
      records the wall-clock start, the wait (connect + first byte of the answer) and the
      outcome: ok (200), refused, reset, timeout (no first byte within --timeout), closed
      (the connection ended before a status line), status_NNN (any other status), or
      error. It stops after --duration seconds or as soon as --stop-file exists, and
      writes a JSON summary to --out (and every request to --raw, one per line:
      start_epoch_s wait_ms outcome).

  load.py wait --target 127.0.0.1:PORT [--timeout 30] [--interval 0.005]
               [--ready-file PATH --go-file PATH]
      Sends the same request every INTERVAL until one gets 200; prints the wall-clock
      time of that answer (epoch seconds) and exits 0, or exits 1 after TIMEOUT seconds.
      With --go-file it first creates --ready-file, then waits for GO to exist before
      the first request, so a caller can start it ahead and not time Python's start.

  load.py upstream --port-file PATH
      The upstream: a ThreadingHTTPServer on 127.0.0.1 (a free port, written to PATH once
      it listens) that answers every GET with 200 "ok" (HTTP/1.1, keep-alive).
"""
import argparse
import errno
import ipaddress
import json
import os
import socket
import statistics
import sys
import threading
import time

FAILURES_LISTED = 20000  # the summary lists at most this many failures (all are counted)


def parse_target(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit(f"load.py: {host} is not a loopback address; this client only targets loopback")
    return host, int(port)


def request_bytes(host):
    return f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ipgate-upgrade-bench\r\nConnection: close\r\n\r\n".encode()


def one_request(target, payload, timeout):
    """One request on a fresh connection: (wait_ms, outcome).

    wait_ms is connect + first byte of the answer, or the time until the request failed."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    sock = socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_STREAM)
    wait_ms = None
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(payload)
        sock.settimeout(max(deadline - time.perf_counter(), 0.001))
        head = sock.recv(4096)
        wait_ms = (time.perf_counter() - t0) * 1000
        if not head:
            return wait_ms, "closed"
        # The rest of the answer: the head, then Content-Length bytes of body (or up to EOF).
        sock.settimeout(timeout)
        while b"\r\n\r\n" not in head:
            more = sock.recv(4096)
            if not more:
                break
            head += more
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
            return wait_ms, "closed"
        status = status_line[1].decode("ascii", "replace")
        if status != "200":
            return wait_ms, f"status_{status}"
        header, _, body = head.partition(b"\r\n\r\n")
        length = None
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while length is None or len(body) < length:
            more = sock.recv(65536)
            if not more:
                break
            body += more
        if length is not None and len(body) < length:
            return wait_ms, "closed"
        return wait_ms, "ok"
    except socket.timeout:
        return (wait_ms if wait_ms is not None else timeout * 1000), "timeout"
    except ConnectionRefusedError:
        return (time.perf_counter() - t0) * 1000, "refused"
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return (wait_ms if wait_ms is not None else (time.perf_counter() - t0) * 1000), "reset"
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            return (time.perf_counter() - t0) * 1000, "refused"
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            return (time.perf_counter() - t0) * 1000, "reset"
        return (time.perf_counter() - t0) * 1000, f"error_{errno.errorcode.get(e.errno, e.errno)}"
    finally:
        sock.close()


def client(target, payload, args, stop, records):
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    next_at = time.perf_counter()
    while not stop.is_set():
        start = time.time()
        wait_ms, outcome = one_request(target, payload, args.timeout)
        records.append((start, wait_ms, outcome))
        if outcome != "ok" and args.fail_pause > 0:
            # A failed attempt is retried after a pause, as a real client would: without it
            # a refused connect loops at CPU speed, and the count measures the loop, and
            # the spinning steals the CPU the new process needs to start.
            stop.wait(args.fail_pause)
        if interval:
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                stop.wait(delay)
            else:
                next_at = time.perf_counter()


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(records, args, started, ended):
    counts = {}
    for _, _, outcome in records:
        counts[outcome] = counts.get(outcome, 0) + 1
    ok_waits = sorted(w for _, w, o in records if o == "ok")
    all_waits = [w for _, w, _ in records]
    failures = sorted((s, w, o) for s, w, o in records if o != "ok")
    worst = max(records, key=lambda r: r[1]) if records else None
    r3 = lambda v: None if v is None else round(v, 3)
    return {
        "target": args.target,
        "clients": args.clients,
        "timeout_s": args.timeout,
        "started": round(started, 3),
        "ended": round(ended, 3),
        "requests": len(records),
        "counts": dict(sorted(counts.items())),
        "failed": len(failures),
        "max_wait_ms": r3(max(all_waits) if all_waits else None),
        "max_wait_at": round(worst[0], 3) if worst else None,
        "max_wait_outcome": worst[2] if worst else None,
        "ok_median_ms": r3(statistics.median(ok_waits) if ok_waits else None),
        "ok_p99_ms": r3(percentile(ok_waits, 0.99)),
        "ok_max_ms": r3(ok_waits[-1] if ok_waits else None),
        "failures_listed": min(len(failures), FAILURES_LISTED),
        "failures": [
            {"at": round(s, 4), "wait_ms": round(w, 2), "outcome": o}
            for s, w, o in failures[:FAILURES_LISTED]
        ],
    }


def cmd_load(args):
    target = parse_target(args.target)
    payload = request_bytes(args.host)
    stop = threading.Event()
    per_client = [[] for _ in range(args.clients)]
    threads = [
        threading.Thread(target=client, args=(target, payload, args, stop, per_client[i]), daemon=True)
        for i in range(args.clients)
    ]
    started = time.time()
    end = time.monotonic() + args.duration
    for t in threads:
        t.start()
    while time.monotonic() < end:
        if args.stop_file and os.path.exists(args.stop_file):
            break
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(args.timeout * 3 + 1)
    ended = time.time()
    # A list is appended to by one thread only; a thread still stuck after join (it cannot
    # be, each step has a timeout) would at worst add one record while we copy.
    records = [r for recs in per_client for r in list(recs)]
    records.sort()
    summary = summarize(records, args, started, ended)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, args.out)
    if args.raw:
        with open(args.raw, "w") as f:
            f.writelines(f"{s:.4f} {w:.3f} {o}\n" for s, w, o in records)
    print(
        f"load: {summary['requests']} requests, {summary['failed']} failed, "
        f"max wait {summary['max_wait_ms']} ms, median {summary['ok_median_ms']} ms",
        file=sys.stderr,
    )


def cmd_wait(args):
    target = parse_target(args.target)
    payload = request_bytes(args.host)
    if args.ready_file:
        open(args.ready_file, "w").close()
    if args.go_file:
        # Started ahead, so that its own start-up is not timed; probes once GO_FILE exists.
        give_up = time.monotonic() + args.timeout
        while not os.path.exists(args.go_file):
            if time.monotonic() > give_up:
                print(f"load.py wait: {args.go_file} did not appear within {args.timeout} s", file=sys.stderr)
                return 1
            time.sleep(0.001)
    t0 = time.monotonic()
    while True:
        _, outcome = one_request(target, payload, min(args.timeout, 2.0))
        elapsed = time.monotonic() - t0
        if outcome == "ok":
            print(f"{time.time():.6f}")
            return 0
        if elapsed > args.timeout:
            print(f"load.py wait: no 200 from {args.target} within {args.timeout} s (last: {outcome})", file=sys.stderr)
            return 1
        time.sleep(args.interval)


def cmd_upstream(args):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so the proxies may pool connections
        # One write per answer, and no Nagle: send_response's head and the body as two
        # small writes on a kept-alive connection meet the proxy's delayed ACK and take 40 ms.
        disable_nagle_algorithm = True

        def do_GET(self):
            self.wfile.write(answer)

        def log_message(self, *_):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # the default, 5, drops SYNs under a burst
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(tmp, args.port_file)
    server.serve_forever()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load", help="run the load")
    load.add_argument("--target", required=True, help="127.0.0.1:PORT")
    load.add_argument("--host", default="a.test", help="Host header")
    load.add_argument("--clients", type=int, default=16)
    load.add_argument("--duration", type=float, default=120.0, help="seconds at most")
    load.add_argument("--stop-file", help="stop as soon as this file exists")
    load.add_argument("--timeout", type=float, default=2.0, help="seconds for connect + first byte")
    load.add_argument("--rate", type=float, default=0.0, help="requests per second per client; 0: no pause")
    load.add_argument("--fail-pause", type=float, default=0.05, help="seconds a client pauses after a failure")
    load.add_argument("--out", required=True, help="JSON summary")
    load.add_argument("--raw", help="every request, one line each: start_epoch_s wait_ms outcome")
    wait = sub.add_parser("wait", help="wait until the target answers 200")
    wait.add_argument("--target", required=True)
    wait.add_argument("--host", default="a.test")
    wait.add_argument("--timeout", type=float, default=30.0)
    wait.add_argument("--interval", type=float, default=0.005)
    wait.add_argument("--ready-file", help="created once the probe is ready")
    wait.add_argument("--go-file", help="probe only once this file exists")
    up = sub.add_parser("upstream", help="serve 200 ok on a free loopback port")
    up.add_argument("--port-file", required=True)
    args = ap.parse_args()
    if args.cmd == "upstream":
        return cmd_upstream(args)
    if args.cmd == "load":
        if args.clients < 1 or args.duration <= 0 or args.timeout <= 0:
            ap.error("--clients, --duration and --timeout must be positive")
        return cmd_load(args)
    return cmd_wait(args)


if __name__ == "__main__":
    sys.exit(main())
