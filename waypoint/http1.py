"""The HTTP/1.x proxy of one downstream connection: h11 server side, h11 client side upstream.

Requests are taken one at a time (pipelined ones wait in h11's buffer, so a
client that pipelines is back-pressured like any other), judged
(waypoint.admission), then answered here or forwarded on one upstream byte
stream, opened on the first allowed request and reused for the next ones while
both ends keep it alive (reopened when the upstream closed it).

Choices, where HTTP leaves them:
- The forwarded target is the normalized path plus the query as sent: the
  upstream sees the path the policy judged. Absolute-form targets go upstream
  in origin-form with Host set to their authority (RFC 9112 3.2.2); a request
  without Host (HTTP/1.0) gets the authority it was routed by.
- `Expect: 100-continue` is answered here, once the request is allowed and its
  upstream is open; the expectation is not forwarded (an upstream 100 is
  dropped). A refused request that still waits for its 100 gets its answer
  with `Connection: close`: its body never comes.
- A refusal (denied, 501) answers at once, then reads and discards the rest of
  the request body, up to `Limits.drain_limit`, to keep the connection; a
  larger declared body gets `Connection: close` instead. A 400, 431 or 500
  closes the connection.
- Both bodies stream at the same time, with back-pressure. A response that
  completes before its request body leaves the upstream connection (it cannot
  be reused) and drains the rest downstream.
- A reused upstream connection found closed before it answered (the server
  closed it while idle) is replaced once for an idempotent request without a
  body; anything else gets 502 (or, once the response has started, the client
  connection is aborted).
- While a response is awaited the client is still read (what it pipelines is
  kept, up to `Limits.max_header_bytes`): a client that resets or closes
  before its response has given up on it, and the upstream request is
  aborted (as Envoy and nginx do; a client that half-closes after its request
  gets no answer).
- Trailers are relayed when both hops are chunked; 1xx responses (other than
  100) are relayed to HTTP/1.1 clients.
- A verdict that names its own `Upstream` (a gateway's route) gets a connection
  of its own: the open upstream connection is kept while the next request goes
  to the same key, and closed (it is idle between requests) when it does not.
- The verdict's limits: a request body longer than `max_request_body` is cut
  off with 413 (the connection closes); no response head within `timeout` is
  a 504 (the connection closes); `retry` sends a request without a body again,
  on a new upstream connection, when the upstream cannot be opened, resets
  before answering, or answers one of its statuses (that response is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import h11

from waypoint.admission import (
    Admitted,
    Deciding,
    Head,
    Refused,
    admit,
    declared_length,
    local_body,
    reason,
    settle,
)
from waypoint.exchange import Failure, Hooks, HttpVersion, Limits, RequestRecord, Verdict
from waypoint.h1peer import ClientFailed, H1Peer, UpstreamFailed
from waypoint.headers import (
    RawHeaders,
    edit_response,
    forwardable,
    forwardable_trailers,
    header_value,
    rewrite_request,
)
from waypoint.streams import ByteStream

log = logging.getLogger("ambit.waypoint.http1")

_NO_BODY_STATUSES = (204, 304)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# refusals after which the connection is not worth keeping
_CLOSING = frozenset({Failure.BAD_REQUEST, Failure.HEADERS_TOO_LARGE, Failure.DECIDE_ERROR})


@dataclass
class _Exchange:
    """One request in flight: its record, and what the proxy needs to know about it."""

    record: RequestRecord
    method: bytes
    raw: RawHeaders
    response_started: bool = False
    down_chunked: bool = False  # the response to the client is chunked (it may carry trailers)
    verdict: Verdict | None = None  # once allowed
    retries_left: int = 0  # Verdict.retry attempts not yet used
    deadline: asyncio.Timeout | None = None  # the verdict's timeout, until the response head


class _RetryStatus(Exception):
    """The upstream answered a status the verdict retries; the response was not relayed."""


# what `_relay` returns when the request is to be sent again
_REUSED_CLOSED = "reused upstream closed"
_RETRY = "retry"


async def serve_http1(down: ByteStream, hooks: Hooks, limits: Limits | None = None,
                      *, prefix: bytes = b"") -> None:
    """Proxy one downstream HTTP/1.x connection until it ends. Never raises for bad input
    or a failed peer; `prefix` is bytes already read from `down` (by the sniffer)."""
    await Http1Proxy(down, hooks, limits or Limits(), prefix=prefix).run()


class Http1Proxy:
    """One downstream HTTP/1.x connection (see the module docstring)."""

    def __init__(self, down: ByteStream, hooks: Hooks, limits: Limits, *, prefix: bytes = b"") -> None:
        self.hooks = hooks
        self.limits = limits
        self.down = H1Peer(down, upstream=False, max_head=limits.max_header_bytes,
                           read_size=limits.read_size, head_timeout=limits.head_timeout)
        if prefix:
            self.down.conn.receive_data(prefix)
        self.dc = self.down.conn
        self.up: H1Peer | None = None
        self.up_key: object = None  # the Upstream.key of self.up (None: the default upstream)
        self.requests = 0

    async def run(self) -> None:
        try:
            await self._serve()
        except Exception:
            log.exception("HTTP/1 proxy failed; closing the connection")
            self._drop_upstream(abort=True)
            self.down.stream.abort()
        finally:
            self._drop_upstream(abort=False)
            self.down.stream.close()

    # ------------------------------------------------------------------ requests

    async def _serve(self) -> None:
        while True:
            try:
                event = await self.down.next_event()
            except ClientFailed as e:
                if e.status:  # malformed before a request could be read: answer, record, close
                    record = RequestRecord(protocol="HTTP/1.1", start=self.hooks.clock())
                    record.fail(e.failure, e.detail)
                    await self._answer_error(_Exchange(record, b"GET", []), e.status, e.detail)
                    self._report(record)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or PAUSED after a switch we never grant)
            self.requests += 1
            if not await self._exchange(event) or not self.down.done:
                return
            self.dc.start_next_cycle()

    async def _exchange(self, event: h11.Request) -> bool:
        """Handle one request; True when the connection may take the next one."""
        version: HttpVersion = "HTTP/1.0" if event.http_version == b"1.0" else "HTTP/1.1"
        raw: RawHeaders = list(event.headers.raw_items())
        record = RequestRecord(protocol=version, start=self.hooks.clock())
        x = _Exchange(record, event.method, raw)
        head = Head(
            method=event.method.decode("ascii"),
            target=event.target.decode("ascii", "surrogateescape"),
            authority=(header_value(raw, b"host") or b"").decode("ascii", "surrogateescape"),
            scheme="http",
            headers=raw,
            protocol=version,
            size=len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in raw),
            has_body=header_value(raw, b"transfer-encoding") is not None or (declared_length(raw) or 0) > 0,
        )
        try:
            decided = admit(head, self.hooks, self.limits, record)
            outcome = await settle(decided, record) if isinstance(decided, Deciding) else decided
            if isinstance(outcome, Refused):
                if record.failure in _CLOSING:
                    await self._answer_error(x, outcome.status, "", body=outcome.body)
                    return False
                return await self._refuse(x, outcome)
            return await self._forward(x, outcome)
        finally:
            self._report(record)

    # ------------------------------------------------------------- local answers

    async def _refuse(self, x: _Exchange, refused: Refused) -> bool:
        """Answer a well-formed request here and keep the connection when its body can be
        drained; True when the connection goes on."""
        declared = self._declared_length(x)
        close = self.dc.they_are_waiting_for_100_continue or (
            declared is not None and declared > self.limits.drain_limit
        )
        try:
            await self._local_response(x, refused.status, refused.body, refused.headers, close=close)
        except ClientFailed as e:
            x.record.fail(e.failure, e.detail)
            return False
        if close or self.dc.our_state is not h11.DONE:
            return False
        return await self._drain_request(x)

    async def _drain_request(self, x: _Exchange) -> bool:
        """Read and discard the rest of the request body, up to the drain limit."""
        drained = 0
        while self.dc.their_state is h11.SEND_BODY:
            try:
                event = await self.down.next_event()
            except ClientFailed:
                return False
            if isinstance(event, h11.Data):
                drained += len(event.data)
                x.record.request_bytes += len(event.data)
                if drained > self.limits.drain_limit:
                    return False
            elif not isinstance(event, h11.EndOfMessage):
                return False
        return True

    async def _answer_error(self, x: _Exchange, status: int, detail: str,
                            *, body: bytes | None = None) -> None:
        """Answer a request the waypoint will not serve, then close, if h11 still can."""
        if self.dc.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(ClientFailed):
            await self._local_response(x, status, local_body(status, detail) if body is None else body,
                                       (), close=True)

    async def _local_response(self, x: _Exchange, status: int, body: bytes,
                              extra: tuple[tuple[str, str], ...], *, close: bool) -> None:
        headers = [(n.encode("ascii"), v.encode("utf-8", "surrogateescape")) for n, v in extra]
        if not any(n.lower() == b"content-type" for n, _ in headers):
            headers.insert(0, (b"content-type", b"text/plain"))
        headers.append((b"content-length", str(len(body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        if x.method == b"HEAD" or status in _NO_BODY_STATUSES:
            body = b""
        try:
            out = self.dc.send(h11.Response(status_code=status, headers=headers,
                                            reason=reason(status).encode()))
            out += self.dc.send(h11.Data(data=body)) if body else b""
            out += self.dc.send(h11.EndOfMessage())
        except h11.LocalProtocolError as e:
            log.warning("HTTP/1: cannot answer %d: %s", status, e)
            return
        x.record.status = status
        x.record.response_bytes += len(body)
        await self.down.write(out)

    # ----------------------------------------------------------------- forwarding

    async def _forward(self, x: _Exchange, admitted: Admitted) -> bool:
        record, target, verdict = x.record, admitted.target, admitted.verdict
        x.verdict = verdict
        headers = rewrite_request(x.raw, verdict, drop=(b"expect",))
        if verdict.authority is not None or target.authority is not None or header_value(headers, b"host") is None:
            headers = [(n, v) for n, v in headers if n.lower() != b"host"]
            host = verdict.authority or record.authority
            headers.insert(0, (b"Host", host.encode("ascii", "surrogateescape")))
        chunked = header_value(x.raw, b"transfer-encoding") is not None
        if chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        forward = verdict.target or target.forward
        request = h11.Request(method=x.method, target=forward.encode("ascii"), headers=headers)
        bodiless = self._declared_length(x) == 0
        retry = x.method in _IDEMPOTENT and bodiless
        x.retries_left = verdict.retry.attempts if verdict.retry is not None and bodiless else 0
        while True:
            self._switch_upstream(verdict)
            reused = self.up is not None
            up = await self._upstream(record, verdict)
            if up is None:
                if await self._retrying(x):
                    record.failure, record.detail = None, ""
                    continue
                await self._answer_error(x, 503, "")
                return False
            try:
                out = up.conn.send(request)
            except h11.LocalProtocolError as e:
                self._drop_upstream(abort=True)
                record.fail(Failure.DECIDE_ERROR, f"cannot forward the request as rewritten: {e}")
                await self._answer_error(x, 500, "")
                return False
            up.received = 0
            record.forwarded = True
            if self.dc.they_are_waiting_for_100_continue and self.dc.their_http_version == b"1.1":
                try:
                    await self.down.write(self.dc.send(h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue")))
                except ClientFailed as e:
                    record.fail(e.failure, e.detail)
                    self._drop_upstream(abort=True)
                    return False
            try:
                outcome = await self._relay(x, up, out, chunked, retry_ok=retry and reused)
            except TimeoutError:
                self._drop_upstream(abort=True)
                record.fail(Failure.UPSTREAM_TIMEOUT, f"no response within {verdict.timeout:g}s")
                await self._answer_error(x, 504, "")
                return False
            if outcome == _REUSED_CLOSED:
                log.debug("HTTP/1: reused upstream connection was closed; %s %s sent again",
                          record.method, record.path)
            elif outcome == _RETRY:
                await self._retrying(x)
                record.failure, record.detail = None, ""
            else:
                return bool(outcome)
            retry = False

    async def _retrying(self, x: _Exchange) -> bool:
        """Use one of the verdict's retries (after its backoff); False when none is left."""
        if x.retries_left <= 0 or x.response_started or x.verdict is None or x.verdict.retry is None:
            return False
        x.retries_left -= 1
        if x.verdict.retry.backoff:
            await asyncio.sleep(x.verdict.retry.backoff)
        log.debug("HTTP/1: %s %s sent again (%d retries left)", x.record.method, x.record.path,
                  x.retries_left)
        return True

    async def _relay(self, x: _Exchange, up: H1Peer, head: bytes, chunked: bool,
                     *, retry_ok: bool) -> bool | str:
        """Send the request head, then stream the request body up and the response down at
        the same time. True when the connection may go on; _REUSED_CLOSED or _RETRY: send it
        again (the reused upstream closed before answering; a retry of the verdict's).
        Raises TimeoutError when the verdict's timeout passed before the response head."""
        n = self.requests
        body = asyncio.create_task(self._pump_request_body(x, up, head, chunked),
                                   name=f"waypoint-http1/request-body-{n}")
        response = asyncio.create_task(self._relay_response(x, up),
                                       name=f"waypoint-http1/response-{n}")
        timeout = x.verdict.timeout if x.verdict is not None else None
        try:
            # the verdict's timeout runs until the response head (then the response streams)
            async with asyncio.timeout(timeout) as deadline:
                x.deadline = deadline
                return await self._relay_both(x, up, body, response, retry_ok)
        finally:
            x.deadline = None
            for task in (body, response):
                if not task.done():
                    task.cancel()
            await asyncio.gather(body, response, return_exceptions=True)

    async def _relay_both(self, x: _Exchange, up: H1Peer, body: asyncio.Task[None],
                          response: asyncio.Task[None], retry_ok: bool) -> bool | str:
        record = x.record
        watch: asyncio.Task[None] | None = None
        try:
            await asyncio.wait({body, response}, return_when=asyncio.FIRST_COMPLETED)
            if body.done():
                exc = body.exception()
                if isinstance(exc, ClientFailed):
                    self._drop_upstream(abort=True)
                    failure = exc.failure
                    if exc.status and failure is not Failure.BODY_TOO_LARGE:
                        failure = Failure.CLIENT_PROTOCOL  # malformed after its head was taken
                    record.fail(failure, exc.detail)
                    if exc.status and not x.response_started:
                        await self._answer_error(x, exc.status, exc.detail)
                    return False
                if exc is not None and not isinstance(exc, UpstreamFailed):
                    raise exc
                # the request is in (or the upstream stopped taking it): its answer may still
                # come; meanwhile a client that goes away cancels it
                watch = asyncio.create_task(self.down.watch(self.limits.max_header_bytes),
                                            name=f"waypoint-http1/client-watch-{self.requests}")
                await asyncio.wait({response, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not response.done() and isinstance(watch.exception(), ClientFailed):
                    self._drop_upstream(abort=True)
                    gone = watch.exception()
                    assert isinstance(gone, ClientFailed)
                    record.fail(gone.failure, gone.detail)
                    return False
                await asyncio.wait({response})
            exc = response.exception()
            if exc is None:
                return await self._after_response(x, up, body)
            self._drop_upstream(abort=True)
            if isinstance(exc, _RetryStatus):
                return _RETRY
            if isinstance(exc, UpstreamFailed):
                if (retry_ok and exc.failure is Failure.UPSTREAM_RESET and up.received == 0
                        and not x.response_started):
                    return _REUSED_CLOSED
                if (x.retries_left > 0 and exc.failure is Failure.UPSTREAM_RESET
                        and not x.response_started):
                    return _RETRY
                record.fail(exc.failure, exc.detail)
                if x.response_started:
                    self.down.stream.abort()
                    return False
                await self._answer_error(x, 502, "")
                return False
            if isinstance(exc, ClientFailed):
                record.fail(exc.failure, exc.detail)
                return False
            raise exc
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    async def _after_response(self, x: _Exchange, up: H1Peer, body: asyncio.Task[None]) -> bool:
        """The response is complete; settle both connections."""
        if not body.done():
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientFailed, UpstreamFailed):
                await body
        if up.done and up is self.up:
            up.conn.start_next_cycle()
        else:
            # abort when our request was cut short: the upstream must not take it as complete
            self._drop_upstream(abort=up.conn.our_state not in (h11.DONE, h11.MUST_CLOSE))
        if self.dc.their_state is h11.SEND_BODY:
            return await self._drain_request(x)
        return True

    async def _pump_request_body(self, x: _Exchange, up: H1Peer, head: bytes, chunked: bool) -> None:
        await up.write(head)
        if self.dc.their_state is not h11.SEND_BODY:  # sent again: the (empty) body was read
            await up.write(up.conn.send(h11.EndOfMessage()))
            return
        limit = x.verdict.max_request_body if x.verdict is not None else None
        while True:
            event = await self.down.next_event()
            if isinstance(event, h11.Data):
                x.record.request_bytes += len(event.data)
                if limit is not None and x.record.request_bytes > limit:
                    raise ClientFailed(Failure.BODY_TOO_LARGE,
                                       f"the request body is over {limit} bytes", 413)
                await up.write(up.conn.send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                trailers = forwardable_trailers(list(event.headers.raw_items())) if chunked else []
                await up.write(up.conn.send(h11.EndOfMessage(headers=trailers)))
                return
            else:
                raise ClientFailed(Failure.CLIENT_RESET, "client closed mid-request")

    async def _relay_response(self, x: _Exchange, up: H1Peer) -> None:
        record = x.record
        while True:
            event = await up.next_event()
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    raise UpstreamFailed(Failure.UPSTREAM_PROTOCOL, "upstream switched protocols unasked")
                if event.status_code == 100 or self.dc.their_http_version != b"1.1":
                    continue  # 100: answered here already; no 1xx to HTTP/1.0 (RFC 9110 15.2)
                await self.down.write(self._down_send(h11.InformationalResponse(
                    status_code=event.status_code, reason=event.reason,
                    headers=forwardable(list(event.headers.raw_items())))))
            elif isinstance(event, h11.Response):
                raw = list(event.headers.raw_items())
                size = len(event.reason) + 15 + sum(len(n) + len(v) + 4 for n, v in raw)
                if size > self.limits.max_response_header_bytes:
                    raise UpstreamFailed(Failure.UPSTREAM_PROTOCOL, f"response head of {size} bytes "
                                         f"over {self.limits.max_response_header_bytes}")
                v = x.verdict
                if (v is not None and v.retry is not None and x.retries_left > 0
                        and event.status_code in v.retry.statuses):
                    raise _RetryStatus()
                if x.deadline is not None:
                    x.deadline.reschedule(None)
                # a length beside Transfer-Encoding is void (RFC 9112 6.3): never relay it
                drop = (b"content-length",) if header_value(raw, b"transfer-encoding") else ()
                headers = edit_response(forwardable(raw, drop=drop), v)
                x.down_chunked = (
                    x.method != b"HEAD"
                    and event.status_code not in _NO_BODY_STATUSES
                    and header_value(headers, b"content-length") is None
                    and self.dc.their_http_version == b"1.1"
                )
                out = self._down_send(h11.Response(status_code=event.status_code, headers=headers,
                                                   reason=event.reason))
                record.status = event.status_code
                x.response_started = True
                await self.down.write(out)
            elif isinstance(event, h11.Data):
                record.response_bytes += len(event.data)
                await self.down.write(self._down_send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                trailers = forwardable_trailers(list(event.headers.raw_items())) if x.down_chunked else []
                await self.down.write(self._down_send(h11.EndOfMessage(headers=trailers)))
                return
            else:
                raise UpstreamFailed(Failure.UPSTREAM_RESET,
                                     "upstream closed the connection before the response ended")

    def _down_send(self, event: h11.Event) -> bytes:
        try:
            return self.dc.send(event) or b""
        except h11.LocalProtocolError as e:
            # what the upstream sent cannot be relayed as is (a body longer than its length...)
            raise UpstreamFailed(Failure.UPSTREAM_PROTOCOL, f"cannot relay the response: {e}") from e

    # -------------------------------------------------------------------- upstream

    def _switch_upstream(self, verdict: Verdict) -> None:
        """Close the open upstream connection (idle between requests) when this request goes
        elsewhere."""
        key = verdict.upstream.key if verdict.upstream is not None else None
        if self.up is not None and self.up_key != key:
            self._drop_upstream(abort=False)

    async def _upstream(self, record: RequestRecord, verdict: Verdict) -> H1Peer | None:
        if self.up is not None:
            return self.up
        opener = verdict.upstream.open if verdict.upstream is not None else self.hooks.open_upstream
        try:
            stream = await opener()
        except Exception as e:
            record.fail(Failure.UPSTREAM_CONNECT, f"upstream connect failed: {e}")
            return None
        self.up = H1Peer(stream, upstream=True, max_head=self.limits.max_response_header_bytes,
                         read_size=self.limits.read_size)
        self.up_key = verdict.upstream.key if verdict.upstream is not None else None
        return self.up

    def _drop_upstream(self, *, abort: bool) -> None:
        up, self.up = self.up, None
        if up is None:
            return
        if abort:
            up.stream.abort()
        else:
            up.stream.close()

    # --------------------------------------------------------------------- helpers

    def _declared_length(self, x: _Exchange) -> int | None:
        """The declared length of the request body still to come (None: chunked)."""
        if self.dc.their_state is not h11.SEND_BODY:
            return 0
        if header_value(x.raw, b"content-length") is None:
            return None if header_value(x.raw, b"transfer-encoding") is not None else 0
        return declared_length(x.raw)

    def _report(self, record: RequestRecord) -> None:
        record.end = self.hooks.clock()
        try:
            self.hooks.on_request(record)
        except Exception:
            log.exception("on_request hook failed")
