#!/usr/bin/env python3
"""One HTTP/3 GET with aioquic's client (PyPI): h3_get.py HOST:PORT SNI PATH CAFILE.

Prints the status on the first line, then each response header as `name: value`. Exits 2
when the server gives no answer within 3 s (a blocked source's Initial is dropped)."""
import asyncio
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.done = asyncio.get_running_loop().create_future()
        self.headers = []

    def quic_event_received(self, event):
        for e in self.h3.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.headers += e.headers
            if isinstance(e, (HeadersReceived, DataReceived)) and e.stream_ended:
                if not self.done.done():
                    self.done.set_result(self.headers)

    def get(self, authority, path):
        stream = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream,
            [(b":method", b"GET"), (b":scheme", b"https"),
             (b":authority", authority.encode()), (b":path", path.encode())],
            end_stream=True,
        )
        self.transmit()
        return self.done


async def main(addr, sni, path, cafile):
    host, port = addr.rsplit(":", 1)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sni,
                               idle_timeout=3.0)
    config.load_verify_locations(cafile)
    async with connect(host, int(port), configuration=config, create_protocol=Client,
                       wait_connected=True) as client:
        headers = await asyncio.wait_for(client.get(sni, path), 5)
        for name, value in headers:
            if name == b":status":
                print(value.decode())
        for name, value in headers:
            if not name.startswith(b":"):
                print(f"{name.decode()}: {value.decode()}")


try:
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:5]), 4))
except (asyncio.TimeoutError, ConnectionError) as e:
    print(f"no answer: {e!r}", file=sys.stderr)
    sys.exit(2)
