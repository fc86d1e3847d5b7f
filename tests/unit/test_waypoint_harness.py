"""The waypoint engine's test harness: real h11/h2 peers over memory pipes, and a fake glue.

Other test_waypoint_* modules import from here (as test_h2compat imports
test_hbone_peers); it holds no tests itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.events as h2e
import h11
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes

from waypoint.engine import proxy
from waypoint.exchange import Hooks, Limits, Request, RequestRecord, Verdict
from waypoint.streams import ByteStream, LegStream, StreamReset, memory_pipe

Headers = list[tuple[str, str]]
TIMEOUT = 10.0


# ---------------------------------------------------------------- responses


@dataclass
class Response:
    status: int
    headers: Headers
    body: bytes = b""
    trailers: Headers = field(default_factory=list)
    informational: list[int] = field(default_factory=list)
    reset: int | None = None  # HTTP/2: the stream was reset with this code

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class Seen:
    """A request as the upstream server saw it."""

    method: str
    target: str
    headers: Headers
    body: bytes
    trailers: Headers = field(default_factory=list)
    version: str = ""
    stream_id: int = 0

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


def _text(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(n.decode(), v.decode()) for n, v in headers]


# ---------------------------------------------------------------- the glue


Handler = Callable[["Seen"], Awaitable["Reply"]]


@dataclass
class Reply:
    """What the fake upstream answers: status, headers, body chunks (or a generator)."""

    status: int = 200
    headers: Headers = field(default_factory=list)
    body: Sequence[bytes] | Callable[[], AsyncIterator[bytes]] = ()
    trailers: Headers = field(default_factory=list)
    informational: Sequence[int] = ()
    reset: int | None = None  # HTTP/2: reset the stream (after the head when status != 0)


async def echo(seen: Seen) -> Reply:
    """Answer with what was received: the body, and the request line in a header."""
    return Reply(200, [("x-seen", f"{seen.method} {seen.target}"), ("content-type", "text/plain")],
                 [seen.body] if seen.body else [])


class Glue:
    """A stand-in for the waypoint's glue: decide by a function, upstreams in memory."""

    def __init__(
        self,
        *,
        decide: Callable[[Request], Verdict] | None = None,
        handler: Handler = echo,
        upstream: str = "http1",
        fail_open: int = 0,
        open_gate: asyncio.Event | None = None,
        pipe_high: int = 64 * 1024,
    ) -> None:
        self.decide_fn = decide or (lambda r: Verdict.allow(context=r.path))
        self.handler = handler
        self.upstream_kind = upstream
        self.fail_open = fail_open
        self.open_gate = open_gate  # open_upstream waits for it (a slow dial)
        self.pipe_high = pipe_high
        self.requests: list[Request] = []
        self.records: list[RequestRecord] = []
        self.seen: list[Seen] = []
        self.opened = 0
        self.upstreams: list[tuple[LegStream, LegStream]] = []  # (engine's end, server's end)
        self.servers: list[asyncio.Task[None]] = []
        self.server_conns: list[Any] = []

    def decide(self, request: Request) -> Verdict:
        self.requests.append(request)
        return self.decide_fn(request)

    async def open_upstream(self) -> ByteStream:
        self.opened += 1
        if self.open_gate is not None:
            await self.open_gate.wait()
        if self.fail_open:
            self.fail_open -= 1
            raise ConnectionRefusedError("no route to the destination (test)")
        near, far = memory_pipe(high=self.pipe_high, low=self.pipe_high // 4,
                                names=("waypoint->upstream", "upstream"))
        self.upstreams.append((near, far))
        if self.upstream_kind == "http1":
            server: Any = H1Server(far, self.handler, self.seen)
        else:
            server = H2Server(far, self.handler, self.seen)
        self.server_conns.append(server)
        self.servers.append(asyncio.create_task(server.run(), name="test/upstream-server"))
        return near

    def on_request(self, record: RequestRecord) -> None:
        self.records.append(record)

    def hooks(self, **kw: Any) -> Hooks:
        return Hooks(decide=self.decide, open_upstream=self.open_upstream,
                     on_request=self.on_request, **kw)

    async def close(self) -> None:
        assert len({id(r) for r in self.records}) == len(self.records), "a request reported twice"
        for task in self.servers:
            task.cancel()
        await asyncio.gather(*self.servers, return_exceptions=True)


