"""Small HTTP applications and clients for waypoint tests: the destination app answers every
request with what it saw (method, path, the headers the waypoint adds), over HTTP/1.1 (h11)
or HTTP/2 with prior knowledge (h2), whichever the connection speaks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11

from tests.integration.ztunnel_harness import serving

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SEEN = ("x-forwarded-for", "forwarded", "traceparent", "authorization", "x-jwt-payload", "x-authz-user")


def _answer(method: str, path: str, headers: dict[str, str], body: bytes, peer: str) -> bytes:
    return json.dumps({"method": method, "path": path, "peer": peer, "body": len(body),
                       **{h: headers.get(h) for h in SEEN}}).encode()


async def _serve_h1(r: asyncio.StreamReader, w: asyncio.StreamWriter, first: bytes, peer: str) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    req: h11.Request | None = None
    body = b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await r.read(65536)
            conn.receive_data(data)
            if not data and req is None:
                return
            continue
        if isinstance(ev, h11.Request):
            req, body = ev, b""
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage) and req is not None:
            headers = {k.decode().lower(): v.decode() for k, v in req.headers}
            out = _answer(req.method.decode(), req.target.decode(), headers, body, peer)
            w.write(conn.send(h11.Response(status_code=200, headers=[("content-type", "application/json"),
                                                                     ("content-length", str(len(out)))])) or b"")
            w.write(conn.send(h11.Data(data=out)) or b"")
            w.write(conn.send(h11.EndOfMessage()) or b"")
            await w.drain()
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
            req = None
        elif isinstance(ev, h11.ConnectionClosed):
            return


async def _serve_h2(r: asyncio.StreamReader, w: asyncio.StreamWriter, first: bytes, peer: str) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    w.write(conn.data_to_send())
    heads: dict[int, dict[str, str]] = {}
    bodies: dict[int, bytes] = {}
    data = first
    while True:
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                heads[ev.stream_id] = {k.decode().lower(): v.decode() for k, v in ev.headers}
                bodies[ev.stream_id] = b""
            elif isinstance(ev, h2.events.DataReceived):
                bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                h = heads.pop(ev.stream_id, {})
                out = _answer(h.get(":method", ""), h.get(":path", ""), h, bodies.pop(ev.stream_id, b""), peer)
                conn.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                 ("content-length", str(len(out)))])
                conn.send_data(ev.stream_id, out, end_stream=True)
        w.write(conn.data_to_send())
        await w.drain()
        data = await r.read(65536)
        if not data:
            return


@contextlib.asynccontextmanager
async def http_app(host: str, port: int) -> AsyncIterator[asyncio.Server]:
    """The destination app on host:port: HTTP/1.1 or HTTP/2 prior knowledge, by the first bytes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer = str(w.get_extra_info("peername")[0])
        try:
            first = await r.read(65536)
            if first.startswith(PREFACE[:len(first)]) and len(first) >= 3:
                while len(first) < len(PREFACE):
                    more = await r.read(65536)
                    if not more:
                        return
                    first += more
                await _serve_h2(r, w, first, peer)
            elif first:
                await _serve_h1(r, w, first, peer)
        except (ConnectionError, OSError, h11.ProtocolError, h2.exceptions.ProtocolError):
            pass
        finally:
            w.close()

    async with serving(handle, host, port) as srv:
        yield srv


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class H1Client:
    """HTTP/1.1 requests, one after another, on one (keep-alive) connection."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str) -> None:
        self.r, self.w, self.host = r, w, host
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: list[tuple[str, str]] | None = None) -> Reply:
        hs = [("host", self.host), ("content-length", str(len(body))), *(headers or [])]
        self.w.write(self.conn.send(h11.Request(method=method, target=path, headers=hs)) or b"")
        if body:
            self.w.write(self.conn.send(h11.Data(data=body)) or b"")
        self.w.write(self.conn.send(h11.EndOfMessage()) or b"")
        await self.w.drain()
        status, rh, got = 0, {}, b""
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                data = await asyncio.wait_for(self.r.read(65536), 10)
                self.conn.receive_data(data)
                continue
            if isinstance(ev, h11.Response):
                status, rh = ev.status_code, {k.decode().lower(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                got += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionResetError("the connection closed mid-response")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(status, rh, got)

    def close(self) -> None:
        self.w.close()


class H2Client:
    """HTTP/2 with prior knowledge: concurrent requests on one connection."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, host: str) -> None:
        self.r, self.w, self.host = r, w, host
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.w.write(self.conn.data_to_send())

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: list[tuple[str, str]] | None = None) -> Reply:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", self.host),
                                     (":path", path), *(headers or [])], end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.w.write(self.conn.data_to_send())
        await self.w.drain()
        status, rh, got = 0, {}, b""
        while True:
            data = await asyncio.wait_for(self.r.read(65536), 10)
            if not data:
                raise ConnectionResetError("the connection closed mid-response")
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    rh = {k.decode(): v.decode() for k, v in ev.headers}
                    status = int(rh[":status"])
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    got += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.w.write(self.conn.data_to_send())
                    return Reply(status, rh, got)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    raise ConnectionResetError(f"stream {sid} reset")
            self.w.write(self.conn.data_to_send())

    def close(self) -> None:
        self.w.close()
