"""One HTTP/2 request through the proxy: a downstream stream, and its upstream stream once it has one.

An `Exchange` owns what happens to the pair: the request's parts going up
(held until the upstream stream exists, unacknowledged, so the client's window
bounds them), the response's parts going down, a local answer instead, resets
either way, and the request's one record, reported when the response has been
sent or the pair is reset. It is forgotten (its stream ids freed) once both
directions are over.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from h2.errors import ErrorCodes
from h2.exceptions import H2Error

from waypoint.admission import local_body
from waypoint.exchange import Failure, Hooks, Limits, RequestRecord, Verdict
from waypoint.h2side import H2Side, Out
from waypoint.h2upstream import Upstreams
from waypoint.headers import RawHeaders, edit_response, forwardable, forwardable_trailers

log = logging.getLogger("ambit.waypoint.http2")

HEADER_OVERHEAD = 32  # RFC 9113 6.5.2: per field, on top of name and value


class Host(Protocol):
    """What an exchange needs from its connection's proxy."""

    down: H2Side[Exchange]
    hooks: Hooks
    limits: Limits

    def check_done(self) -> None: ...


class Exchange:
    """One downstream stream and its upstream stream (see the module docstring)."""

    def __init__(self, host: Host, sid: int, record: RequestRecord) -> None:
        self.host = host
        self.down = host.down
        self.sid = sid
        self.record = record
        self.method = ""
        self.forwarding = False  # allowed: the request goes upstream
        self.deciding = False  # the glue's verdict is awaited: the request's parts wait in `early`
        self.decision: asyncio.Task[None] | None = None  # that wait; cancelled when the stream ends
        self.decision_verdict: Awaitable[Verdict] | None = None
        self.verdict: Verdict | None = None
        self.ups: Upstreams[Exchange] | None = None  # the upstream connections it goes to
        self.timer: asyncio.TimerHandle | None = None  # the verdict's timeout
        self.up_headers: RawHeaders = []
        self.up: H2Side[Exchange] | None = None
        self.up_sid: int | None = None
        self.early: list[Out] = []  # request parts waiting for the upstream stream
        self.request_ended = False  # the client ended its request (or we stopped caring)
        self.request_end_queued = False
        self.response_started = False
        self.response_end_queued = False
        self.response_done = False
        self.reset = False
        self.finished = False  # recorded
        # the request body's idle deadline (Limits.head_timeout): bytes of it held here,
        # unacknowledged (while some are, the client's silence may be our back-pressure)
        self.held = 0
        self.last_data = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.down.exchanges[sid] = self
        timeout = host.limits.head_timeout
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self.last_data = loop.time()
            self.idle_timer = loop.call_at(self.last_data + timeout, self._request_idle)

    @property
    def alive(self) -> bool:
        return not self.reset and not self.finished

    # --------------------------------------------------------------- request

    def forward(self, up_headers: RawHeaders, verdict: Verdict, ups: Upstreams[Exchange]) -> None:
        """Allowed: the request goes upstream once a stream is free (Upstreams.want)."""
        self.forwarding = True
        self.up_headers = up_headers
        self.verdict = verdict
        self.ups = ups
        if verdict.timeout is not None:
            self.timer = asyncio.get_running_loop().call_later(verdict.timeout, self._timed_out)
        ups.want(self)

    def _timed_out(self) -> None:
        self.timer = None
        if self.finished or self.response_started or self.reset:
            return
        assert self.verdict is not None and self.verdict.timeout is not None
        self.fail(Failure.UPSTREAM_TIMEOUT, f"no response within {self.verdict.timeout:g}s")
        self.reset_upstream(ErrorCodes.CANCEL)
        self.local(504, local_body(504))
        self.host.check_done()

    def request_data(self, data: bytes, n: int) -> None:
        if self.idle_timer is not None:
            self.last_data = asyncio.get_running_loop().time()
        if not self.finished:  # a reported record stays as reported
            self.record.request_bytes += len(data)
        if not (self.forwarding or self.deciding) or self.request_end_queued or self.reset:
            self.down.ack(self.sid, n)  # nobody takes it: consumed here
            return
        limit = self.verdict.max_request_body if self.verdict is not None else None
        if limit is not None and self.record.request_bytes > limit:
            self.down.ack(self.sid, n)
            self.fail(Failure.BODY_TOO_LARGE, f"the request body is over {limit} bytes")
            self.reset_upstream(ErrorCodes.CANCEL)
            if self.response_started:
                self.down.reset_stream(self.sid, ErrorCodes.CANCEL)
                self.end()
            else:
                self.local(413, local_body(413, f"the request body is over {limit} bytes"))
            return
        self.held += n
        self._to_upstream(Out(data, ack=(self, self.sid, n)))

    def ack(self, sid: int, n: int) -> None:
        """Request data of ours was taken (or dropped): the client gets its credit back."""
        self.held -= n
        if self.idle_timer is not None:
            self.last_data = asyncio.get_running_loop().time()  # the client may send again
        self.down.ack(sid, n)

    def _request_idle(self) -> None:
        """No request data for Limits.head_timeout while the client owed some, and none of it
        held here: 408 (or a reset once the response started)."""
        self.idle_timer = None
        timeout = self.host.limits.head_timeout
        if self.request_ended or self.finished or self.reset or timeout is None:
            return
        loop = asyncio.get_running_loop()
        due = self.last_data + timeout
        if self.held > 0 or due > loop.time():  # still arriving, or waiting on us
            self.idle_timer = loop.call_at(max(due, loop.time() + timeout / 4), self._request_idle)
            return
        why = f"no request data within {timeout:g}s"
        self.fail(Failure.CLIENT_RESET, why)
        self.reset_upstream(ErrorCodes.CANCEL)
        if self.response_started:
            self.down.reset_stream(self.sid, ErrorCodes.CANCEL)
            self.end()
        else:
            self.local(408, local_body(408, why))
        self.host.check_done()

    def request_trailers(self, headers: RawHeaders) -> None:
        if (self.forwarding or self.deciding) and not self.request_end_queued and not self.reset:
            trailers = forwardable_trailers(headers)
            self.request_end_queued = True
            self._to_upstream(Out(trailers=trailers) if trailers else Out(end=True))

    def request_end(self) -> None:
        self.request_ended = True
        self._cancel_idle()
        if (self.forwarding or self.deciding) and not self.request_end_queued and not self.reset:
            self.request_end_queued = True
            self._to_upstream(Out(end=True))
        self._forget_if_done()

    def client_reset(self, code: ErrorCodes) -> None:
        self.fail(Failure.CLIENT_RESET, f"client reset the stream ({code.name})")
        self.down.drop(self.sid)
        self.reset_upstream(code)
        self.end()

    def _to_upstream(self, item: Out) -> None:
        if self.up is None or self.up_sid is None:
            self.early.append(item)
        else:
            self.up.queue(self.up_sid, item)

    def start_upstream(self, up: H2Side[Exchange]) -> None:
        """Open the upstream stream on `up`; what waited follows the head."""
        up_sid = up.conn.get_next_available_stream_id()
        early, self.early = self.early, []
        end_now = self.request_end_queued and len(early) == 1 and early[0].end and not early[0].data
        try:
            up.conn.send_headers(up_sid, self.up_headers, end_stream=end_now)
        except H2Error as e:
            self.early = early
            self.fail(Failure.UPSTREAM_PROTOCOL, f"cannot open an upstream stream: {e}")
            self.local(502, local_body(502))
            return
        self.up, self.up_sid = up, up_sid
        self.record.forwarded = True
        up.exchanges[up_sid] = self
        if not end_now:
            for item in early:
                up.queue(up_sid, item)
        up.wake.set()

    # -------------------------------------------------------------- response

    def response(self, headers: RawHeaders) -> None:
        limit = self.host.limits.max_response_header_bytes
        size = sum(len(n) + len(v) + HEADER_OVERHEAD for n, v in headers)
        if size > limit:
            self.fail(Failure.UPSTREAM_PROTOCOL, f"response header list of {size} bytes over {limit}")
            self.reset_upstream(ErrorCodes.CANCEL)
            self.local(502, local_body(502))
            return
        status = next((v for n, v in headers if n == b":status"), b"0")
        if self._relay_head(status, headers, final=True):
            self.response_started = True
            self.record.status = int(status)

    def informational(self, headers: RawHeaders) -> None:
        status = next((v for n, v in headers if n == b":status"), b"")
        if not self.response_started and status != b"101":
            self._relay_head(status, headers)

    def _relay_head(self, status: bytes, headers: RawHeaders, *, final: bool = False) -> bool:
        regular = forwardable([(n, v) for n, v in headers if not n.startswith(b":")])
        if final:
            regular = edit_response(regular, self.verdict)
            self._cancel_timer()
        fields = [(b":status", status), *regular]
        try:
            self.down.conn.send_headers(self.sid, fields)
        except H2Error as e:
            self.fail(Failure.CLIENT_RESET, f"cannot relay the response head: {e}")
            self.reset_upstream(ErrorCodes.CANCEL)
            self.end()
            return False
        self.down.wake.set()
        return True

    def response_data(self, data: bytes, n: int) -> None:
        assert self.up is not None and self.up_sid is not None
        if self.response_end_queued:
            self.up.ack(self.up_sid, n)
            return
        self.record.response_bytes += len(data)
        self.down.queue(self.sid, Out(data, ack=(self.up, self.up_sid, n)))

    def response_trailers(self, headers: RawHeaders) -> None:
        if not self.response_end_queued:
            trailers = forwardable_trailers(headers)
            self.response_end_queued = True
            self.down.queue(self.sid, Out(trailers=trailers or None, end=not trailers,
                                          done=self._when_sent))

    def response_end(self) -> None:
        if not self.response_end_queued:
            self.response_end_queued = True
            self.down.queue(self.sid, Out(end=True, done=self._when_sent))

    def upstream_reset(self, code: ErrorCodes) -> None:
        self._unlink_upstream()
        if self.response_end_queued and code == ErrorCodes.NO_ERROR:
            self._request_unwanted()  # a complete response, and no more of the request wanted
            return
        self.fail(Failure.UPSTREAM_RESET, f"upstream reset the stream ({code.name})")
        self.down.reset_stream(self.sid, code)
        self.end()

    def upstream_lost(self, reason: str) -> None:
        """The upstream connection is gone (or never took this stream: `refused`)."""
        self._unlink_upstream()
        if self.response_end_queued:
            self._request_unwanted()
            return
        self.fail(Failure.UPSTREAM_RESET, reason)
        if not self.response_started:
            self.local(502, local_body(502))
        else:
            self.down.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
            self.end()

    def upstream_refused(self) -> None:
        """The upstream went away (GOAWAY) before taking the stream: the client may retry."""
        if self.up is not None and self.up_sid is not None:
            self.up.reset_stream(self.up_sid, ErrorCodes.CANCEL)
        self._unlink_upstream()
        self.fail(Failure.UPSTREAM_RESET, "upstream went away before taking the stream")
        self.down.reset_stream(self.sid, ErrorCodes.REFUSED_STREAM)
        self.end()

    def _request_unwanted(self) -> None:
        self._drop_early()
        if not self.request_ended:
            self.down.queue(self.sid, Out(reset=ErrorCodes.NO_ERROR))  # "stop sending"
        self.request_end_queued = self.request_ended = True
        self._forget_if_done()

    def _unlink_upstream(self) -> None:
        up, up_sid = self.up, self.up_sid
        self.up_sid = None
        if up is not None and up_sid is not None:
            up.exchanges.pop(up_sid, None)
            up.drop(up_sid)

    def reset_upstream(self, code: ErrorCodes) -> None:
        """Reset the upstream stream (if any) and forget what waited for it."""
        self._drop_early()
        up, up_sid = self.up, self.up_sid
        if up is None or up_sid is None:
            return
        self._unlink_upstream()
        up.reset_stream(up_sid, code)
        if self.ups is not None:
            self.ups.close_if_idle(up)

    def _drop_early(self) -> None:
        early, self.early = self.early, []
        for item in early:
            if item.ack is not None:
                source, sid, n = item.ack
                source.ack(sid, n)

    # ------------------------------------------------------ answers and ends

    def local(self, status: int, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> None:
        """Answer the stream here (it has no upstream stream)."""
        headers = [(n.lower().encode("ascii"), v.encode("utf-8", "surrogateescape"))
                   for n, v in extra]
        if not any(n == b"content-type" for n, _ in headers):
            headers.insert(0, (b"content-type", b"text/plain"))
        if self.method == "HEAD" or status in (204, 304):
            body = b""
        headers = [(b":status", str(status).encode()), *headers,
                   (b"content-length", str(len(body)).encode())]
        stop = None if self.request_ended else ErrorCodes.NO_ERROR
        self.forwarding = False  # whatever more of the request comes is read and dropped
        self._drop_early()
        self.up = None
        try:
            self.down.conn.send_headers(self.sid, headers, end_stream=not body)
        except H2Error as e:
            self.fail(Failure.CLIENT_RESET, f"cannot answer: {e}")
            self.end()
            return
        self.response_started = self.response_end_queued = True
        self.record.status = status
        self.record.response_bytes += len(body)
        if body:
            self.down.queue(self.sid, Out(body, end=True, reset=stop, done=self._when_sent))
            return
        if stop is not None:
            self.down.reset_stream(self.sid, stop)
        self._response_done()

    @property
    def _when_sent(self) -> Callable[[str | None], None]:
        def done(why: str | None) -> None:
            if why is None:
                self._response_done()
            else:
                self.fail(Failure.CLIENT_RESET, why)
                self.reset_upstream(ErrorCodes.CANCEL)
                self.end()
        return done

    def _response_done(self) -> None:
        self.response_done = True
        self._finish()
        self._forget_if_done()

    def abandon_decision(self, verdict: Awaitable[Verdict] | None = None) -> None:
        """Cancel the glue's pending decision (its stream is gone); a coroutine that never
        started is closed (so it is not reported as never awaited)."""
        task, self.decision = self.decision, None
        if task is not None and not task.done():
            task.cancel()
        pending = verdict or self.decision_verdict
        self.decision_verdict = None
        if inspect.iscoroutine(pending) and inspect.getcoroutinestate(pending) == inspect.CORO_CREATED:
            pending.close()

    def end(self) -> None:
        """The exchange is over (reset, or failed): report it and forget it."""
        self.reset = True
        self._finish()
        self._drop_early()
        self._forget()

    def fail(self, failure: Failure, detail: str) -> None:
        """Note why the exchange failed, unless it is already reported."""
        if not self.finished:
            self.record.fail(failure, detail)

    def _forget_if_done(self) -> None:
        if self.response_done and (self.request_ended or not self.forwarding):
            self._forget()

    def _forget(self) -> None:
        self._cancel_idle()
        if self.down.exchanges.get(self.sid) is self:
            del self.down.exchanges[self.sid]
        up = self.up
        if up is not None and self.up_sid is not None and up.exchanges.get(self.up_sid) is self:
            del up.exchanges[self.up_sid]
            if self.ups is not None:
                self.ups.close_if_idle(up)
        self.host.check_done()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _finish(self) -> None:
        if self.decision is not None:  # answered or reset while the glue was deciding
            self.abandon_decision()
        if self.finished:
            return
        self._cancel_timer()
        self.finished = True
        self.record.end = self.host.hooks.clock()
        try:
            self.host.hooks.on_request(self.record)
        except Exception:
            log.exception("on_request hook failed")
