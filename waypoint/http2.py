"""The HTTP/2 proxy of one downstream connection: h2 server side, h2 client connections upstream.

Every downstream stream is judged on its own (waypoint.admission). A refused
one is answered here (the others go on); an allowed one gets a stream of the
upstream connection (waypoint.h2upstream: opened on the first allowed request
and kept; a new one when it goes away); streams map 1:1 (waypoint.h2exchange).
Protocol work happens synchronously in event handlers; the I/O, flow control
and back-pressure are each side's (waypoint.h2side).

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
- A verdict that names its own `Upstream` (a gateway's route) gets upstream
  connections of its own, one set per `Upstream.key`; the verdict's
  `max_request_body` (413, or a reset once the response has started) and
  `timeout` (504 until the response head) hold per stream; `retry` is not
  applied to HTTP/2 (a limit: the request is not kept to be sent again).
- `Limits.head_timeout` (None: none): a connection with no open stream for that long
  (a preface then silence, an idle keep-alive connection) is closed with
  GOAWAY(NO_ERROR), not reset by PINGs or SETTINGS; a stream whose request body
  stops for that long (while none of it waits here for the upstream) gets 408, or
  a reset once its response started.
- A decision the glue must wait for (an external authorizer) belongs to its stream:
  a client's RST_STREAM, or the connection's end, cancels it (rapid resets cannot
  pile up calls to the authorizer), and at most `h2_max_concurrent_streams` wait
  per connection.
- A protocol error or flood from the client ends its connection with GOAWAY;
  the upstream streams of its requests are reset. A client's graceful GOAWAY
  or EOF lets the requests it has sent finish, then the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import h2.events as h2e
from h2.errors import ErrorCodes

from ambit.tasks import TaskSet
from waypoint import WaypointError
from waypoint.admission import Admitted, Deciding, Head, Refused, admit, local_body, settle
from waypoint.exchange import Failure, Hooks, Limits, RequestRecord, Upstream
from waypoint.h2exchange import HEADER_OVERHEAD, Exchange
from waypoint.h2side import H2Side, new_side
from waypoint.h2upstream import Upstreams
from waypoint.headers import RawHeaders, rewrite_request
from waypoint.streams import ByteStream

log = logging.getLogger("ambit.waypoint.http2")

_IGNORED = (h2e.SettingsAcknowledged, h2e.PingReceived, h2e.PingAckReceived,
            h2e.PriorityUpdated, h2e.UnknownFrameReceived, h2e.AlternativeServiceAvailable)

Side = H2Side[Exchange]


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
        # the upstream connections, per Upstream.key (None: the hooks' default upstream)
        self.ups_by_key: dict[object, Upstreams[Exchange]] = {}
        self.done = asyncio.Event()
        self.ending = False  # the client sends no more requests (EOF or GOAWAY)
        # Limits.head_timeout: a connection with no open stream is closed after it (a preface
        # then silence, or a keep-alive connection left idle)
        self.idle_timer: asyncio.TimerHandle | None = None
        self.pending = 0  # decisions awaited (Hooks.decide returned an awaitable)

    async def run(self) -> None:
        try:
            self.down.start(self.tasks)
            if self.prefix:
                self.down.receive(self.prefix)
            self._arm_idle()
            await self.done.wait()
        except Exception:
            log.exception("HTTP/2 proxy failed; closing the connection")
            self.side_failed(self.down, "internal error", ErrorCodes.INTERNAL_ERROR, wire_gone=False)
        finally:
            await self._shutdown()

    def check_done(self) -> None:
        """The connection ends when the client is gone, or done and every request answered."""
        if not self.done.is_set() and (
            self.down.lost is not None or (self.ending and not self.down.exchanges)
        ):
            self.done.set()
        self._arm_idle()

    def _arm_idle(self) -> None:
        timeout = self.limits.head_timeout
        if timeout is None or self.idle_timer is not None or self.down.exchanges or self.done.is_set():
            return
        self.idle_timer = asyncio.get_running_loop().call_later(timeout, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if self.down.exchanges or self.done.is_set():
            return
        timeout = self.limits.head_timeout
        log.debug("HTTP/2: no request within %ss: closing", timeout)
        self.side_failed(self.down, f"no request within {timeout:g}s", ErrorCodes.NO_ERROR, wire_gone=False)

    async def _shutdown(self) -> None:
        self.done.set()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        await self.tasks.close()
        for x in list(self.down.exchanges.values()):
            x.fail(Failure.CLIENT_RESET, "connection closed")
            x.reset_upstream(ErrorCodes.CANCEL)
            x.end()
        for ups in self.ups_by_key.values():
            ups.close()
        self.down.close()

    def upstreams(self, upstream: Upstream | None) -> Upstreams[Exchange]:
        """The upstream connections of a verdict's `Upstream` (made on first use)."""
        key = upstream.key if upstream is not None else None
        ups = self.ups_by_key.get(key)
        if ups is None:
            opener = upstream.open if upstream is not None else self.hooks.open_upstream

            async def open_side() -> Side:
                return await self._open_upstream(opener)

            ups = Upstreams(tasks=self.tasks, open_side=open_side,
                            start_stream=lambda x, up: x.start_upstream(up),
                            open_failed=self._open_failed, alive=lambda x: x.alive)
            self.ups_by_key[key] = ups
        return ups

    def _owner(self, side: Side) -> Upstreams[Exchange] | None:
        for ups in self.ups_by_key.values():
            if side in ups.sides():
                return ups
        return None

    def _all_up_sides(self) -> list[Side]:
        return [s for ups in self.ups_by_key.values() for s in ups.sides()]

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
        for ups in self.ups_by_key.values():
            ups.start_waiting()
        for s in (self.down, *self._all_up_sides()):
            s.wake.set()
        self.check_done()

    def side_idle(self, side: Side) -> None:
        owner = self._owner(side) if side is not self.down else None
        if owner is not None:
            owner.close_if_idle(side)

    def side_goaway(self, side: Side, last_stream_id: int) -> None:
        if side is self.down:
            self.ending = True
            self.check_done()
            return
        for up_sid, x in sorted(side.exchanges.items()):
            if up_sid > last_stream_id:
                x.upstream_refused()
        owner = self._owner(side)
        if owner is not None:
            owner.retire(side)

    def side_eof(self, side: Side) -> None:
        if side is not self.down:
            self.side_failed(side, "upstream closed the connection", None, wire_gone=True)
            return
        # no more requests; those whose bodies will now never end are over
        self.ending = True
        for x in list(self.down.exchanges.values()):
            if not x.request_ended:
                x.fail(Failure.CLIENT_RESET, "client closed the connection mid-request")
                x.reset_upstream(ErrorCodes.CANCEL)
                x.end()
        self.check_done()

    def side_failed(self, side: Side, reason: str, code: ErrorCodes | None, *, wire_gone: bool) -> None:
        """One connection is over: its exchanges fail; the downstream's end ends the proxy."""
        if side.lost is not None:
            return
        if side is self.down:
            failure = Failure.CLIENT_RESET if wire_gone else Failure.CLIENT_PROTOCOL
            for x in list(self.down.exchanges.values()):
                x.fail(failure, reason)
                x.reset_upstream(ErrorCodes.CANCEL)
                x.end()
            side.shut(reason, code, wire_gone=wire_gone)
            self.done.set()
            return
        owner = self._owner(side)
        side.shut(reason, code, wire_gone=wire_gone)
        if owner is not None:
            owner.lost(side)
        for x in list(side.exchanges.values()):
            x.upstream_lost(reason)
        if owner is not None:
            owner.start_waiting()

    # --------------------------------------------------------------- downstream

    def _down_event(self, event: h2e.Event) -> None:
        if isinstance(event, h2e.RequestReceived):
            self._on_request(event.stream_id, event.headers or [], has_body=event.stream_ended is None)
        elif isinstance(event, (h2e.DataReceived, h2e.TrailersReceived, h2e.StreamEnded,
                                h2e.StreamReset)):
            x = self.down.exchanges.get(event.stream_id)
            if x is None:
                if isinstance(event, h2e.DataReceived):  # a stream already over: consumed here
                    self.down.ack(event.stream_id, event.flow_controlled_length or 0)
            elif isinstance(event, h2e.DataReceived):
                x.request_data(event.data or b"", event.flow_controlled_length or 0)
            elif isinstance(event, h2e.TrailersReceived):
                x.request_trailers(event.headers or [])
            elif isinstance(event, h2e.StreamEnded):
                x.request_end()
            else:
                x.client_reset(ErrorCodes(event.error_code or 0))
        elif isinstance(event, h2e.WindowUpdated):
            self.down.pump(event.stream_id or 0)
        elif isinstance(event, h2e.RemoteSettingsChanged):
            self.down.pump(0)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = ErrorCodes(event.error_code or 0)
            self.side_failed(self.down, f"client sent GOAWAY({code.name})", None, wire_gone=False)
        elif not isinstance(event, _IGNORED):
            log.warning("HTTP/2 downstream: unexpected event %r", event)

    def _on_request(self, sid: int, headers: RawHeaders, *, has_body: bool) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        record = RequestRecord(protocol="HTTP/2", start=self.hooks.clock(), stream_id=sid)
        x = Exchange(self, sid, record)
        pseudo = {n: v.decode("ascii", "surrogateescape") for n, v in headers if n.startswith(b":")}
        regular = [(n, v) for n, v in headers if not n.startswith(b":")]
        host = next((v for n, v in regular if n == b"host"), b"").decode("ascii", "surrogateescape")
        x.method = pseudo.get(b":method", "")
        scheme = pseudo.get(b":scheme", "http")
        head = Head(method=x.method, target=pseudo.get(b":path", ""),
                    authority=pseudo.get(b":authority") or host, scheme=scheme, headers=regular,
                    protocol="HTTP/2", stream_id=sid, has_body=has_body,
                    size=sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in headers))
        outcome = admit(head, self.hooks, self.limits, record)
        if isinstance(outcome, Deciding):
            if self.pending >= self.limits.h2_max_concurrent_streams:
                # defense in depth: decisions die with their streams, so h2's stream limit
                # bounds them; never more pending per connection than that
                x.abandon_decision(outcome.verdict)
                x.fail(Failure.CLIENT_RESET, "too many requests awaiting a decision")
                x.down.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                x.end()
                return
            # the body waits, unacknowledged (the client's window bounds it), for the verdict;
            # the decision is the exchange's: a reset or the connection's end cancels it (an
            # external authorizer is not asked on behalf of streams that are gone)
            x.deciding = True
            self.pending += 1
            x.decision = self.tasks.spawn(f"decide-{sid}", self._settle(x, outcome, regular, scheme))
            x.decision.add_done_callback(self._decided)
            x.decision_verdict = outcome.verdict
            return
        self._answer(x, outcome, regular, scheme)

    def _decided(self, task: asyncio.Task[None]) -> None:
        self.pending -= 1

    async def _settle(self, x: Exchange, deciding: Deciding, regular: RawHeaders, scheme: str) -> None:
        outcome = await settle(deciding, x.record)
        x.deciding = False
        x.decision = None
        if x.alive:  # else the client reset the stream meanwhile
            self._answer(x, outcome, regular, scheme)
            self.side_received(self.down)

    def _answer(self, x: Exchange, outcome: Admitted | Refused, regular: RawHeaders, scheme: str) -> None:
        """Answer the request here, or forward it, as admission decided."""
        record = x.record
        if isinstance(outcome, Refused):
            x.local(outcome.status, outcome.body, outcome.headers)
            return
        v = outcome.verdict
        x.forward([
            (b":method", x.method.encode("ascii", "surrogateescape")),
            (b":scheme", scheme.encode("ascii", "surrogateescape")),
            (b":authority", (v.authority or record.authority).encode("ascii", "surrogateescape")),
            (b":path", (v.target or outcome.target.forward).encode("ascii")),
            *rewrite_request(regular, v, drop=(b"host",) if v.authority else (), keep_te_trailers=True),
        ], v, self.upstreams(v.upstream))

    # ----------------------------------------------------------------- upstream

    async def _open_upstream(self, opener: Callable[[], Awaitable[ByteStream]]) -> Side:
        stream = await opener()
        if self.done.is_set():
            stream.abort()
            raise WaypointError("the downstream connection ended while its upstream opened")
        side: Side = new_side("upstream", stream, self, self.limits, self.hooks.clock, server=False)
        side.start(self.tasks)
        return side

    def _open_failed(self, waiting: list[Exchange], error: Exception) -> None:
        for x in waiting:
            x.fail(Failure.UPSTREAM_CONNECT, f"upstream connect failed: {error}")
            x.local(503, local_body(503))
        self.side_received(self.down)

    def _up_event(self, up: Side, event: h2e.Event) -> None:
        if isinstance(event, (h2e.ResponseReceived, h2e.InformationalResponseReceived,
                              h2e.DataReceived, h2e.TrailersReceived, h2e.StreamEnded,
                              h2e.StreamReset)):
            x = up.exchanges.get(event.stream_id)
            if x is None or x.reset:
                if isinstance(event, h2e.DataReceived):  # a stream already over: consumed here
                    up.ack(event.stream_id, event.flow_controlled_length or 0)
                elif isinstance(event, h2e.StreamReset):
                    up.drop(event.stream_id)
            elif isinstance(event, h2e.ResponseReceived):
                x.response(event.headers or [])
            elif isinstance(event, h2e.InformationalResponseReceived):
                x.informational(event.headers or [])
            elif isinstance(event, h2e.DataReceived):
                x.response_data(event.data or b"", event.flow_controlled_length or 0)
            elif isinstance(event, h2e.TrailersReceived):
                x.response_trailers(event.headers or [])
            elif isinstance(event, h2e.StreamEnded):
                x.response_end()
            else:
                x.upstream_reset(ErrorCodes(event.error_code or 0))
        elif isinstance(event, h2e.WindowUpdated):
            up.pump(event.stream_id or 0)
        elif isinstance(event, h2e.RemoteSettingsChanged):
            up.pump(0)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = ErrorCodes(event.error_code or 0)
            self.side_failed(up, f"upstream sent GOAWAY({code.name})", None, wire_gone=False)
        elif not isinstance(event, _IGNORED):
            log.warning("HTTP/2 upstream: unexpected event %r", event)
