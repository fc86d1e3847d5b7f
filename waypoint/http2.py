"""The HTTP/2 proxy of one downstream connection: h2 server side, one h2 client connection upstream.

Every downstream stream is decided on its own. A refused one is answered here
(the others go on); an allowed one gets a stream of the upstream connection,
which is opened on the first allowed request and kept for the connection's
life (a new one is opened when it goes away). Streams map 1:1.

Everything protocol happens synchronously in event handlers; I/O is one reader
and one writer task per connection. Flow control is end to end: DATA received
on one side is acknowledged (WINDOW_UPDATE) only once it has been framed on
the other side, written to its byte stream and drained; so a slow reader on
either side stalls its sender through the windows, and what the proxy holds
per direction is bounded by the windows it advertises (`Limits`). Readers
never wait for writers, so two peers that both write before reading cannot
deadlock the proxy.

Choices:
- `expect: 100-continue` is forwarded and the upstream's 100 relayed (HTTP/2
  needs no special framing for it).
- A local answer to a request whose body is still coming ends with
  RST_STREAM(NO_ERROR) ("stop sending", RFC 9113 8.1).
- RST_STREAM is propagated with its error code, both ways. An upstream that
  fails before the response head gets a 502 instead; after it, the downstream
  stream is reset (INTERNAL_ERROR).
- An upstream GOAWAY: streams it did not take are reset downstream with
  REFUSED_STREAM (safe for the client to retry); the others finish; new
  streams go to a new upstream connection.
- A request whose header list exceeds `Limits.max_header_bytes` gets 431 on its
  stream; beyond `Limits.h2_header_cap` (advertised as
  SETTINGS_MAX_HEADER_LIST_SIZE) the connection ends.
- CONNECT (and extended CONNECT, which is not enabled) gets 501; a :path that is
  not origin-form or "*" gets 400.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import h2.events as h2e
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes

from ambit.tasks import TaskSet
from waypoint.exchange import (
    Failure,
    Hooks,
    Limits,
    RawHeaders,
    Request,
    RequestRecord,
    Verdict,
    forwardable,
    forwardable_trailers,
    local_body,
    rewrite_request,
    text_headers,
)
from waypoint.h2input import Flood, FrameSplitter, GracefulGoaway
from waypoint.paths import PathError, check_authority, parse_target
from waypoint.streams import ByteStream, StreamReset
from ztunnel.hbone.h2compat import HboneH2Connection

log = logging.getLogger("ambit.waypoint.http2")

_DEFAULT_WINDOW = 65_535
_HEADER_OVERHEAD = 32  # RFC 9113 6.5.2: per field, on top of name and value
_IGNORED = (h2e.SettingsAcknowledged, h2e.PingReceived, h2e.PingAckReceived,
            h2e.PriorityUpdated, h2e.UnknownFrameReceived, h2e.AlternativeServiceAvailable)


class _H2(HboneH2Connection):
    """h2's connection with the HPACK decoder's hard limit raised to `Limits.h2_header_cap`.

    h2 reads DEFAULT_MAX_HEADER_LIST_SIZE in __init__ (like MAX_CLOSED_STREAMS, see
    ztunnel/hbone/h2compat.py) for the decoder and its initial local setting;
    the same value is then advertised, so the acknowledged setting keeps it.
    """

    def __init__(self, config: H2Configuration, limits: Limits) -> None:
        self.DEFAULT_MAX_HEADER_LIST_SIZE = limits.h2_header_cap
        super().__init__(config, closed_streams_kept=limits.h2_closed_streams_kept)


@dataclass(eq=False)
class _Exchange:
    """One downstream stream (and its upstream stream, once it has one)."""

    sid: int
    record: RequestRecord
    method: str = ""
    forwarding: bool = False  # allowed: the request goes upstream
    up_headers: RawHeaders = field(default_factory=list)
    up: _Side | None = None
    up_sid: int | None = None
    early: list[_Out] = field(default_factory=list)  # request parts waiting for the upstream
    request_ended: bool = False
    request_end_queued: bool = False
    response_started: bool = False
    response_end_queued: bool = False
    response_done: bool = False
    reset: bool = False
    finished: bool = False  # recorded


@dataclass(eq=False)
class _Out:
    """Something to send on one stream, in order: data (within the windows), then an end."""

    data: bytes = b""
    ack: tuple[_Side, int, int] | None = None  # give the source this much credit once sent
    end: bool = False
    trailers: RawHeaders | None = None  # ends the stream
    reset: ErrorCodes | None = None  # after everything before it
    done: _Exchange | None = None  # the response is complete once this is sent


class _Side:
    """One h2 connection of the proxy and its byte stream."""

    def __init__(self, name: str, stream: ByteStream, conn: _H2, splitter: FrameSplitter) -> None:
        self.name = name
        self.stream = stream
        self.conn = conn
        self.splitter = splitter
        self.outq: dict[int, deque[_Out]] = {}
        self.owed: list[tuple[_Side, int, int]] = []
        self.wake = asyncio.Event()
        self.lost: str | None = None  # the connection is gone, and why
        self.eof = False
        self.goaway: int | None = None  # the peer's graceful GOAWAY: last stream it takes
        self.exchanges: dict[int, _Exchange] = {}  # by this side's stream id
        self.data_frames = 0


async def serve_http2(down: ByteStream, hooks: Hooks, limits: Limits | None = None,
                      *, prefix: bytes = b"") -> None:
    """Proxy one downstream HTTP/2 (prior knowledge) connection until it ends. Never raises for
    bad input or a failed peer; `prefix` is bytes already read from `down` (by the sniffer)."""
    await Http2Proxy(down, hooks, limits or Limits(), prefix=prefix).run()


class Http2Proxy:
    """One downstream HTTP/2 connection (see the module docstring)."""

    def __init__(self, down: ByteStream, hooks: Hooks, limits: Limits, *, prefix: bytes = b"") -> None:
        self.hooks = hooks
        self.limits = limits
        self.prefix = prefix
        config = H2Configuration(client_side=False, header_encoding=None)
        self.down = _Side("downstream", down, _H2(config, limits),
                          FrameSplitter(server=True, max_header_list_size=limits.h2_header_cap))
        self.up: _Side | None = None
        self.old_ups: list[_Side] = []  # going away: their streams finish, no new ones
        self.waiting: deque[_Exchange] = deque()  # allowed, waiting for an upstream stream
        self.opening: asyncio.Task[None] | None = None
        self.tasks = TaskSet("waypoint-http2")
        self.done = asyncio.Event()
        self.ending = False  # the client is done sending new requests (EOF or GOAWAY)

    async def run(self) -> None:
        conn = self.down.conn
        conn.initiate_connection()
        conn.update_settings({
            SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.h2_max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.h2_header_cap,
            SettingCodes.INITIAL_WINDOW_SIZE: self.limits.h2_stream_window,
        })
        if self.limits.h2_connection_window > _DEFAULT_WINDOW:
            conn.increment_flow_control_window(self.limits.h2_connection_window - _DEFAULT_WINDOW)
        try:
            self._start(self.down)
            if self.prefix:
                self._receive(self.down, self.prefix)
            await self.done.wait()
        except Exception:
            log.exception("HTTP/2 proxy failed; closing the connection")
            self._fail_side(self.down, "internal error", ErrorCodes.INTERNAL_ERROR)
        finally:
            await self._shutdown()

    # ------------------------------------------------------------------ I/O tasks

    def _start(self, side: _Side) -> None:
        self.tasks.spawn(f"{side.name}-reader", self._reader(side))
        self.tasks.spawn(f"{side.name}-writer", self._writer(side))
        side.wake.set()

    async def _reader(self, side: _Side) -> None:
        try:
            while side.lost is None:
                data = await side.stream.read(self.limits.read_size)
                if not data:
                    self._eof(side)
                    return
                self._receive(side, data)
        except (StreamReset, OSError) as e:
            self._lost(side, f"{side.name} reset: {e}")
        except Exception:
            log.exception("HTTP/2 %s: error handling received data", side.name)
            self._fail_side(side, "internal error", ErrorCodes.INTERNAL_ERROR)
        finally:
            self._check_done()

    async def _writer(self, side: _Side) -> None:
        try:
            while True:
                await side.wake.wait()
                side.wake.clear()
                if side.lost is not None:
                    return
                data = side.conn.data_to_send()
                owed, side.owed = side.owed, []
                if side.data_frames:
                    side.splitter.guard.data_frames_sent(side.data_frames, self.hooks.clock())
                    side.data_frames = 0
                side.splitter.guard.output_taken()
                if data:
                    side.stream.write(data)
                    await side.stream.drain()
                for source, sid, n in owed:
                    self._ack(source, sid, n)
        except (StreamReset, OSError) as e:
            self._lost(side, f"{side.name} gone: {e}")
        except Exception:
            log.exception("HTTP/2 %s: error writing", side.name)
            self._fail_side(side, "internal error", ErrorCodes.INTERNAL_ERROR)
        finally:
            self._check_done()

    def _receive(self, side: _Side, data: bytes) -> None:
        try:
            for chunk in side.splitter.feed(data, self.hooks.clock()):
                if isinstance(chunk, GracefulGoaway):
                    self._graceful_goaway(side, chunk.last_stream_id)
                    continue
                for event in side.conn.receive_data(chunk):
                    if side is self.down:
                        self._down_event(event)
                    else:
                        self._up_event(side, event)
                    if side.lost is not None:
                        return
        except Flood as flood:
            log.warning("HTTP/2 %s: %s", side.name, flood.reason)
            self._fail_side(side, f"flood: {flood.reason}", flood.code)
        except ProtocolError as e:
            # h2 has queued a GOAWAY with the matching code
            self._fail_side(side, f"{side.name} broke HTTP/2: {e}", None)
        finally:
            self._start_waiting()
            self._wake_all()

    def _wake_all(self) -> None:
        for side in (self.down, self.up, *self.old_ups):
            if side is not None:
                side.wake.set()

    # --------------------------------------------------------------- downstream

    def _down_event(self, event: h2e.Event) -> None:
        if isinstance(event, h2e.RequestReceived):
            self._on_request(event.stream_id, event.headers or [])
        elif isinstance(event, h2e.DataReceived):
            self._on_request_data(event)
        elif isinstance(event, h2e.TrailersReceived):
            self._on_request_trailers(event.stream_id, event.headers or [])
        elif isinstance(event, h2e.StreamEnded):
            self._on_request_end(event.stream_id)
        elif isinstance(event, h2e.StreamReset):
            self._on_client_reset(event.stream_id, ErrorCodes(event.error_code or 0))
        elif isinstance(event, h2e.WindowUpdated):
            self._pump(self.down, event.stream_id or 0)
        elif isinstance(event, h2e.RemoteSettingsChanged):
            self._pump(self.down, 0)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = ErrorCodes(event.error_code or 0)
            self._fail_side(self.down, f"client sent GOAWAY({code.name})", None)
        elif not isinstance(event, _IGNORED):
            log.warning("HTTP/2 downstream: unexpected event %r", event)

    def _on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        record = RequestRecord(protocol="HTTP/2", start=self.hooks.clock(), stream_id=sid)
        x = _Exchange(sid, record)
        self.down.exchanges[sid] = x
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        regular = [(n, v) for n, v in headers if not n.startswith(b":")]
        x.method = record.method = pseudo.get(b":method", b"").decode("ascii", "surrogateescape")
        host = next((v for n, v in regular if n == b"host"), b"")
        authority = (pseudo.get(b":authority") or host).decode("ascii", "surrogateescape")
        record.authority = authority
        size = sum(len(n) + len(v) + _HEADER_OVERHEAD for n, v in headers)
        if size > self.limits.max_header_bytes:
            record.fail(Failure.HEADERS_TOO_LARGE,
                        f"header list of {size} bytes over {self.limits.max_header_bytes}")
            self._local(x, 431, local_body(431, record.detail))
            return
        if x.method == "CONNECT":
            record.fail(Failure.NOT_IMPLEMENTED, "CONNECT is not proxied by the waypoint")
            self._local(x, 501, local_body(501))
            return
        raw_path = pseudo.get(b":path", b"").decode("ascii", "surrogateescape")
        try:
            check_authority(authority)
            target = parse_target(raw_path, x.method)
            if target.form == "absolute":
                raise PathError(f":path {raw_path!r} must be origin-form in HTTP/2")
        except PathError as e:
            record.fail(Failure.BAD_REQUEST, str(e))
            self._local(x, 400, local_body(400, str(e)))
            return
        record.path = target.path
        scheme = pseudo.get(b":scheme", b"http").decode("ascii", "surrogateescape")
        request = Request(method=x.method, scheme=scheme, authority=authority, target=raw_path,
                          path=target.path, query=target.query, headers=text_headers(regular),
                          protocol="HTTP/2", stream_id=sid)
        record.request = request
        try:
            verdict = self.hooks.decide(request)
            if not isinstance(verdict, Verdict):
                raise TypeError(f"decide returned {type(verdict).__name__}, not a Verdict")
            verdict.check()
        except Exception as e:
            log.exception("decide failed for %s %s", x.method, target.path)
            record.fail(Failure.DECIDE_ERROR, f"decide failed: {e}")
            self._local(x, 500, local_body(500))
            return
        record.verdict = verdict
        if not verdict.allowed:
            self._local(x, verdict.status, verdict.body, verdict.response_headers)
            return
        x.forwarding = True
        x.up_headers = [
            (b":method", x.method.encode("ascii", "surrogateescape")),
            (b":scheme", scheme.encode("ascii", "surrogateescape")),
            (b":authority", authority.encode("ascii", "surrogateescape")),
            (b":path", target.forward.encode("ascii")),
            *rewrite_request(regular, verdict, keep_te_trailers=True),
        ]
        self.waiting.append(x)
        self._start_waiting()

    def _on_request_data(self, event: h2e.DataReceived) -> None:
        sid = event.stream_id
        n = event.flow_controlled_length or 0
        data = event.data or b""
        x = self.down.exchanges.get(sid)
        if x is not None:
            x.record.request_bytes += len(data)
        if x is None or not x.forwarding or x.request_end_queued or x.reset:
            self._ack(self.down, sid, n)  # nobody takes it: consumed here
            return
        self._to_upstream(x, _Out(data, ack=(self.down, sid, n)))

    def _on_request_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = self.down.exchanges.get(sid)
        if x is None or not x.forwarding or x.request_end_queued or x.reset:
            return
        trailers = forwardable_trailers(headers)
        x.request_end_queued = True
        self._to_upstream(x, _Out(trailers=trailers) if trailers else _Out(end=True))

    def _on_request_end(self, sid: int) -> None:
        x = self.down.exchanges.get(sid)
        if x is None:
            return
        x.request_ended = True
        if x.forwarding and not x.request_end_queued and not x.reset:
            x.request_end_queued = True
            self._to_upstream(x, _Out(end=True))
        self._forget_if_done(x)

    def _to_upstream(self, x: _Exchange, item: _Out) -> None:
        if x.up is None or x.up_sid is None:
            x.early.append(item)
        else:
            self._queue(x.up, x.up_sid, item)

    def _on_client_reset(self, sid: int, code: ErrorCodes) -> None:
        x = self.down.exchanges.get(sid)
        if x is None:
            return
        x.record.fail(Failure.CLIENT_RESET, f"client reset the stream ({code.name})")
        self._drop(self.down, sid)
        self._reset_upstream(x, code)
        self._end(x)

    def _local(self, x: _Exchange, status: int, body: bytes,
               extra: Iterable[tuple[str, str]] = ()) -> None:
        """Answer a stream here (x has no upstream stream)."""
        headers = [(n.lower().encode("ascii"), v.encode("utf-8", "surrogateescape"))
                   for n, v in extra]
        if not any(n == b"content-type" for n, _ in headers):
            headers.insert(0, (b"content-type", b"text/plain"))
        if x.method == "HEAD" or status in (204, 304):
            body = b""
        headers = [(b":status", str(status).encode()), *headers,
                   (b"content-length", str(len(body)).encode())]
        stop = None if x.request_ended else ErrorCodes.NO_ERROR
        x.forwarding = False  # whatever more of the request comes is read and dropped
        try:
            self.down.conn.send_headers(x.sid, headers, end_stream=not body)
        except H2Error as e:
            x.record.fail(Failure.CLIENT_RESET, f"cannot answer: {e}")
            self._end(x)
            return
        x.response_started = True
        x.response_end_queued = True
        x.record.status = status
        x.record.response_bytes += len(body)
        if body:
            self._queue(self.down, x.sid, _Out(body, end=True, reset=stop, done=x))
            return
        if stop is not None:
            self._reset_down(x.sid, stop)
        self._response_done(x)

    # ----------------------------------------------------------------- upstream

    def _start_waiting(self) -> None:
        """Give waiting exchanges an upstream stream, opening an upstream connection if needed."""
        while self.waiting:
            up = self.up
            if up is None:
                if self.opening is None and not self.done.is_set():
                    self.opening = self.tasks.spawn("open-upstream", self._open_upstream())
                return
            if up.conn.open_outbound_streams >= up.conn.remote_settings.max_concurrent_streams:
                return  # a stream slot frees when one of its streams closes
            x = self.waiting.popleft()
            if not x.reset and not x.finished:
                self._open_stream(x, up)

    async def _open_upstream(self) -> None:
        try:
            stream = await self.hooks.open_upstream()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.opening = None
            waiting, self.waiting = list(self.waiting), deque()
            for x in waiting:
                if x.reset or x.finished:
                    continue
                x.record.fail(Failure.UPSTREAM_CONNECT, f"upstream connect failed: {e}")
                self._drop_early(x)
                self._local(x, 503, local_body(503))
            self._wake_all()
            self._check_done()
            return
        self.opening = None
        if self.done.is_set():
            stream.abort()
            return
        conn = _H2(H2Configuration(client_side=True, header_encoding=None), self.limits)
        side = _Side("upstream", stream, conn, FrameSplitter(server=False,
                                                             max_header_list_size=self.limits.h2_header_cap))
        conn.initiate_connection()
        conn.update_settings({
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.h2_header_cap,
            SettingCodes.INITIAL_WINDOW_SIZE: self.limits.h2_stream_window,
        })
        if self.limits.h2_connection_window > _DEFAULT_WINDOW:
            conn.increment_flow_control_window(self.limits.h2_connection_window - _DEFAULT_WINDOW)
        self.up = side
        self._start(side)
        self._start_waiting()
        self._wake_all()

    def _open_stream(self, x: _Exchange, up: _Side) -> None:
        up_sid = up.conn.get_next_available_stream_id()
        early, x.early = x.early, []
        end_now = x.request_end_queued and len(early) == 1 and early[0].end and not early[0].data
        try:
            up.conn.send_headers(up_sid, x.up_headers, end_stream=end_now)
        except H2Error as e:
            for item in early:
                if item.ack is not None:
                    self._ack(*item.ack)
            x.record.fail(Failure.UPSTREAM_PROTOCOL, f"cannot open an upstream stream: {e}")
            self._local(x, 502, local_body(502))
            return
        x.up, x.up_sid = up, up_sid
        x.record.forwarded = True
        up.exchanges[up_sid] = x
        if not end_now:
            for item in early:
                self._queue(up, up_sid, item)
        up.wake.set()

    def _up_event(self, up: _Side, event: h2e.Event) -> None:
        if isinstance(event, h2e.ResponseReceived):
            self._on_response(up, event.stream_id, event.headers or [])
        elif isinstance(event, h2e.InformationalResponseReceived):
            self._on_informational(up, event.stream_id, event.headers or [])
        elif isinstance(event, h2e.DataReceived):
            self._on_response_data(up, event)
        elif isinstance(event, h2e.TrailersReceived):
            self._on_response_trailers(up, event.stream_id, event.headers or [])
        elif isinstance(event, h2e.StreamEnded):
            self._on_response_end(up, event.stream_id)
        elif isinstance(event, h2e.StreamReset):
            self._on_upstream_reset(up, event.stream_id, ErrorCodes(event.error_code or 0))
        elif isinstance(event, h2e.WindowUpdated):
            self._pump(up, event.stream_id or 0)
        elif isinstance(event, h2e.RemoteSettingsChanged):
            self._pump(up, 0)
            self._start_waiting()
        elif isinstance(event, h2e.ConnectionTerminated):
            code = ErrorCodes(event.error_code or 0)
            self._fail_side(up, f"upstream sent GOAWAY({code.name})", None)
        elif not isinstance(event, _IGNORED):
            log.warning("HTTP/2 upstream: unexpected event %r", event)

    def _on_response(self, up: _Side, up_sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset:
            return
        size = sum(len(n) + len(v) + _HEADER_OVERHEAD for n, v in headers)
        if size > self.limits.max_response_header_bytes:
            x.record.fail(Failure.UPSTREAM_PROTOCOL,
                          f"response header list of {size} bytes over "
                          f"{self.limits.max_response_header_bytes}")
            self._reset_upstream(x, ErrorCodes.CANCEL)
            self._local(x, 502, local_body(502))
            return
        status = next((v for n, v in headers if n == b":status"), b"0")
        forward = [(b":status", status), *forwardable([(n, v) for n, v in headers
                                                        if not n.startswith(b":")])]
        try:
            self.down.conn.send_headers(x.sid, forward)
        except H2Error as e:
            x.record.fail(Failure.CLIENT_RESET, f"cannot relay the response head: {e}")
            self._reset_upstream(x, ErrorCodes.CANCEL)
            self._end(x)
            return
        x.response_started = True
        x.record.status = int(status)

    def _on_informational(self, up: _Side, up_sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_started:
            return
        status = next((v for n, v in headers if n == b":status"), b"")
        if status == b"101":
            return
        forward = [(b":status", status), *forwardable([(n, v) for n, v in headers
                                                        if not n.startswith(b":")])]
        try:
            self.down.conn.send_headers(x.sid, forward)
        except H2Error:
            pass

    def _on_response_data(self, up: _Side, event: h2e.DataReceived) -> None:
        up_sid = event.stream_id
        n = event.flow_controlled_length or 0
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_end_queued:
            self._ack(up, up_sid, n)
            return
        data = event.data or b""
        x.record.response_bytes += len(data)
        self._queue(self.down, x.sid, _Out(data, ack=(up, up_sid, n)))

    def _on_response_trailers(self, up: _Side, up_sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_end_queued:
            return
        trailers = forwardable_trailers(headers)
        x.response_end_queued = True
        self._queue(self.down, x.sid, _Out(trailers=trailers, done=x) if trailers
                    else _Out(end=True, done=x))

    def _on_response_end(self, up: _Side, up_sid: int) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_end_queued:
            return
        x.response_end_queued = True
        self._queue(self.down, x.sid, _Out(end=True, done=x))

    def _on_upstream_reset(self, up: _Side, up_sid: int, code: ErrorCodes) -> None:
        x = up.exchanges.pop(up_sid, None)
        self._drop(up, up_sid)
        if x is None or x.reset:
            return
        x.up_sid = None
        if x.response_end_queued and code == ErrorCodes.NO_ERROR:
            # the response is complete and the upstream wants no more of the request: say so
            if not x.request_ended:
                self._queue(self.down, x.sid, _Out(reset=ErrorCodes.NO_ERROR))
            x.request_end_queued = x.request_ended = True
            self._forget_if_done(x)
            return
        x.record.fail(Failure.UPSTREAM_RESET, f"upstream reset the stream ({code.name})")
        self._drop(self.down, x.sid)
        self._reset_down(x.sid, code)
        self._end(x)
        self._start_waiting()

    def _graceful_goaway(self, side: _Side, last_id: int) -> None:
        side.goaway = last_id if side.goaway is None else min(side.goaway, last_id)
        if side is self.down:
            self.ending = True
            self._check_done()
            return
        for up_sid, x in sorted(side.exchanges.items()):
            if up_sid > last_id:
                side.exchanges.pop(up_sid, None)
                self._drop(side, up_sid)
                try:
                    side.conn.reset_stream(up_sid, ErrorCodes.CANCEL)
                except H2Error:
                    pass
                x.record.fail(Failure.UPSTREAM_RESET, "upstream went away before taking the stream")
                self._drop(self.down, x.sid)
                self._reset_down(x.sid, ErrorCodes.REFUSED_STREAM)
                self._end(x)
        self._retire(side)

    def _retire(self, side: _Side) -> None:
        """No new streams on this upstream connection; close it once its streams are done."""
        if side is self.up:
            self.up = None
            self.old_ups.append(side)
        self._close_if_idle(side)
        self._start_waiting()

    def _close_if_idle(self, side: _Side) -> None:
        if side in self.old_ups and not side.exchanges and not side.outq:
            self.old_ups.remove(side)
            self._close_side(side)

    # ------------------------------------------------------------ stream output

    def _queue(self, side: _Side, sid: int, item: _Out) -> None:
        if side.lost is not None:
            if item.ack is not None:
                self._ack(*item.ack)
            return
        side.outq.setdefault(sid, deque()).append(item)
        self._pump_stream(side, sid)
        side.wake.set()

    def _pump(self, side: _Side, sid: int) -> None:
        if side.lost is not None:
            return
        for s in (list(side.outq) if sid == 0 else [sid]):
            self._pump_stream(side, s)
        side.wake.set()

    def _pump_stream(self, side: _Side, sid: int) -> None:
        queue = side.outq.get(sid)
        conn = side.conn
        while queue:
            item = queue.popleft()
            try:
                while item.data:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        queue.appendleft(item)
                        return  # a WindowUpdated resumes it
                    conn.send_data(sid, item.data[:window])
                    side.data_frames += 1
                    item.data = item.data[window:]
                if item.trailers is not None:
                    conn.send_headers(sid, item.trailers, end_stream=True)
                elif item.end:
                    conn.end_stream(sid)
                if item.reset is not None:
                    conn.reset_stream(sid, item.reset)
            except H2Error as e:
                log.debug("HTTP/2 %s: stream %d cannot take more: %s", side.name, sid, e)
                if item.ack is not None:
                    self._ack(*item.ack)
                self._drop(side, sid)
                if item.done is not None:
                    item.done.record.fail(Failure.CLIENT_RESET, f"stream closed: {e}")
                    self._end(item.done)
                return
            if item.ack is not None:
                side.owed.append(item.ack)
            if item.done is not None:
                self._response_done(item.done)
        side.outq.pop(sid, None)
        if side is not self.down:
            self._close_if_idle(side)

    def _drop(self, side: _Side, sid: int) -> None:
        """Forget what waits to be sent on a stream; its sources get their credit back."""
        for item in side.outq.pop(sid, ()):
            if item.ack is not None:
                self._ack(*item.ack)

    def _drop_early(self, x: _Exchange) -> None:
        early, x.early = x.early, []
        for item in early:
            if item.ack is not None:
                self._ack(*item.ack)

    def _ack(self, source: _Side, sid: int, n: int) -> None:
        if n <= 0 or source.lost is not None:
            return
        try:
            source.conn.acknowledge_received_data(n, sid)
        except H2Error:
            return
        source.wake.set()

    def _reset_down(self, sid: int, code: ErrorCodes) -> None:
        if self.down.lost is not None:
            return
        try:
            self.down.conn.reset_stream(sid, code)
        except H2Error:
            pass
        self.down.wake.set()

    def _reset_upstream(self, x: _Exchange, code: ErrorCodes) -> None:
        self._drop_early(x)
        up, up_sid = x.up, x.up_sid
        if up is None or up_sid is None:
            return
        up.exchanges.pop(up_sid, None)
        self._drop(up, up_sid)
        x.up_sid = None
        if up.lost is None:
            try:
                up.conn.reset_stream(up_sid, code)
            except H2Error:
                pass
            up.wake.set()
        self._close_if_idle(up)
        self._start_waiting()

    # ------------------------------------------------------------- exchange ends

    def _response_done(self, x: _Exchange) -> None:
        x.response_done = True
        self._finish(x)
        self._forget_if_done(x)

    def _end(self, x: _Exchange) -> None:
        """The exchange is over (reset, or failed): forget it on both sides."""
        x.reset = True
        self._finish(x)
        self._drop_early(x)
        self._forget(x)

    def _forget_if_done(self, x: _Exchange) -> None:
        if x.response_done and (x.request_ended or not x.forwarding):
            self._forget(x)

    def _forget(self, x: _Exchange) -> None:
        if self.down.exchanges.get(x.sid) is x:
            del self.down.exchanges[x.sid]
        up = x.up
        if up is not None and x.up_sid is not None and up.exchanges.get(x.up_sid) is x:
            del up.exchanges[x.up_sid]
            self._close_if_idle(up)
        self._start_waiting()
        self._check_done()

    def _finish(self, x: _Exchange) -> None:
        if x.finished:
            return
        x.finished = True
        x.record.end = self.hooks.clock()
        try:
            self.hooks.on_request(x.record)
        except Exception:
            log.exception("on_request hook failed")

    # ------------------------------------------------------------ connection ends

    def _eof(self, side: _Side) -> None:
        side.eof = True
        if side is self.down:
            # no more requests; those whose bodies will now never end are over
            self.ending = True
            for x in list(self.down.exchanges.values()):
                if not x.request_ended:
                    x.record.fail(Failure.CLIENT_RESET, "client closed the connection mid-request")
                    self._reset_upstream(x, ErrorCodes.CANCEL)
                    self._end(x)
            self._check_done()
        else:
            self._lost(side, "upstream closed the connection")

    def _lost(self, side: _Side, reason: str) -> None:
        self._fail_side(side, reason, None, wire_gone=True)

    def _fail_side(self, side: _Side, reason: str, code: ErrorCodes | None,
                   *, wire_gone: bool = False) -> None:
        """One connection is over: its exchanges fail; the downstream's end ends the proxy."""
        if side.lost is not None:
            return
        if code is not None and not wire_gone:
            try:
                side.conn.close_connection(error_code=code, additional_data=reason.encode()[:256])
            except H2Error:
                pass
        if not wire_gone:
            # what is queued (a GOAWAY) goes out before the stream closes
            self._flush_now(side)
        side.lost = reason
        side.wake.set()
        if side is self.down:
            for x in list(self.down.exchanges.values()):
                x.record.fail(Failure.CLIENT_RESET if wire_gone else Failure.CLIENT_PROTOCOL,
                              reason)
                self._reset_upstream(x, ErrorCodes.CANCEL)
                self._end(x)
            self.done.set()
            return
        if side is self.up:
            self.up = None
        elif side in self.old_ups:
            self.old_ups.remove(side)
        for up_sid, x in list(side.exchanges.items()):
            side.exchanges.pop(up_sid, None)
            x.up_sid = None
            if x.reset or (x.finished and x.response_done):
                continue
            x.record.fail(Failure.UPSTREAM_RESET, reason)
            if not x.response_started:
                x.up = None
                self._local(x, 502, local_body(502))
            else:
                self._drop(self.down, x.sid)
                self._reset_down(x.sid, ErrorCodes.INTERNAL_ERROR)
                self._end(x)
        side.outq.clear()
        side.owed.clear()
        side.stream.abort() if wire_gone else side.stream.close()
        self._start_waiting()
        self._wake_all()

    def _flush_now(self, side: _Side) -> None:
        data = side.conn.data_to_send()
        if data:
            side.stream.write(data)

    def _close_side(self, side: _Side) -> None:
        """Close a connection of ours gracefully (GOAWAY, then the stream)."""
        if side.lost is not None:
            return
        try:
            side.conn.close_connection()
        except H2Error:
            pass
        self._flush_now(side)
        side.lost = "closed"
        side.wake.set()
        side.stream.close()

    def _check_done(self) -> None:
        if self.done.is_set():
            return
        if self.down.lost is not None or (
            self.ending and not self.down.exchanges and not self.waiting
        ):
            self.done.set()

    async def _shutdown(self) -> None:
        self.done.set()
        await self.tasks.close()
        for x in list(self.down.exchanges.values()):
            if not x.finished:
                x.record.fail(Failure.CLIENT_RESET, "connection closed")
            self._reset_upstream(x, ErrorCodes.CANCEL)
            self._end(x)
        for x in list(self.waiting):
            if not x.finished:
                x.record.fail(Failure.CLIENT_RESET, "connection closed")
                self._end(x)
        self.waiting.clear()
        for side in (self.up, *self.old_ups):
            if side is not None:
                self._close_side(side)
        self.up = None
        self.old_ups.clear()
        if self.down.lost is None:
            self._close_side(self.down)
        else:
            self.down.stream.close()
