"""The small HTTP/1.1 server and clients of every process's admin, metrics and readiness endpoints.

One module for all of them (the ztunnel's 15000/15020/15021, the agent's 15010,
the waypoint's, and the CLI that reads them), over `h11` for the protocol: no
hand-written parsing. Handlers are plain functions of (method, query) that
return a `Response` (JSON by default); unknown paths answer 404 and wrong
methods 405, both as JSON naming what exists; a handler that raises answers 500
and never takes the process down. Bodies are small: requests are bounded at 64
KiB and connections idle for 10 s are closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h11

log = logging.getLogger("ambit.http")

MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT = 10.0


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> Response:
        return cls(status, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8")


Handler = Callable[[str, dict[str, str]], Response | Awaitable[Response]]
Routes = Mapping[str, tuple[tuple[str, ...], Handler]]


class HttpServer:
    """Routes `path -> (methods, handler)`; anything else is 404/405 with a JSON error."""

    def __init__(self, name: str, routes: Routes) -> None:
        self.name = name
        self.routes = routes
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        addr = self.server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        try:
            while True:
                req = await self._next_request(conn, reader)
                if req is None:
                    return
                resp = await self.dispatch(req.method.decode("latin-1"), req.target.decode("latin-1"))
                headers = [("content-type", resp.content_type), ("content-length", str(len(resp.body)))]
                writer.write(conn.send(h11.Response(status_code=resp.status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=resp.body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, OSError, h11.LocalProtocolError):
            pass
        finally:
            writer.close()

    async def _next_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        """The next request with its (ignored) body read; None at EOF, timeout or a malformed one."""
        req: h11.Request | None = None
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                return None
            if ev is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(reader.read(16384), IDLE_TIMEOUT)
                except TimeoutError:
                    return None
                conn.receive_data(data)
                if not data and req is None:
                    return None
                continue
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.EndOfMessage):
                return req
            elif isinstance(ev, h11.ConnectionClosed):
                return None

    async def dispatch(self, method: str, target: str) -> Response:
        url = urllib.parse.urlsplit(target)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        route = self.routes.get(url.path)
        if route is None:
            return Response.json({"error": f"no such endpoint {url.path}", "endpoints": sorted(self.routes)}, 404)
        methods, handler = route
        if method not in methods:
            return Response.json({"error": f"{url.path} takes {', '.join(methods)}, not {method}"}, 405)
        try:
            r = handler(method, query)
            if not isinstance(r, Response):
                r = await r
            return r
        except Exception as e:  # an admin bug must not take the process down
            log.exception("%s %s failed", self.name, url.path)
            return Response.json({"error": f"{type(e).__name__}: {e}"}, 500)


# ---------------------------------------------------------------------------
# clients


def _request(host: str, method: str, path: str) -> tuple[h11.Connection, bytes]:
    """A client connection that has sent one request, and the bytes to send."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", host), ("accept", "application/json"), ("connection", "close")]
    data = (conn.send(h11.Request(method=method, target=path, headers=headers)) or b"") + (
        conn.send(h11.EndOfMessage()) or b"")
    return conn, data


def _parse(conn: h11.Connection, raw: bytes) -> tuple[int, bytes]:
    """(status, body) of the whole response to `conn`'s request, read until the peer closed."""
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, body = 0, bytearray()
    while True:
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise ValueError(f"malformed HTTP response: {e}") from e
        if isinstance(ev, h11.Response):
            status = ev.status_code
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed) or ev is h11.NEED_DATA:
            break
    if not status:
        raise ValueError("no HTTP response")
    return status, bytes(body)


def _json(status: int, body: bytes) -> tuple[int, Any]:
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode(errors="replace")


async def get_json(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, Any]:
    """GET a JSON document from an admin endpoint; (status, body, or its text if not JSON).
    Raises OSError/TimeoutError when unreachable, ValueError on a malformed answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    conn, data = _request(host, "GET", path)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return _json(*_parse(conn, raw))


def request_on(sock: socket.socket, host: str, method: str, path: str) -> tuple[int, Any]:
    """One blocking request on a connected socket (the CLI's, possibly opened in another netns);
    (status, JSON body or its text). The socket is closed afterwards."""
    conn, data = _request(host, method, path)
    try:
        sock.sendall(data)
        raw = bytearray()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            raw += data
    finally:
        sock.close()
    return _json(*_parse(conn, bytes(raw)))
