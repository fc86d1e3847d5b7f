"""The asyncio driver of one HBONE connection (either end) and its streams as splice legs.

`HboneProtocol` feeds bytes from the TLS transport into the sans-IO
`HboneClient`/`HboneServer`, dispatches the events to `StreamLeg`s, writes
`data_to_send()` after each batch, and arms one timer at `next_deadline()`.
It is the only place where h2 state meets sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from ztunnel.copy import WRITE_HIGH, WRITE_LOW, Splice, set_nodelay
from ztunnel.hbone import (
    ConnectionTerminated,
    ErrorCode,
    HboneError,
    StreamData,
    StreamEnded,
    StreamReset,
    WindowOpened,
)

log = logging.getLogger("ambit.ztunnel.tunnel")

# chunks of output (frames) smaller than this together are joined into one write
COALESCE_BELOW = 64 * 1024


class StreamLeg:
    """One HBONE stream as a splice leg.

    Data received before `attach` is held (the peer's window bounds it). Data to
    send beyond the stream's flow-control window waits in `pending` (copied
    once) until a WindowOpened; meanwhile the other leg stops reading.
    Pausing *our* reading means withholding the WINDOW_UPDATEs.
    """

    def __init__(self, conn: HboneProtocol, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.splice: Splice | None = None
        # views of bytes we own: a partial send re-slices the view, never copies the rest
        self.pending: deque[memoryview] = deque()
        self.pending_eof = False
        self.sent_eof = False
        self.early: list[bytes | memoryview] = []
        self.early_eof = False
        self.got_eof = False
        self.closed = False  # reset, or the connection is gone
        self.close_error: str | None = None
        self._reading = True
        self._unacked = 0
        self._blocked = False
        self.response: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # called once if the stream is reset before a splice is attached (the inbound
        # side cancels the workload dial it is waiting for)
        self.on_early_reset: Callable[[], object] | None = None

    # -- from the connection

    def on_data(self, data: bytes | memoryview) -> None:
        if self.splice is None:
            self.early.append(data)
            return
        self.splice.on_data(self, data)
        self._consumed(len(data))

    def _consumed(self, n: int) -> None:
        if self._reading and not self.closed:
            self.conn.acknowledge(self.stream_id, n)
        else:
            self._unacked += n

    def on_end(self) -> None:
        self.got_eof = True
        if self.splice is None:
            self.early_eof = True
        else:
            self.splice.on_eof(self)

    def on_reset(self, error: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        self.pending.clear()
        if not self.response.done():
            self.response.set_exception(ConnectionResetError(error))
            self.response.exception()  # only the pool awaits it; never "unretrieved"
        if self.splice is not None:
            self.splice.on_lost(self, error)
        elif self.on_early_reset is not None:
            hook, self.on_early_reset = self.on_early_reset, None
            hook()

    def on_window(self) -> None:
        self._flush_pending()
        self._update_blocked()

    def on_conn_paused(self) -> None:
        self._update_blocked()

    # -- leg

    def attach(self, splice: Splice) -> None:
        self.splice = splice
        early, self.early = self.early, []
        for d in early:
            splice.on_data(self, d)
            self._consumed(len(d))
        if self.early_eof:
            splice.on_eof(self)
        if self.closed:
            splice.on_lost(self, self.close_error)
            return
        if self._blocked:
            splice.on_write_paused(self)

    def send(self, data: bytes | memoryview) -> None:
        if self.closed:
            return
        if self.pending:
            self.pending.append(memoryview(bytes(data)))
        else:
            try:
                n = self.conn.send_data(self.stream_id, data)
            except HboneError as e:
                self.conn.reset(self.stream_id)
                self.on_reset(f"stream {self.stream_id}: {e}")
                return
            if n < len(data):
                self.pending.append(memoryview(bytes(data[n:])))
        self._update_blocked()

    def _flush_pending(self) -> None:
        while self.pending and not self.closed:
            chunk = self.pending[0]
            try:
                n = self.conn.send_data(self.stream_id, chunk)
            except HboneError as e:
                self.conn.reset(self.stream_id)
                self.on_reset(f"stream {self.stream_id}: {e}")
                return
            if n < len(chunk):
                self.pending[0] = chunk[n:]
                return
            self.pending.popleft()
        if not self.pending and self.pending_eof:
            self.pending_eof = False
            self.send_eof()

    def _update_blocked(self) -> None:
        blocked = bool(self.pending) or self.conn.write_paused
        if blocked == self._blocked:
            return
        self._blocked = blocked
        if self.splice is not None and not self.closed:
            if blocked:
                self.splice.on_write_paused(self)
            else:
                self.splice.on_write_resumed(self)

    def send_eof(self) -> None:
        if self.closed or self.sent_eof:
            return
        if self.pending:
            self.pending_eof = True
            return
        self.sent_eof = True
        try:
            self.conn.end_stream(self.stream_id)
        except HboneError as e:
            self.on_reset(f"stream {self.stream_id}: {e}")

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        if self._unacked and not self.closed:
            n, self._unacked = self._unacked, 0
            self.conn.acknowledge(self.stream_id, n)

    def close(self) -> None:
        """Both directions are done (or the other leg ended cleanly): finish our half."""
        self.send_eof()
        if not self.got_eof and not self.closed:
            # we will not read the rest: tell the peer instead of leaving its half open
            self.closed = True
            self.conn.reset(self.stream_id)
        self.conn.forget(self.stream_id)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.reset(self.stream_id)
        self.conn.forget(self.stream_id)


class HboneProtocol(asyncio.Protocol):
    """Drives one sans-IO HBONE endpoint over a (TLS) transport. Subclassed per side."""

    def __init__(self, proto: Any, label: str) -> None:
        self.proto = proto  # HboneClient | HboneServer
        self.label = label
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamLeg] = {}
        self.write_paused = False
        self.closed = False
        self.close_reason: str | None = None
        self.lost: asyncio.Future[str | None] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # while received bytes are being handled, writes wait for one flush at the end
        self._batching = False

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its API
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH * 2, low=WRITE_LOW * 2)
        self.proto.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.proto.receive_data(data, self.loop.time())
        except HboneError as e:
            # the sans-IO side should turn protocol errors into events; be safe anyway
            log.warning("%s: protocol error, closing the connection: %s", self.label, e)
            self.flush()
            self._fail(f"protocol error: {e}")
            return
        self._handle_batch(events)

    def _handle_batch(self, events: list[Any]) -> None:
        """Handle what one read or timer produced; the legs' writes meanwhile go out in one flush."""
        self._batching = True
        try:
            self.handle_events(events)
        finally:
            self._batching = False
        self.flush()

    def _flush_unless_batching(self) -> None:
        if not self._batching:
            self.flush()

    def eof_received(self) -> bool | None:
        self._fail("peer closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(str(exc) if exc else "connection closed")
        if not self.lost.done():
            self.lost.set_result(self.close_reason)

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in list(self.streams.values()):
            s.on_conn_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            s.on_conn_paused()

    # -- events

    def handle_events(self, events: Iterable[Any]) -> None:
        for ev in events:
            self.handle_event(ev)

    def handle_event(self, ev: Any) -> None:
        if isinstance(ev, StreamData):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_data(ev.data)
            else:
                # a stream we already gave up on: keep the connection window open
                self.acknowledge(ev.stream_id, len(ev.data))
        elif isinstance(ev, StreamEnded):
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.on_end()
        elif isinstance(ev, StreamReset):
            s = self.streams.pop(ev.stream_id, None)
            if s is not None:
                s.on_reset(f"stream reset by peer (error code {ev.error_code})")
        elif isinstance(ev, WindowOpened):
            targets = list(self.streams.values()) if ev.stream_id is None else [
                s for s in (self.streams.get(ev.stream_id),) if s is not None
            ]
            for s in targets:
                s.on_window()
        elif isinstance(ev, ConnectionTerminated):
            # the HBONE layer reports this only when the connection is over (a graceful
            # GOAWAY from the peer just stops new streams: see can_open_stream)
            self.flush()
            self._fail(f"connection terminated (code {ev.error_code}): {ev.reason}")
        else:
            self.handle_other(ev)

    def handle_other(self, ev: Any) -> None:
        raise TypeError(f"{self.label}: unexpected HBONE event {ev!r}")

    # -- operations used by the legs

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        n = int(self.proto.send_data(stream_id, data))
        self._flush_unless_batching()
        return n

    def end_stream(self, stream_id: int) -> None:
        self.proto.end_stream(stream_id)
        self._flush_unless_batching()

    def acknowledge(self, stream_id: int, n: int) -> None:
        if self.closed:
            return
        try:
            self.proto.acknowledge_received(stream_id, n)
        except HboneError:
            return
        self._flush_unless_batching()

    def reset(self, stream_id: int) -> None:
        if self.closed:
            return
        try:
            self.proto.reset_stream(stream_id, ErrorCode.CANCEL)
        except HboneError:
            pass
        self._flush_unless_batching()

    def respond(self, leg: StreamLeg, status: int) -> None:
        """Answer a CONNECT (the server side: inbound and the waypoint); a refusal forgets the stream."""
        if self.closed or leg.closed:
            return
        try:
            self.proto.respond(leg.stream_id, status)
        except Exception as e:  # an already-reset stream: nothing left to answer
            log.debug("%s: respond %d on stream %d: %s", self.label, status, leg.stream_id, e)
        if status != 200:
            self.forget(leg.stream_id)
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.stream_forgotten()

    def stream_forgotten(self) -> None:
        """Hook: the pool notes idleness here."""

    # -- plumbing

    def flush(self) -> None:
        chunks = self.proto.data_to_send_chunks()
        t = self.transport
        if chunks and t is not None and not t.is_closing():
            if len(chunks) == 1:
                t.write(chunks[0])
            elif sum(map(len, chunks)) <= COALESCE_BELOW:
                t.write(b"".join(chunks))  # small frames: one TLS record, one send
            else:
                # a DATA frame per write: what TLS encrypts and sends at once stays the size
                # of a frame, not of everything a window update let go (those big buffers
                # came from mmap, page faults and all)
                for chunk in chunks:
                    t.write(chunk)
        self._arm_timer()
        if self.proto.is_closed and not self.closed:
            self._fail("HBONE connection closed")

    def _arm_timer(self) -> None:
        at = self.proto.next_deadline()
        if self._timer is not None:
            # (once closed, _fail has cancelled the timer: no timer is armed then)
            if at is None or (self._timer_at is not None and self._timer_at <= at):
                # The keepalive deadline moves later with every read: instead of a new timer
                # per read, the armed one fires early, handle_timeout finds nothing due, and
                # it is armed again at the deadline then in force.
                return
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None and not self.closed:
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            events = self.proto.handle_timeout(self.loop.time())
        except HboneError as e:
            self._fail(f"timer: {e}")
            return
        self._handle_batch(events)

    def drain(self) -> None:
        """Graceful: GOAWAY, no new streams; the open ones finish."""
        if self.closed:
            return
        try:
            self.proto.start_drain()
        except HboneError:
            return
        self.flush()

    def _fail(self, reason: str) -> None:
        """The connection is gone: every stream still open fails, its client gets a reset."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        streams, self.streams = list(self.streams.values()), {}
        for s in streams:
            s.on_reset(f"{self.label}: {reason}")
        if self.transport is not None:
            self.transport.close()
        self.on_closed()

    def on_closed(self) -> None:
        """Hook: called once when the connection fails or closes."""

    def abort(self, reason: str) -> None:
        self._fail(reason)
        if self.transport is not None:
            self.transport.abort()
