"""The HTTP/2 proxy of one downstream connection: h2 server side, one h2 client connection upstream.

Every downstream stream is judged on its own (waypoint.admission). A refused
one is answered here (the others go on); an allowed one gets a stream of the
upstream connection, which is opened on the first allowed request and kept for
the connection's life (a new one is opened when it goes away); streams map
1:1. Protocol work happens synchronously in event handlers; the I/O, flow
control and back-pressure are each side's (waypoint.h2side).

Choices:
- `expect: 100-continue` is forwarded and the upstream's 1xx relayed.
- A local answer to a request whose body is still coming ends with
  RST_STREAM(NO_ERROR) ("stop sending", RFC 9113 8.1).
- RST_STREAM is propagated with its error code, both ways. An upstream
  connection lost before a stream's response head gets a 502 on it; after the
  head, the downstream stream is reset (INTERNAL_ERROR).
- An upstream's graceful GOAWAY: streams it did not take are reset downstream
  with REFUSED_STREAM (safe for the client to retry), the others finish, new
  streams go to a new upstream connection. More streams than the upstream
  allows at once wait for a slot.
- A request whose header list exceeds `Limits.max_header_bytes` gets 431 on its
  stream; beyond `Limits.h2_header_cap` (advertised as
  SETTINGS_MAX_HEADER_LIST_SIZE) the connection ends. An upstream response
  head over `Limits.max_response_header_bytes` is a 502.
- A protocol error or flood from the client ends its connection with GOAWAY;
  its streams' upstream streams are reset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.events as h2e
from h2.errors import ErrorCodes
from h2.exceptions import H2Error

from ambit.tasks import TaskSet
from waypoint.admission import Head, Refused, admit, local_body
from waypoint.exchange import Failure, Hooks, Limits, RequestRecord
from waypoint.h2side import H2Side, Out, new_side
from waypoint.h2upstream import Upstreams
from waypoint.headers import RawHeaders, forwardable, forwardable_trailers, rewrite_request
from waypoint.streams import ByteStream

log = logging.getLogger("ambit.waypoint.http2")

_DEFAULT_WINDOW = 65_535
_HEADER_OVERHEAD = 32  # RFC 9113 6.5.2: per field, on top of name and value
_IGNORED = (h2e.SettingsAcknowledged, h2e.PingReceived, h2e.PingAckReceived,
            h2e.PriorityUpdated, h2e.UnknownFrameReceived, h2e.AlternativeServiceAvailable)


@dataclass(eq=False)
class _Exchange:
    """One downstream stream (and its upstream stream, once it has one)."""

    sid: int
    record: RequestRecord
    method: str = ""
    forwarding: bool = False  # allowed: the request goes upstream
    up_headers: RawHeaders = field(default_factory=list)
    up: Side | None = None
    up_sid: int | None = None
    early: list[Out] = field(default_factory=list)  # request parts waiting for the upstream
    request_ended: bool = False
    request_end_queued: bool = False
    response_started: bool = False
    response_end_queued: bool = False
    response_done: bool = False
    reset: bool = False
    finished: bool = False  # recorded


Side = H2Side[_Exchange]


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
        self.down: Side = new_side("downstream", down, self, limits, hooks.clock, server=True)
        self.tasks = TaskSet("waypoint-http2")
        self.ups: Upstreams[_Exchange] = Upstreams(
            tasks=self.tasks, open_side=self._open_upstream, start_stream=self._open_stream,
            open_failed=self._open_failed, alive=lambda x: not x.reset and not x.finished)
        self.done = asyncio.Event()
        self.ending = False  # the client sends no more requests (EOF or GOAWAY)

    async def run(self) -> None:
        try:
            self.down.start(self.tasks)
            if self.prefix:
                self.down.receive(self.prefix)
            await self.done.wait()
        except Exception:
            log.exception("HTTP/2 proxy failed; closing the connection")
            self.side_failed(self.down, "internal error", ErrorCodes.INTERNAL_ERROR, wire_gone=False)
        finally:
            await self._shutdown()

    # ------------------------------------------------------- from the sides

    def side_events(self, side: Side, events: list[h2e.Event]) -> None:
        for event in events:
            if side is self.down:
                self._down_event(event)
            else:
                self._up_event(side, event)
            if side.lost is not None:
                return

    def side_received(self, side: Side) -> None:
        self.ups.start_waiting()
        for s in (self.down, *self.ups.sides()):
            s.wake.set()
        self._check_done()

    def side_idle(self, side: Side) -> None:
        if side is not self.down:
            self.ups.close_if_idle(side)

    def side_goaway(self, side: Side, last_stream_id: int) -> None:
        if side is self.down:
            self.ending = True
            self._check_done()
            return
        for up_sid, x in sorted(side.exchanges.items()):
            if up_sid > last_stream_id:
                side.exchanges.pop(up_sid, None)
                side.reset_stream(up_sid, ErrorCodes.CANCEL)
                x.up_sid = None
                self._fail(x, Failure.UPSTREAM_RESET, "upstream went away before taking the stream")
                self.down.reset_stream(x.sid, ErrorCodes.REFUSED_STREAM)
                self._end(x)
        self.ups.retire(side)

    def side_eof(self, side: Side) -> None:
        if side is not self.down:
            self.side_failed(side, "upstream closed the connection", None, wire_gone=True)
            return
        # no more requests; those whose bodies will now never end are over
        self.ending = True
        for x in list(self.down.exchanges.values()):
            if not x.request_ended:
                self._fail(x, Failure.CLIENT_RESET, "client closed the connection mid-request")
                self._reset_upstream(x, ErrorCodes.CANCEL)
                self._end(x)
        self._check_done()

    def side_failed(self, side: Side, reason: str, code: ErrorCodes | None, *, wire_gone: bool) -> None:
        """One connection is over: its exchanges fail; the downstream's end ends the proxy."""
        if side.lost is not None:
            return
        if side is self.down:
            failure = Failure.CLIENT_RESET if wire_gone else Failure.CLIENT_PROTOCOL
            for x in list(self.down.exchanges.values()):
                self._fail(x, failure, reason)
                self._reset_upstream(x, ErrorCodes.CANCEL)
                self._end(x)
            side.shut(reason, code, wire_gone=wire_gone)
            self.done.set()
            return
        side.shut(reason, code, wire_gone=wire_gone)
        self.ups.lost(side)
        for up_sid, x in list(side.exchanges.items()):
            side.exchanges.pop(up_sid, None)
            x.up_sid = None
            if x.reset or x.response_done:
                continue
            self._fail(x, Failure.UPSTREAM_RESET, reason)
            if not x.response_started:
                self._local(x, 502, local_body(502))
            else:
                self.down.reset_stream(x.sid, ErrorCodes.INTERNAL_ERROR)
                self._end(x)
        self.ups.start_waiting()

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
            self.down.pump(event.stream_id or 0)
        elif isinstance(event, h2e.RemoteSettingsChanged):
            self.down.pump(0)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = ErrorCodes(event.error_code or 0)
            self.side_failed(self.down, f"client sent GOAWAY({code.name})", None, wire_gone=False)
        elif not isinstance(event, _IGNORED):
            log.warning("HTTP/2 downstream: unexpected event %r", event)

    def _on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        record = RequestRecord(protocol="HTTP/2", start=self.hooks.clock(), stream_id=sid)
        x = _Exchange(sid, record)
        self.down.exchanges[sid] = x
        pseudo = {n: v.decode("ascii", "surrogateescape") for n, v in headers if n.startswith(b":")}
        regular = [(n, v) for n, v in headers if not n.startswith(b":")]
        host = next((v for n, v in regular if n == b"host"), b"").decode("ascii", "surrogateescape")
        x.method = pseudo.get(b":method", "")
        scheme = pseudo.get(b":scheme", "http")
        head = Head(method=x.method, target=pseudo.get(b":path", ""),
                    authority=pseudo.get(b":authority") or host, scheme=scheme, headers=regular,
                    protocol="HTTP/2", stream_id=sid,
                    size=sum(len(n) + len(v) + _HEADER_OVERHEAD for n, v in headers))
        outcome = admit(head, self.hooks, self.limits, record)
        if isinstance(outcome, Refused):
            self._local(x, outcome.status, outcome.body, outcome.headers)
            return
        x.forwarding = True
        x.up_headers = [
            (b":method", x.method.encode("ascii", "surrogateescape")),
            (b":scheme", scheme.encode("ascii", "surrogateescape")),
            (b":authority", record.authority.encode("ascii", "surrogateescape")),
            (b":path", outcome.target.forward.encode("ascii")),
            *rewrite_request(regular, outcome.verdict, keep_te_trailers=True),
        ]
        self.ups.want(x)

    def _on_request_data(self, event: h2e.DataReceived) -> None:
        sid = event.stream_id
        n = event.flow_controlled_length or 0
        data = event.data or b""
        x = self.down.exchanges.get(sid)
        if x is not None:
            x.record.request_bytes += len(data)
        if x is None or not x.forwarding or x.request_end_queued or x.reset:
            self.down.ack(sid, n)  # nobody takes it: consumed here
            return
        self._to_upstream(x, Out(data, ack=(self.down, sid, n)))

    def _on_request_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = self.down.exchanges.get(sid)
        if x is None or not x.forwarding or x.request_end_queued or x.reset:
            return
        trailers = forwardable_trailers(headers)
        x.request_end_queued = True
        self._to_upstream(x, Out(trailers=trailers) if trailers else Out(end=True))

    def _on_request_end(self, sid: int) -> None:
        x = self.down.exchanges.get(sid)
        if x is None:
            return
        x.request_ended = True
        if x.forwarding and not x.request_end_queued and not x.reset:
            x.request_end_queued = True
            self._to_upstream(x, Out(end=True))
        self._forget_if_done(x)

    def _to_upstream(self, x: _Exchange, item: Out) -> None:
        if x.up is None or x.up_sid is None:
            x.early.append(item)
        else:
            x.up.queue(x.up_sid, item)

    def _on_client_reset(self, sid: int, code: ErrorCodes) -> None:
        x = self.down.exchanges.get(sid)
        if x is None:
            return
        self._fail(x, Failure.CLIENT_RESET, f"client reset the stream ({code.name})")
        self.down.drop(sid)
        self._reset_upstream(x, code)
        self._end(x)

    def _local(self, x: _Exchange, status: int, body: bytes,
               extra: Iterable[tuple[str, str]] = ()) -> None:
        """Answer a stream here (it has no upstream stream)."""
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
        x.up = None
        try:
            self.down.conn.send_headers(x.sid, headers, end_stream=not body)
        except H2Error as e:
            self._fail(x, Failure.CLIENT_RESET, f"cannot answer: {e}")
            self._end(x)
            return
        x.response_started = x.response_end_queued = True
        x.record.status = status
        x.record.response_bytes += len(body)
        if body:
            self.down.queue(x.sid, Out(body, end=True, reset=stop, done=self._when_sent(x)))
            return
        if stop is not None:
            self.down.reset_stream(x.sid, stop)
        self._response_done(x)

    # ----------------------------------------------------------------- upstream

    async def _open_upstream(self) -> Side:
        stream = await self.hooks.open_upstream()
        side: Side = new_side("upstream", stream, self, self.limits, self.hooks.clock, server=False)
        side.start(self.tasks)
        return side

    def _open_failed(self, waiting: list[_Exchange], error: Exception) -> None:
        for x in waiting:
            self._fail(x, Failure.UPSTREAM_CONNECT, f"upstream connect failed: {error}")
            self._drop_early(x)
            self._local(x, 503, local_body(503))
        self.side_received(self.down)

    def _open_stream(self, x: _Exchange, up: Side) -> None:
        up_sid = up.conn.get_next_available_stream_id()
        early, x.early = x.early, []
        end_now = x.request_end_queued and len(early) == 1 and early[0].end and not early[0].data
        try:
            up.conn.send_headers(up_sid, x.up_headers, end_stream=end_now)
        except H2Error as e:
            x.early = early
            self._drop_early(x)
            self._fail(x, Failure.UPSTREAM_PROTOCOL, f"cannot open an upstream stream: {e}")
            self._local(x, 502, local_body(502))
            return
        x.up, x.up_sid = up, up_sid
        x.record.forwarded = True
        up.exchanges[up_sid] = x
        if not end_now:
            for item in early:
                up.queue(up_sid, item)
        up.wake.set()

    def _up_event(self, up: Side, event: h2e.Event) -> None:
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
            up.pump(event.stream_id or 0)
        elif isinstance(event, h2e.RemoteSettingsChanged):
            up.pump(0)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = ErrorCodes(event.error_code or 0)
            self.side_failed(up, f"upstream sent GOAWAY({code.name})", None, wire_gone=False)
        elif not isinstance(event, _IGNORED):
            log.warning("HTTP/2 upstream: unexpected event %r", event)

    def _on_response(self, up: Side, up_sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset:
            return
        size = sum(len(n) + len(v) + _HEADER_OVERHEAD for n, v in headers)
        if size > self.limits.max_response_header_bytes:
            self._fail(x, Failure.UPSTREAM_PROTOCOL, f"response header list of {size} bytes over "
                                                     f"{self.limits.max_response_header_bytes}")
            self._reset_upstream(x, ErrorCodes.CANCEL)
            self._local(x, 502, local_body(502))
            return
        status = next((v for n, v in headers if n == b":status"), b"0")
        if not self._relay_head(x, status, headers):
            return
        x.response_started = True
        x.record.status = int(status)

    def _on_informational(self, up: Side, up_sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = up.exchanges.get(up_sid)
        status = next((v for n, v in headers if n == b":status"), b"")
        if x is not None and not x.reset and not x.response_started and status != b"101":
            self._relay_head(x, status, headers)

    def _relay_head(self, x: _Exchange, status: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        fields = [(b":status", status), *forwardable([(n, v) for n, v in headers
                                                       if not n.startswith(b":")])]
        try:
            self.down.conn.send_headers(x.sid, fields)
        except H2Error as e:
            self._fail(x, Failure.CLIENT_RESET, f"cannot relay the response head: {e}")
            self._reset_upstream(x, ErrorCodes.CANCEL)
            self._end(x)
            return False
        self.down.wake.set()
        return True

    def _on_response_data(self, up: Side, event: h2e.DataReceived) -> None:
        up_sid = event.stream_id
        n = event.flow_controlled_length or 0
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_end_queued:
            up.ack(up_sid, n)
            return
        data = event.data or b""
        x.record.response_bytes += len(data)
        self.down.queue(x.sid, Out(data, ack=(up, up_sid, n)))

    def _on_response_trailers(self, up: Side, up_sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_end_queued:
            return
        trailers = forwardable_trailers(headers)
        x.response_end_queued = True
        self.down.queue(x.sid, Out(trailers=trailers or None, end=not trailers,
                                   done=self._when_sent(x)))

    def _on_response_end(self, up: Side, up_sid: int) -> None:
        x = up.exchanges.get(up_sid)
        if x is None or x.reset or x.response_end_queued:
            return
        x.response_end_queued = True
        self.down.queue(x.sid, Out(end=True, done=self._when_sent(x)))

    def _on_upstream_reset(self, up: Side, up_sid: int, code: ErrorCodes) -> None:
        x = up.exchanges.pop(up_sid, None)
        up.drop(up_sid)
        if x is None or x.reset:
            return
        x.up_sid = None
        if x.response_end_queued and code == ErrorCodes.NO_ERROR:
            # the response is complete and the upstream wants no more of the request: say so
            if not x.request_ended:
                self.down.queue(x.sid, Out(reset=ErrorCodes.NO_ERROR))
            x.request_end_queued = x.request_ended = True
            self._forget_if_done(x)
            return
        self._fail(x, Failure.UPSTREAM_RESET, f"upstream reset the stream ({code.name})")
        self.down.reset_stream(x.sid, code)
        self._end(x)

    def _reset_upstream(self, x: _Exchange, code: ErrorCodes) -> None:
        self._drop_early(x)
        up, up_sid = x.up, x.up_sid
        if up is None or up_sid is None:
            return
        up.exchanges.pop(up_sid, None)
        x.up_sid = None
        up.reset_stream(up_sid, code)
        self.ups.close_if_idle(up)

    def _drop_early(self, x: _Exchange) -> None:
        early, x.early = x.early, []
        for item in early:
            if item.ack is not None:
                source, sid, n = item.ack
                source.ack(sid, n)

    # ------------------------------------------------------------- exchange ends

    def _when_sent(self, x: _Exchange) -> Callable[[str | None], None]:
        def done(why: str | None) -> None:
            if why is None:
                self._response_done(x)
            else:
                self._fail(x, Failure.CLIENT_RESET, why)
                self._reset_upstream(x, ErrorCodes.CANCEL)
                self._end(x)
        return done

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
            self.ups.close_if_idle(up)
        self._check_done()

    def _fail(self, x: _Exchange, failure: Failure, detail: str) -> None:
        """Note why the exchange failed, unless it is already reported."""
        if not x.finished:
            x.record.fail(failure, detail)

    def _finish(self, x: _Exchange) -> None:
        if x.finished:
            return
        x.finished = True
        x.record.end = self.hooks.clock()
        try:
            self.hooks.on_request(x.record)
        except Exception:
            log.exception("on_request hook failed")

    def _check_done(self) -> None:
        if not self.done.is_set() and (
            self.down.lost is not None or (self.ending and not self.down.exchanges)
        ):
            self.done.set()

    async def _shutdown(self) -> None:
        self.done.set()
        await self.tasks.close()
        for x in list(self.down.exchanges.values()):
            self._fail(x, Failure.CLIENT_RESET, "connection closed")
            self._reset_upstream(x, ErrorCodes.CANCEL)
            self._end(x)
        self.ups.close()
        self.down.close()
