"""One side of the HTTP/1 proxy: an h11 connection over a byte stream, failures named by side.

h11 parses and frames; this reads what h11 needs, writes what it produces with
back-pressure (drain after every write), and turns every way a side can fail
(a reset stream, EOF mid-message, malformed HTTP) into one exception per side:
`ClientFailed` for the downstream, `UpstreamFailed` for the upstream, each with
the `Failure` to record and, for a malformed request, the status to answer.

h11 is lenient where a proxy must not be: it unfolds obs-fold lines, takes a bare
LF as a line end and lets control characters through in field values. Two
servers could read such a head two ways (the stuff of request smuggling), so a
client's request head is checked as it arrives (`HeadScan`, each byte once) and
refused with 400. A request head must arrive whole within `head_timeout` (one deadline
per head, from when the engine starts waiting for it).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import h11

from waypoint.exchange import Failure
from waypoint.streams import ByteStream, StreamReset

_HINTED = {400: Failure.BAD_REQUEST, 431: Failure.HEADERS_TOO_LARGE, 501: Failure.NOT_IMPLEMENTED}
_CR_OR_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # every control character but HTAB


class HeadScan:
    """Checks a request head as its bytes arrive, each byte once (so a head trickled in tiny
    reads costs what one read of it costs): why it is refused, or None while it may be fine.

    RFC 9112 lets a recipient accept these; a proxy that accepts them can be made to
    disagree with the server behind it about where a request ends: a bare LF or CR, an
    obs-fold line, a control character (but HTAB) in a header line. Empty lines before
    the request line are allowed; the scan ends at the empty line that ends the head.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.line = 0  # where the current line starts in buf
        self.pos = 0  # checked up to here (within the current line)
        self.lines = 0  # complete lines of the head (the request line first)
        self.done = False  # the head is complete: what follows is not ours to check

    def feed(self, data: bytes) -> str | None:
        if self.done or not data:
            return None
        self.buf += data
        buf = self.buf
        while True:
            if self.lines == 0 and self.pos == self.line:  # empty lines before the request line
                while buf.startswith(b"\r\n", self.line):
                    self.line = self.pos = self.line + 2
                rest = len(buf) - self.line
                if rest == 0 or (rest == 1 and buf[self.line] == 0x0D):
                    return None  # nothing, or a CR whose LF is on its way
            nl = buf.find(b"\n", self.pos)
            end = nl if nl >= 0 else len(buf)
            if self.pos == self.line and self.lines and end > self.line and buf[self.line] in b" \t":
                return "obs-fold: a header line starts with whitespace (folded lines are refused)"
            if nl >= 0 and (nl == self.line or buf[nl - 1] != 0x0D):
                return "a line ends with a bare LF (CRLF is required)"
            # a CR may only end the line (or be the last byte: its LF may still come)
            stop = end - 1 if end > self.line and buf[end - 1] == 0x0D else end
            for m in _CR_OR_CTL.finditer(buf, self.pos, stop):
                if buf[m.start()] == 0x0D:
                    return "a bare CR in the request head"
                if self.lines:
                    return "a control character in a header field"
            if nl < 0:
                self.pos = stop  # a last CR is looked at again with what follows it
                return None
            if nl - 1 == self.line and self.lines:  # the empty line: the head is complete
                self.done = True
                self.buf = bytearray()
                return None
            self.lines += 1
            self.line = self.pos = nl + 1


def head_problem(buffered: bytes) -> str | None:
    """Why the request head at the start of `buffered` (complete or not) is refused, or None
    (HeadScan, fed at once)."""
    return HeadScan().feed(buffered)


class PeerFailed(Exception):
    """A side of the proxy failed; `status` is what to answer a malformed request (else 0)."""

    def __init__(self, failure: Failure, detail: str, status: int = 0) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail
        self.status = status


class ClientFailed(PeerFailed):
    """The downstream reset, closed mid-message, or sent malformed HTTP."""


class UpstreamFailed(PeerFailed):
    """The upstream reset, closed mid-message, or sent malformed HTTP."""