@contextlib.asynccontextmanager
async def waypoint(glue: Glue, limits: Limits | None = None, *, high: int = 64 * 1024,
                   **hooks: Any) -> AsyncIterator[tuple[LegStream, LegStream, asyncio.Task[Any]]]:
    """Run the engine on one downstream pipe; yield (client end, engine end, engine task)."""
    client, server = memory_pipe(high=high, low=high // 4, names=("client", "waypoint<-client"))
    task = asyncio.create_task(proxy(server, glue.hooks(**hooks), limits), name="test/engine")
    try:
        yield client, server, task
    finally:
        if not task.done():
            client.close()
            try:
                await asyncio.wait_for(asyncio.shield(task), TIMEOUT)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise AssertionError("the engine did not end after the client closed") from None
        await glue.close()


# ---------------------------------------------------------------- HTTP/1 peers


async def _h11_next(conn: h11.Connection, stream: ByteStream, size: int = 65536) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.read(size))
            continue
        return event


class H1Client:
    """An h11 client over a byte stream: send requests, read responses."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, method: str, target: str, headers: Headers | None = None,
                   body: bytes | Sequence[bytes] = b"", *, chunked: bool = False,
                   trailers: Headers | None = None, end: bool = True) -> None:
        hs = list(headers or [])
        if not any(n.lower() == "host" for n, _ in hs):
            hs.insert(0, ("Host", "svc.test"))
        chunks = [body] if isinstance(body, bytes) else list(body)
        if chunked:
            hs.append(("Transfer-Encoding", "chunked"))
        elif chunks and sum(map(len, chunks)) and not any(n.lower() == "content-length" for n, _ in hs):
            hs.append(("Content-Length", str(sum(map(len, chunks)))))
        self.stream.write(self.conn.send(h11.Request(method=method, target=target, headers=hs)) or b"")
        for chunk in chunks:
            if chunk:
                self.stream.write(self.conn.send(h11.Data(data=chunk)) or b"")
                await self.stream.drain()
        if end:
            await self.end(trailers)

    def expect_response(self) -> None:
        """Make h11 expect a response to a request that was written as raw bytes."""
        self.conn.send(h11.Request(method="GET", target="/", headers=[("Host", "raw")]))
        self.conn.send(h11.EndOfMessage())

    async def body(self, data: bytes) -> None:
        self.stream.write(self.conn.send(h11.Data(data=data)) or b"")
        await self.stream.drain()

    async def end(self, trailers: Headers | None = None) -> None:
        self.stream.write(self.conn.send(h11.EndOfMessage(headers=trailers or [])) or b"")
        await self.stream.drain()

    async def response(self, *, read_size: int = 65536,
                       on_data: Callable[[bytes], Awaitable[None]] | None = None) -> Response:
        informational: list[int] = []
        while True:
            event = await _h11_next(self.conn, self.stream, read_size)
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connection closed before a response")
            assert isinstance(event, h11.Response), event
            break
        resp = Response(event.status_code, _text(event.headers), informational=informational)
        chunks: list[bytes] = []
        while True:
            event = await _h11_next(self.conn, self.stream, read_size)
            if isinstance(event, h11.Data):
                if on_data is not None:
                    await on_data(event.data)
                    chunks.append(b"")
                else:
                    chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                resp.trailers = _text(event.headers)
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        resp.body = b"".join(chunks)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return resp

    async def request(self, method: str, target: str, headers: Headers | None = None,
                      body: bytes | Sequence[bytes] = b"", **kw: Any) -> Response:
        await self.send(method, target, headers, body, **kw)
        return await self.response()

    async def closed(self) -> bool:
        """True when the server closed the connection (EOF), after any unread bytes."""
        try:
            while True:
                data = await asyncio.wait_for(self.stream.read(65536), TIMEOUT)
                if not data:
                    return True
        except StreamReset:
            return True


class H1Server:
    """An h11 server over a byte stream, answering with a handler; records what it saw."""

    def __init__(self, stream: ByteStream, handler: Handler, seen: list[Seen]) -> None:
        self.stream = stream
        self.handler = handler
        self.seen = seen
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)

    async def run(self) -> None:
        try:
            while True:
                event = await _h11_next(self.conn, self.stream)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                chunks: list[bytes] = []
                while True:
                    ev = await _h11_next(self.conn, self.stream)
                    if isinstance(ev, h11.Data):
                        chunks.append(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        trailers = _text(ev.headers)
                        break
                    else:
                        return
                seen = Seen(event.method.decode(), event.target.decode(), _text(event.headers),
                            b"".join(chunks), trailers, "HTTP/" + event.http_version.decode())
                self.seen.append(seen)
                reply = await self.handler(seen)
                await self._answer(reply)
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    self.stream.close()
                    return
                self.conn.start_next_cycle()
        except (StreamReset, h11.RemoteProtocolError):
            return

    async def _answer(self, reply: Reply) -> None:
        for status in reply.informational:
            self.stream.write(self.conn.send(h11.InformationalResponse(status_code=status, headers=[])) or b"")
        self.stream.write(self.conn.send(h11.Response(status_code=reply.status, headers=reply.headers)) or b"")
        await self.stream.drain()
        chunks: Any = reply.body() if callable(reply.body) else _aiter(reply.body)
        async for chunk in chunks:
            self.stream.write(self.conn.send(h11.Data(data=chunk)) or b"")
            await self.stream.drain()
        self.stream.write(self.conn.send(h11.EndOfMessage(headers=reply.trailers)) or b"")
        await self.stream.drain()


async def _aiter(items: Iterable[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


# ---------------------------------------------------------------- HTTP/2 peers


class _H2Peer:
    """Shared by the h2 test client and server: a reader task, events to per-stream state."""

    def __init__(self, stream: ByteStream, conn: H2Connection, *, auto_ack: bool = True) -> None:
        self.stream = stream
        self.conn = conn
        self.auto_ack = auto_ack
        self.changed = asyncio.Event()
        self.closed = False
        self.terminated: h2e.ConnectionTerminated | None = None
        self.events: list[h2e.Event] = []

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.stream.write(data)

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self.events.append(event)
                    self.on_event(event)
                self.flush()
                self.changed.set()
        except (StreamReset, Exception):
            pass
        finally:
            self.closed = True
            self.changed.set()

    def on_event(self, event: h2e.Event) -> None:
        if isinstance(event, h2e.ConnectionTerminated):
            self.terminated = event

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async def waiter() -> None:
            while not predicate():
                if self.closed:
                    raise ConnectionError("peer connection closed while waiting")
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(waiter(), timeout)

    async def send_body(self, sid: int, data: bytes, *, end: bool) -> None:
        """Send respecting flow control (waits for WINDOW_UPDATEs)."""
        view = memoryview(data)
        try:
            while view:
                await self.wait_for(lambda: self.conn.local_flow_control_window(sid) > 0)
                n = min(len(view), self.conn.local_flow_control_window(sid),
                        self.conn.max_outbound_frame_size)
                self.conn.send_data(sid, bytes(view[:n]))
                view = view[n:]
                self.flush()
                await self.stream.drain()
            if end:
                self.conn.end_stream(sid)
                self.flush()
        except StreamClosedError:
            return  # the peer reset the stream: it wants no more


@dataclass
class ClientStream:
    status: int = 0
    headers: Headers = field(default_factory=list)
    informational: list[int] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    trailers: Headers = field(default_factory=list)
    ended: bool = False
    reset: int | None = None
    received: int = 0


class H2Client(_H2Peer):
    """An h2 client (prior knowledge) over a byte stream."""

    def __init__(self, stream: ByteStream, *, auto_ack: bool = True,
                 settings: dict[int, int] | None = None) -> None:
        super().__init__(stream, H2Connection(H2Configuration(client_side=True, header_encoding=None)),
                         auto_ack=auto_ack)
        self.streams: dict[int, ClientStream] = {}
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()
        self.reader = asyncio.create_task(self.read_loop(), name="test/h2-client")

    def on_event(self, event: h2e.Event) -> None:
        super().on_event(event)
        sid = getattr(event, "stream_id", None)
        st = self.streams.get(sid) if sid else None
        if st is None:
            return
        if isinstance(event, h2e.ResponseReceived):
            st.headers = _text(event.headers)
            st.status = int(dict(st.headers)[":status"])
        elif isinstance(event, h2e.InformationalResponseReceived):
            st.informational.append(int(dict(_text(event.headers))[":status"]))
        elif isinstance(event, h2e.DataReceived):
            st.chunks.append(event.data)
            st.received += len(event.data)
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        elif isinstance(event, h2e.TrailersReceived):
            st.trailers = _text(event.headers)
        elif isinstance(event, h2e.StreamEnded):
            st.ended = True
        elif isinstance(event, h2e.StreamReset):
            st.reset = int(event.error_code)

    async def start(self, method: str, path: str, headers: Headers | None = None,
                    *, end: bool = False, authority: str = "svc.test", scheme: str = "http") -> int:
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = ClientStream()
        hs = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        hs += list(headers or [])
        self.conn.send_headers(sid, [(n.encode(), v.encode()) for n, v in hs], end_stream=end)
        self.flush()
        await self.stream.drain()
        return sid

    async def request(self, method: str, path: str, headers: Headers | None = None,
                      body: bytes = b"", *, trailers: Headers | None = None) -> Response:
        sid = await self.start(method, path, headers, end=not body and not trailers)
        if body:
            await self.send_body(sid, body, end=not trailers)
        if trailers:
            self.conn.send_headers(sid, [(n.encode(), v.encode()) for n, v in trailers], end_stream=True)
            self.flush()
        return await self.response(sid)

    async def response(self, sid: int, timeout: float = TIMEOUT) -> Response:
        st = self.streams[sid]
        await self.wait_for(lambda: st.ended or st.reset is not None, timeout)
        return Response(st.status, [h for h in st.headers if not h[0].startswith(":")],
                        b"".join(st.chunks), st.trailers, st.informational, st.reset)

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def ack(self, sid: int, n: int) -> None:
        self.conn.acknowledge_received_data(n, sid)
        self.flush()

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class H2Server(_H2Peer):
    """An h2 server (prior knowledge) answering each stream with a handler."""

    def __init__(self, stream: ByteStream, handler: Handler, seen: list[Seen],
                 settings: dict[int, int] | None = None) -> None:
        super().__init__(stream, H2Connection(H2Configuration(client_side=False, header_encoding=None)))
        self.handler = handler
        self.seen = seen
        self.partial: dict[int, Seen] = {}
        self.bodies: dict[int, bytearray] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.resets: dict[int, int] = {}
        self.settings = settings or {}

    async def run(self) -> None:
        self.conn.initiate_connection()
        if self.settings:
            self.conn.update_settings(self.settings)
        self.flush()
        try:
            await self.read_loop()
        finally:
            for task in self.tasks:
                task.cancel()

    def on_event(self, event: h2e.Event) -> None:
        super().on_event(event)
        if isinstance(event, h2e.RequestReceived):
            hs = _text(event.headers)
            pseudo = dict(h for h in hs if h[0].startswith(":"))
            self.partial[event.stream_id] = Seen(
                pseudo[":method"], pseudo.get(":path", ""), [h for h in hs if not h[0].startswith(":")],
                b"", version="HTTP/2", stream_id=event.stream_id)
            self.partial[event.stream_id].headers.insert(0, (":authority", pseudo.get(":authority", "")))
        elif isinstance(event, h2e.DataReceived):
            if event.stream_id in self.partial:
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data or b"")
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2e.TrailersReceived):
            seen = self.partial.get(event.stream_id)
            if seen is not None:
                seen.trailers = _text(event.headers)
        elif isinstance(event, h2e.StreamEnded):
            seen = self.partial.pop(event.stream_id, None)
            if seen is not None:
                seen.body = bytes(self.bodies.pop(event.stream_id, b""))
                self.seen.append(seen)
                task = asyncio.create_task(self._answer(seen), name="test/h2-answer")
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        elif isinstance(event, h2e.StreamReset):
            self.resets[event.stream_id] = int(event.error_code)
            self.partial.pop(event.stream_id, None)

    async def _answer(self, seen: Seen) -> None:
        sid = seen.stream_id
        try:
            reply = await self.handler(seen)
            if reply.reset is not None and not reply.status:
                self.conn.reset_stream(sid, reply.reset)
                self.flush()
                return
            for status in reply.informational:
                self.conn.send_headers(sid, [(b":status", str(status).encode())])
            hs = [(b":status", str(reply.status).encode())] + [
                (n.encode(), v.encode()) for n, v in reply.headers]
            self.conn.send_headers(sid, hs)
            self.flush()
            chunks: Any = reply.body() if callable(reply.body) else _aiter(reply.body)
            async for chunk in chunks:
                await self.send_body(sid, chunk, end=False)
            if reply.reset is not None:
                self.conn.reset_stream(sid, reply.reset)
            elif reply.trailers:
                self.conn.send_headers(sid, [(n.encode(), v.encode()) for n, v in reply.trailers],
                                       end_stream=True)
            else:
                self.conn.end_stream(sid)
            self.flush()
        except Exception:
            pass


def settings(**kw: int) -> dict[int, int]:
    names = {"initial_window_size": SettingCodes.INITIAL_WINDOW_SIZE,
             "max_frame_size": SettingCodes.MAX_FRAME_SIZE,
             "max_concurrent_streams": SettingCodes.MAX_CONCURRENT_STREAMS}
    return {names[k]: v for k, v in kw.items()}

