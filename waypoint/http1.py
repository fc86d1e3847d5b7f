"""The HTTP/1.x proxy of one downstream connection: h11 server side, h11 client side upstream.

Requests are taken one at a time (pipelined ones wait in h11's buffer, so a
client that pipelines is back-pressured like any other), decided by the glue,
then answered locally or forwarded on one upstream byte stream, opened on the
first allowed request and reused for the next ones while both ends keep it
alive (reopened when the upstream closed it).

Choices, where HTTP leaves them:
- The forwarded target is the normalized path plus the query as sent: the
  upstream sees the path the policy judged. Absolute-form targets go upstream
  in origin-form with Host set to their authority (RFC 9112 3.2.2).
- `Expect: 100-continue` is answered here, once the request is allowed and its
  upstream is open; the expectation is not forwarded (an upstream 100 is
  dropped). A refused request that still waits for its 100 gets its answer
  with `Connection: close`: its body never comes.
- A refusal (denied, 501) answers at once, then reads and discards the rest of
  the request body, up to `Limits.drain_limit`, to keep the connection; a
  larger declared body gets `Connection: close` instead.
- CONNECT and Upgrade (WebSocket...) are refused with 501; an `Upgrade: h2c`
  offer is ignored, as RFC 9110 7.8 allows, and the request served over HTTP/1.1.
- Content-Length together with Transfer-Encoding is refused (400, close): the
  classic request-smuggling shape.
- Both bodies stream concurrently with back-pressure (drain after every
  write). A response that completes before its request body ends leaves the
  upstream connection (it cannot be reused) and drains the rest downstream.
- Any 400 (malformed HTTP, refused path) and 431 close the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import h11

from waypoint.exchange import (
    Failure,
    Hooks,
    HttpVersion,
    Limits,
    RawHeaders,
    Request,
    RequestRecord,
    Verdict,
    forwardable,
    forwardable_trailers,
    header_value,
    local_body,
    reason,
    rewrite_request,
    text_headers,
)
from waypoint.paths import PathError, Target, check_authority, parse_target
from waypoint.streams import ByteStream, StreamReset

log = logging.getLogger("ambit.waypoint.http1")

_NO_BODY_STATUSES = (204, 304)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class _ClientFailed(Exception):
    """The downstream side failed: reset/closed, or broke HTTP (then `status` is the hint)."""

    def __init__(self, failure: Failure, detail: str, status: int = 0) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail
        self.status = status


class _UpstreamFailed(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


@dataclass
class _Upstream:
    conn: h11.Connection
    stream: ByteStream
    received: int = 0  # bytes read since the current request was sent
    eof: bool = False


@dataclass
class _Exchange:
    """One request in flight: its record, and what the proxy needs to know about it."""

    record: RequestRecord
    method: bytes = b"GET"
    raw: RawHeaders | None = None  # the request's fields as received
    response_started: bool = False
    down_chunked: bool = False  # the response to the client is chunked (it may carry trailers)


async def serve_http1(down: ByteStream, hooks: Hooks, limits: Limits | None = None,
                      *, prefix: bytes = b"") -> None:
    """Proxy one downstream HTTP/1.x connection until it ends. Never raises for bad input
    or a failed peer; `prefix` is bytes already read from `down` (by the sniffer)."""
    await Http1Proxy(down, hooks, limits or Limits(), prefix=prefix).run()


class Http1Proxy:
    """One downstream HTTP/1.x connection (see the module docstring)."""

    def __init__(self, down: ByteStream, hooks: Hooks, limits: Limits, *, prefix: bytes = b"") -> None:
        self.down = down
        self.hooks = hooks
        self.limits = limits
        self.dc = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        if prefix:
            self.dc.receive_data(prefix)
        self.up: _Upstream | None = None
        self.requests = 0
        self.down_eof = False

    async def run(self) -> None:
        try:
            await self._serve()
        except Exception:
            log.exception("HTTP/1 proxy failed; closing the connection")
            self._drop_upstream(abort=True)
            self.down.abort()
        finally:
            self._drop_upstream(abort=False)
            self.down.close()

    # ------------------------------------------------------------------ requests

    async def _serve(self) -> None:
        while True:
            try:
                event = await self._down_event()
            except _ClientFailed as e:
                if e.status:
                    record = RequestRecord(protocol="HTTP/1.1", start=self.hooks.clock())
                    record.fail(_failure_of(e.status), e.detail)
                    await self._answer_error(record, e.status, e.detail)
                    record.end = self.hooks.clock()
                    self._report(record)
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                log.warning("HTTP/1: unexpected %r between requests; closing", event)
                return
            self.requests += 1
            if not await self._exchange(event, self.hooks.clock()):
                return
            if self.dc.our_state is not h11.DONE or self.dc.their_state is not h11.DONE:
                return
            self.dc.start_next_cycle()

    async def _exchange(self, event: h11.Request, start: float) -> bool:
        """Handle one request; True when the connection may take the next one."""
        version: HttpVersion = "HTTP/1.0" if event.http_version == b"1.0" else "HTTP/1.1"
        raw: RawHeaders = list(event.headers.raw_items())
        method = event.method.decode("ascii")
        raw_target = event.target.decode("ascii", "surrogateescape")
        record = RequestRecord(protocol=version, start=start, method=method)
        x = _Exchange(record, method=event.method, raw=raw)
        try:
            return await self._handle(x, event, raw, raw_target)
        finally:
            record.end = self.hooks.clock()
            self._report(record)

    async def _handle(self, x: _Exchange, event: h11.Request, raw: RawHeaders,
                      raw_target: str) -> bool:
        record = x.record
        head = len(event.method) + len(event.target) + 12 + sum(len(n) + len(v) + 4 for n, v in raw)
        if head > self.limits.max_header_bytes:
            record.fail(Failure.HEADERS_TOO_LARGE,
                        f"request head of {head} bytes over {self.limits.max_header_bytes}")
            await self._answer_error(record, 431, record.detail, method=x.method)
            return False
        host = header_value(raw, b"host")
        record.authority = (host or b"").decode("ascii", "surrogateescape")
        if header_value(raw, b"transfer-encoding") is not None and (
            header_value(raw, b"content-length") is not None
        ):
            record.fail(Failure.BAD_REQUEST, "both Content-Length and Transfer-Encoding")
            await self._answer_error(record, 400, record.detail, method=x.method)
            return False
        try:
            target = parse_target(raw_target, record.method)
            check_authority(record.authority)
        except PathError as e:
            if record.method == "CONNECT":
                record.fail(Failure.NOT_IMPLEMENTED, "CONNECT is not proxied by the waypoint")
                return await self._refuse(x, 501, local_body(501), ())
            record.fail(Failure.BAD_REQUEST, str(e))
            await self._answer_error(record, 400, str(e), method=x.method)
            return False
        record.path = target.path
        upgrade = header_value(raw, b"upgrade")
        if upgrade is not None and {
            t.strip().lower() for t in upgrade.split(b",") if t.strip()
        } - {b"h2c"}:
            record.fail(Failure.NOT_IMPLEMENTED,
                        f"Upgrade to {upgrade.decode('ascii', 'replace')!r} is not proxied")
            return await self._refuse(x, 501, local_body(501), ())
        authority = target.authority or record.authority or self.hooks.authority
        if not authority:
            record.fail(Failure.BAD_REQUEST, "no Host header and no authority to route by")
            await self._answer_error(record, 400, record.detail, method=x.method)
            return False
        record.authority = authority
        request = Request(
            method=record.method,
            scheme=target.scheme or "http",
            authority=authority,
            target=raw_target,
            path=target.path,
            query=target.query,
            headers=text_headers(raw),
            protocol=record.protocol,
        )
        record.request = request
        try:
            verdict = self.hooks.decide(request)
            if not isinstance(verdict, Verdict):
                raise TypeError(f"decide returned {type(verdict).__name__}, not a Verdict")
            verdict.check()
        except Exception as e:
            log.exception("decide failed for %s %s", record.method, target.path)
            record.fail(Failure.DECIDE_ERROR, f"decide failed: {e}")
            await self._answer_error(record, 500, "", method=x.method)
            return False
        record.verdict = verdict
        if not verdict.allowed:
            return await self._refuse(x, verdict.status, verdict.body, verdict.response_headers)
        return await self._forward(x, raw, target, verdict)

    # ------------------------------------------------------------- local answers

    async def _refuse(self, x: _Exchange, status: int, body: bytes,
                      headers: tuple[tuple[str, str], ...]) -> bool:
        """Answer a well-formed request locally and keep the connection when its body can be
        drained; True when the connection goes on."""
        waiting = self.dc.they_are_waiting_for_100_continue
        declared = self._declared_length(x)
        close = waiting or (declared is not None and declared > self.limits.drain_limit)
        try:
            await self._local_response(x, status, body, headers, close=close)
        except _ClientFailed as e:
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
                event = await self._down_event()
            except _ClientFailed:
                return False
            if isinstance(event, h11.Data):
                drained += len(event.data)
                x.record.request_bytes += len(event.data)
                if drained > self.limits.drain_limit:
                    return False
            elif not isinstance(event, h11.EndOfMessage):
                return False
        return True

    async def _answer_error(self, record: RequestRecord, status: int, detail: str,
                            *, method: bytes = b"GET") -> None:
        """Answer a request the waypoint will not serve (and then close), if h11 still can."""
        if self.dc.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        x = _Exchange(record, method=method)
        with contextlib.suppress(_ClientFailed):
            await self._local_response(x, status, local_body(status, detail), (), close=True)

    async def _local_response(self, x: _Exchange, status: int, body: bytes,
                              extra: tuple[tuple[str, str], ...], *, close: bool) -> None:
        headers: list[tuple[bytes, bytes]] = [
            (n.encode("ascii"), v.encode("utf-8", "surrogateescape")) for n, v in extra
        ]
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
            assert out is not None
            if body:
                out += self.dc.send(h11.Data(data=body)) or b""
            out += self.dc.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as e:
            log.warning("HTTP/1: cannot answer %d: %s", status, e)
            return
        x.record.status = status
        x.record.response_bytes += len(body)
        await self._down_write(out)

    # ----------------------------------------------------------------- forwarding

    async def _forward(self, x: _Exchange, raw: RawHeaders, target: Target, verdict: Verdict) -> bool:
        record = x.record
        headers = rewrite_request(raw, verdict, drop=(b"expect",))
        if target.authority is not None or header_value(headers, b"host") is None:
            # absolute-form names the host (RFC 9112 3.2.2); HTTP/1.0 may name none, and
            # HTTP/1.1 upstream needs one
            headers = [(n, v) for n, v in headers if n.lower() != b"host"]
            headers.insert(0, (b"Host", record.authority.encode("ascii", "surrogateescape")))
        chunked = header_value(raw, b"transfer-encoding") is not None
        if chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        request = h11.Request(method=x.method, target=target.forward.encode("ascii"), headers=headers)
        # a reused upstream connection may have been closed by the server while idle: a request
        # that can be sent again (idempotent, no body) gets one more try on a new one
        retry = x.method in _IDEMPOTENT and self._declared_length(x) == 0
        while True:
            reused = self.up is not None
            up = await self._upstream(record)
            if up is None:
                await self._answer_error(record, 503, "", method=x.method)
                return False
            try:
                out = up.conn.send(request)
            except h11.LocalProtocolError as e:
                self._drop_upstream(abort=True)
                record.fail(Failure.DECIDE_ERROR, f"cannot forward the request as rewritten: {e}")
                await self._answer_error(record, 500, "", method=x.method)
                return False
            up.received = 0
            record.forwarded = True
            try:
                await self._up_write(up, out or b"")
            except _UpstreamFailed as e:
                self._drop_upstream(abort=True)
                if retry and reused:
                    retry = False
                    continue
                record.fail(e.failure, e.detail)
                await self._answer_error(record, 502, "", method=x.method)
                return False
            if self.dc.they_are_waiting_for_100_continue and self.dc.their_http_version == b"1.1":
                try:
                    await self._down_write(self.dc.send(h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue")) or b"")
                except _ClientFailed as e:
                    record.fail(e.failure, e.detail)
                    self._drop_upstream(abort=True)
                    return False
            outcome = await self._relay(x, up, chunked, retry_ok=retry and reused)
            if outcome is not None:
                return outcome
            log.debug("HTTP/1: reused upstream connection was closed; %s %s sent again",
                      record.method, record.path)
            retry = False

    async def _relay(self, x: _Exchange, up: _Upstream, chunked: bool, *, retry_ok: bool) -> bool | None:
        """Stream the request body up and the response down at the same time. True when the
        connection may go on; None: the upstream closed before answering, send it again."""
        record = x.record
        n = self.requests
        body = asyncio.create_task(self._pump_request_body(x, up, chunked),
                                   name=f"waypoint-http1/request-body-{n}")
        response = asyncio.create_task(self._relay_response(x, up),
                                       name=f"waypoint-http1/response-{n}")
        try:
            await asyncio.wait({body, response}, return_when=asyncio.FIRST_COMPLETED)
            if body.done() and body.exception() is None:
                await asyncio.wait({response})
            elif body.done():
                exc = body.exception()
                if isinstance(exc, _ClientFailed):
                    response.cancel()
                    self._drop_upstream(abort=True)
                    record.fail(Failure.CLIENT_PROTOCOL if exc.status else exc.failure, exc.detail)
                    if exc.status and not x.response_started:
                        await self._answer_error(record, exc.status, exc.detail, method=x.method)
                    return False
                if exc is not None and not isinstance(exc, _UpstreamFailed):
                    raise exc
                # the upstream stopped taking the body; its answer may still come
                await asyncio.wait({response})
            exc = response.exception()
            if exc is None:
                return await self._after_response(x, up, body)
            body.cancel()
            if isinstance(exc, _UpstreamFailed):
                self._drop_upstream(abort=True)
                if (retry_ok and exc.failure is Failure.UPSTREAM_RESET and up.received == 0
                        and not x.response_started):
                    return None
                record.fail(exc.failure, exc.detail)
                if x.response_started:
                    self.down.abort()
                    return False
                await self._answer_error(record, 502, "", method=x.method)
                return False
            if isinstance(exc, _ClientFailed):
                self._drop_upstream(abort=True)
                record.fail(exc.failure, exc.detail)
                return False
            raise exc
        finally:
            for task in (body, response):
                if not task.done():
                    task.cancel()
            await asyncio.gather(body, response, return_exceptions=True)

    async def _after_response(self, x: _Exchange, up: _Upstream, body: asyncio.Task[None]) -> bool:
        """The response is complete; finish the request side and settle both connections."""
        if not body.done():
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError, _ClientFailed, _UpstreamFailed):
                await body
        up_reusable = up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE
        if up_reusable and up is self.up:
            up.conn.start_next_cycle()
        else:
            # abort when our request was cut short: the upstream must not take it as complete
            self._drop_upstream(abort=up.conn.our_state not in (h11.DONE, h11.MUST_CLOSE))
        if self.dc.their_state is h11.SEND_BODY:
            return await self._drain_request(x)
        return True

    async def _pump_request_body(self, x: _Exchange, up: _Upstream, chunked: bool) -> None:
        if self.dc.their_state is not h11.SEND_BODY:  # sent again: the (empty) body was read
            await self._up_write(up, up.conn.send(h11.EndOfMessage()) or b"")
            return
        while True:
            event = await self._down_event()
            if isinstance(event, h11.Data):
                x.record.request_bytes += len(event.data)
                await self._up_write(up, up.conn.send(h11.Data(data=event.data)) or b"")
            elif isinstance(event, h11.EndOfMessage):
                trailers = forwardable_trailers(list(event.headers.raw_items())) if chunked else []
                await self._up_write(up, up.conn.send(h11.EndOfMessage(headers=trailers)) or b"")
                return
            else:
                raise _ClientFailed(Failure.CLIENT_RESET, "client closed mid-request")

    async def _relay_response(self, x: _Exchange, up: _Upstream) -> None:
        record = x.record
        while True:
            event = await self._up_event(up)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    raise _UpstreamFailed(Failure.UPSTREAM_PROTOCOL,
                                          "upstream switched protocols unasked")
                if event.status_code == 100 or self.dc.their_http_version != b"1.1":
                    continue  # 100: answered here already; no 1xx to HTTP/1.0 (RFC 9110 15.2)
                out = self._down_send(h11.InformationalResponse(
                    status_code=event.status_code, headers=forwardable(list(event.headers.raw_items())),
                    reason=event.reason))
                await self._down_write(out)
            elif isinstance(event, h11.Response):
                raw = list(event.headers.raw_items())
                # a length beside Transfer-Encoding is void (RFC 9112 6.3): never relay it
                drop = (b"content-length",) if header_value(raw, b"transfer-encoding") else ()
                headers = forwardable(raw, drop=drop)
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
                await self._down_write(out)
            elif isinstance(event, h11.Data):
                record.response_bytes += len(event.data)
                await self._down_write(self._down_send(h11.Data(data=event.data)))
            elif isinstance(event, h11.EndOfMessage):
                trailers = (forwardable_trailers(list(event.headers.raw_items()))
                            if x.down_chunked else [])
                await self._down_write(self._down_send(h11.EndOfMessage(headers=trailers)))
                return
            else:
                raise _UpstreamFailed(Failure.UPSTREAM_RESET,
                                      "upstream closed the connection before the response ended")

    # -------------------------------------------------------------------- upstream

    async def _upstream(self, record: RequestRecord) -> _Upstream | None:
        if self.up is not None:
            return self.up
        try:
            stream = await self.hooks.open_upstream()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            record.fail(Failure.UPSTREAM_CONNECT, f"upstream connect failed: {e}")
            return None
        conn = h11.Connection(h11.CLIENT,
                              max_incomplete_event_size=self.limits.max_response_header_bytes)
        self.up = _Upstream(conn, stream)
        return self.up

    def _drop_upstream(self, *, abort: bool) -> None:
        up, self.up = self.up, None
        if up is None:
            return
        if abort:
            up.stream.abort()
        else:
            up.stream.close()

    # ------------------------------------------------------------------- plumbing

    async def _down_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.dc.next_event()
            except h11.RemoteProtocolError as e:
                if self.down_eof:
                    raise _ClientFailed(Failure.CLIENT_RESET, f"client closed mid-request: {e}") from e
                status = e.error_status_hint if e.error_status_hint in (400, 431, 501) else 400
                raise _ClientFailed(_failure_of(status), f"malformed request: {e}", status) from e
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.down.read(self.limits.read_size)
            except (StreamReset, OSError) as e:
                raise _ClientFailed(Failure.CLIENT_RESET, f"client reset: {e}") from e
            self.down_eof = not data
            self.dc.receive_data(data)

    async def _up_event(self, up: _Upstream) -> h11.Event:
        while True:
            try:
                event = up.conn.next_event()
            except h11.RemoteProtocolError as e:
                if up.eof:
                    raise _UpstreamFailed(
                        Failure.UPSTREAM_RESET,
                        "upstream closed the connection before the response ended") from e
                raise _UpstreamFailed(Failure.UPSTREAM_PROTOCOL, f"malformed response: {e}") from e
            if event is h11.PAUSED:
                raise _UpstreamFailed(Failure.UPSTREAM_PROTOCOL, "upstream switched protocols")
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await up.stream.read(self.limits.read_size)
            except (StreamReset, OSError) as e:
                raise _UpstreamFailed(Failure.UPSTREAM_RESET, f"upstream reset: {e}") from e
            up.received += len(data)
            up.eof = not data
            up.conn.receive_data(data)

    def _down_send(self, event: h11.Event) -> bytes:
        try:
            return self.dc.send(event) or b""
        except h11.LocalProtocolError as e:
            # what the upstream sent cannot be relayed as is (e.g. a body longer than its length)
            raise _UpstreamFailed(Failure.UPSTREAM_PROTOCOL, f"cannot relay the response: {e}") from e

    async def _down_write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.down.write(data)
            await self.down.drain()
        except (StreamReset, OSError) as e:
            raise _ClientFailed(Failure.CLIENT_RESET, f"client gone: {e}") from e

    async def _up_write(self, up: _Upstream, data: bytes) -> None:
        if not data:
            return
        try:
            up.stream.write(data)
            await up.stream.drain()
        except (StreamReset, OSError) as e:
            raise _UpstreamFailed(Failure.UPSTREAM_RESET, f"upstream gone: {e}") from e

    def _declared_length(self, x: _Exchange) -> int | None:
        """The declared length of the request body still to come (None: chunked)."""
        if self.dc.their_state is not h11.SEND_BODY or x.raw is None:
            return 0
        value = header_value(x.raw, b"content-length")
        if value is None:
            return None if header_value(x.raw, b"transfer-encoding") is not None else 0
        try:
            return int(value.split(b",")[0])
        except ValueError:
            return None

    def _report(self, record: RequestRecord) -> None:
        try:
            self.hooks.on_request(record)
        except Exception:
            log.exception("on_request hook failed")


def _failure_of(status: int) -> Failure:
    return {431: Failure.HEADERS_TOO_LARGE, 501: Failure.NOT_IMPLEMENTED}.get(status, Failure.BAD_REQUEST)