class H1Peer:
    """An h11 connection (server role downstream, client role upstream) on a byte stream."""

    def __init__(self, stream: ByteStream, *, upstream: bool, max_head: int, read_size: int,
                 head_timeout: float | None = None) -> None:
        self.stream = stream
        # a client's next request head must arrive, whole, within this many seconds of the
        # engine starting to wait for it (one deadline per head, not per read: a byte every
        # few seconds does not keep a head open)
        self.head_timeout = head_timeout
        self._head: HeadScan | None = None  # the request head being received (downstream)
        self._deadline: float | None = None
        self.upstream = upstream
        self.conn = h11.Connection(h11.CLIENT if upstream else h11.SERVER,
                                   max_incomplete_event_size=max_head)
        self.read_size = read_size
        self.received = 0  # bytes read; the upstream's count restarts with each request
        self.eof = False

    def _failed(self, failure: Failure, detail: str, status: int = 0) -> PeerFailed:
        return (UpstreamFailed if self.upstream else ClientFailed)(failure, detail, status)

    async def next_event(self) -> Any:
        """The next h11 event (never NEED_DATA): reads as needed. Raises ClientFailed or
        UpstreamFailed."""
        while True:
            if not self.upstream and self.conn.their_state is h11.IDLE and self._head is None:
                # a new head: what is already buffered (pipelined) is checked once, then
                # each read as it comes; its deadline starts now
                self._head = HeadScan()
                self._check_head(self.conn.trailing_data[0])
                if self.head_timeout is not None:
                    self._deadline = asyncio.get_running_loop().time() + self.head_timeout
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                raise self._protocol_error(e) from e
            if event is not h11.NEED_DATA:
                if self._head is not None and self.conn.their_state is not h11.IDLE:
                    self._head = self._deadline = None
                return event
            try:
                if self._deadline is not None and self.conn.their_state is h11.IDLE:
                    async with asyncio.timeout_at(self._deadline):
                        data = await self.stream.read(self.read_size)
                else:
                    data = await self.stream.read(self.read_size)
            except TimeoutError:
                # idle between requests: close; part of a head sent too slowly: 408
                partial = bool(self.conn.trailing_data[0].lstrip(b"\r\n"))
                raise self._failed(Failure.CLIENT_RESET, f"no request head within {self.head_timeout:g}s"
                                   + (" (a partial one)" if partial else ""), 408 if partial else 0) from None
            except (StreamReset, OSError) as e:
                raise self._failed(self._reset, f"{self._who} reset: {e}") from e
            self.received += len(data)
            self.eof = not data
            if self._head is not None:
                self._check_head(data)
            self.conn.receive_data(data)

    def _check_head(self, data: bytes) -> None:
        assert self._head is not None
        problem = self._head.feed(data)
        if problem is not None:
            raise self._failed(Failure.BAD_REQUEST, f"malformed request: {problem}", 400)

    async def watch(self, limit: int) -> None:
        """While a response is on its way: notice the peer going away (a reset, or EOF: like
        Envoy and nginx, a client that closes before its response has given up on it) and
        take what it pipelines into h11's buffer, up to `limit` bytes (then stop reading:
        back-pressure). Raises ClientFailed or UpstreamFailed."""
        taken = 0
        while taken < limit:
            try:
                data = await self.stream.read(min(self.read_size, limit - taken))
            except (StreamReset, OSError) as e:
                raise self._failed(self._reset, f"{self._who} reset: {e}") from e
            if not data:
                self.eof = True
                raise self._failed(self._reset, f"{self._who} closed the connection before the "
                                                "response")
            self.received += len(data)
            taken += len(data)
            self.conn.receive_data(data)

    def _protocol_error(self, e: h11.RemoteProtocolError) -> PeerFailed:
        if self.eof:
            return self._failed(self._reset, f"{self._who} closed the connection mid-message: {e}")
        if self.upstream:
            return self._failed(Failure.UPSTREAM_PROTOCOL, f"malformed response: {e}")
        status = e.error_status_hint if e.error_status_hint in _HINTED else 400
        return self._failed(_HINTED[status], f"malformed request: {e}", status)

    async def write(self, data: bytes | None) -> None:
        """Write and drain. Raises ClientFailed or UpstreamFailed when the stream is gone."""
        if not data:
            return
        try:
            self.stream.write(data)
            await self.stream.drain()
        except (StreamReset, OSError) as e:
            raise self._failed(self._reset, f"{self._who} gone: {e}") from e

    @property
    def _reset(self) -> Failure:
        return Failure.UPSTREAM_RESET if self.upstream else Failure.CLIENT_RESET

    @property
    def _who(self) -> str:
        return "upstream" if self.upstream else "client"

    @property
    def done(self) -> bool:
        """Both directions finished the current exchange: the next may start."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
