"""The ztunnel's small HTTP endpoints: admin (15000), Prometheus metrics (15020), readiness (15021).

A minimal asyncio HTTP/1.1 server (one request per connection, JSON bodies):
the admin surface is tiny and local, and no HTTP server library is among the
project's dependencies. Handlers are plain functions of (method, path, query).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ambit.ztunnel.admin")

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


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


class HttpServer:
    """Routes `path -> (methods, handler)`; anything else is 404/405 with a JSON error."""

    def __init__(self, name: str, routes: Mapping[str, tuple[tuple[str, ...], Handler]]) -> None:
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
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            resp = await self._dispatch(head)
            writer.write(
                f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}\r\n"
                f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
                "Connection: close\r\n\r\n".encode() + resp.body
            )
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, head: bytes) -> Response:
        try:
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _version = line.split(" ", 2)
        except ValueError:
            return Response.json({"error": "malformed request line"}, 400)
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
