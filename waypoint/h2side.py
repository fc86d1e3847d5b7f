"""One HTTP/2 connection of the proxy: its h2 state, byte stream, reader and writer tasks, and
what waits to be sent on each of its streams.

What a side receives goes through its `FrameSplitter` (floods, graceful
GOAWAY) into h2, and the events to its owner (the proxy). What the owner
sends on a stream is queued (`Out`) and sent as the stream's flow-control
window allows. DATA relayed from the other side carries an `ack`: the credit
to give back to the side it came from once it has been framed here, written
to this side's byte stream and drained. That deferred acknowledgement is the
whole of the proxy's back-pressure: a slow reader on one side stalls the
sender on the other through the windows, and the proxy holds at most the
windows it advertises. The reader never waits for the writer, so two peers
that both write before reading cannot deadlock the proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import h2.events as h2e
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes

from ambit.tasks import TaskSet
from waypoint.exchange import Limits
from waypoint.h2input import Flood, FrameSplitter, GracefulGoaway
from waypoint.headers import RawHeaders
from waypoint.streams import ByteStream, StreamReset
from ztunnel.hbone.h2compat import HboneH2Connection

log = logging.getLogger("ambit.waypoint.http2")

X = TypeVar("X")
_DEFAULT_WINDOW = 65_535  # RFC 9113 6.9.2: every connection window starts here


class H2Conn(HboneH2Connection):
    """h2's connection with the HPACK decoder's hard limit raised to `Limits.h2_header_cap`
    (through ztunnel.hbone.h2compat, which holds every use of h2's insides); the owner
    advertises the same value, so the acknowledged setting keeps it."""

    def __init__(self, config: H2Configuration, limits: Limits) -> None:
        super().__init__(config, closed_streams_kept=limits.h2_closed_streams_kept,
                         max_header_list_size=limits.h2_header_cap)


@dataclass(eq=False)
class Out:
    """Something to send on one stream, in order: data (within the windows), then an end.

    `done` is called once: with None when the item is sent, with the reason when
    it never will be.
    """

    data: bytes = b""
    ack: tuple[Acker, int, int] | None = None  # credit for (source side, stream, bytes)
    end: bool = False
    trailers: RawHeaders | None = None  # ends the stream
    reset: ErrorCodes | None = None  # after everything before it
    done: Callable[[str | None], None] | None = None


class Acker(Protocol):
    """The side some relayed DATA came from: it gives its peer the credit back."""

    def ack(self, sid: int, n: int) -> None: ...


class Owner(Protocol):
    """What a side tells the proxy that owns it."""

    def side_events(self, side: H2Side[Any], events: list[h2e.Event]) -> None: ...
    def side_goaway(self, side: H2Side[Any], last_stream_id: int) -> None: ...
    def side_eof(self, side: H2Side[Any]) -> None: ...
    def side_failed(self, side: H2Side[Any], reason: str, code: ErrorCodes | None,
                    *, wire_gone: bool) -> None: ...
    def side_received(self, side: H2Side[Any]) -> None: ...
    def side_idle(self, side: H2Side[Any]) -> None: ...


class H2Side(Generic[X]):
    """One h2 connection and its byte stream; `exchanges` maps its stream ids to the owner's."""

    def __init__(self, name: str, stream: ByteStream, conn: H2Conn, splitter: FrameSplitter,
                 owner: Owner, *, clock: Callable[[], float], read_size: int) -> None:
        self.name = name
        self.stream = stream
        self.conn = conn
        self.splitter = splitter
        self.owner = owner
        self.clock = clock
        self.read_size = read_size
        self.outq: dict[int, deque[Out]] = {}
        self.owed: list[tuple[Acker, int, int]] = []
        self.wake = asyncio.Event()
        self.lost: str | None = None  # the connection is over, and why
        self.eof = False
        self.goaway: int | None = None  # the peer's graceful GOAWAY: the last stream it takes
        self.exchanges: dict[int, X] = {}
        self.data_frames = 0  # DATA frames sent since the writer last ran

    # ---------------------------------------------------------------- I/O tasks

    def start(self, tasks: TaskSet) -> None:
        tasks.spawn(f"{self.name}-reader", self._reader())
        tasks.spawn(f"{self.name}-writer", self._writer())
        self.wake.set()

    async def _reader(self) -> None:
        try:
            while self.lost is None:
                data = await self.stream.read(self.read_size)
                if not data:
                    self.eof = True
                    self.owner.side_eof(self)
                    return
                self.receive(data)
        except (StreamReset, OSError) as e:
            self.owner.side_failed(self, f"{self.name} reset: {e}", None, wire_gone=True)
        except Exception:
            log.exception("HTTP/2 %s: error handling received data", self.name)
            self.owner.side_failed(self, "internal error", ErrorCodes.INTERNAL_ERROR, wire_gone=False)

    async def _writer(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.lost is not None:
                    return
                data = self.conn.data_to_send()
                owed, self.owed = self.owed, []
                guard = self.splitter.guard
                if self.data_frames:
                    guard.data_frames_sent(self.data_frames, self.clock())
                    self.data_frames = 0
                guard.output_taken()
                if data:
                    self.stream.write(data)
                    await self.stream.drain()
                for source, sid, n in owed:
                    source.ack(sid, n)
        except (StreamReset, OSError) as e:
            self.owner.side_failed(self, f"{self.name} gone: {e}", None, wire_gone=True)
        except Exception:
            log.exception("HTTP/2 %s: error writing", self.name)
            self.owner.side_failed(self, "internal error", ErrorCodes.INTERNAL_ERROR, wire_gone=False)

    def receive(self, data: bytes) -> None:
        """Feed received bytes through the splitter and h2; events go to the owner."""
        try:
            for chunk in self.splitter.feed(data, self.clock()):
                if isinstance(chunk, GracefulGoaway):
                    self.goaway = chunk.last_stream_id if self.goaway is None else min(
                        self.goaway, chunk.last_stream_id)
                    self.owner.side_goaway(self, chunk.last_stream_id)
                else:
                    self.owner.side_events(self, self.conn.receive_data(chunk))
                if self.lost is not None:
                    return
        except Flood as flood:
            log.warning("HTTP/2 %s: %s", self.name, flood.reason)
            self.owner.side_failed(self, f"flood: {flood.reason}", flood.code, wire_gone=False)
        except ProtocolError as e:
            # h2 has queued a GOAWAY with the matching code
            self.owner.side_failed(self, f"{self.name} broke HTTP/2: {e}", None, wire_gone=False)
        finally:
            self.owner.side_received(self)

    # ----------------------------------------------------------- stream output

    def queue(self, sid: int, item: Out) -> None:
        """Send `item` on stream `sid` after what is queued there, as soon as the window allows."""
        if self.lost is not None:
            self._discard(item, f"{self.name} connection is gone")
            return
        self.outq.setdefault(sid, deque()).append(item)
        self._pump_stream(sid)
        self.wake.set()

    def pump(self, sid: int) -> None:
        """A window opened (sid 0: the connection's, or a SETTINGS change): send what waits."""
        if self.lost is not None:
            return
        for s in (list(self.outq) if sid == 0 else [sid]):
            self._pump_stream(s)
        self.wake.set()

    def _pump_stream(self, sid: int) -> None:
        queue = self.outq.get(sid)
        conn = self.conn
        while queue:
            item = queue.popleft()
            try:
                while item.data:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        queue.appendleft(item)
                        return  # a WindowUpdated resumes it
                    conn.send_data(sid, item.data[:window])
                    self.data_frames += 1
                    item.data = item.data[window:]
                if item.trailers is not None:
                    conn.send_headers(sid, item.trailers, end_stream=True)
                elif item.end:
                    conn.end_stream(sid)
                if item.reset is not None:
                    conn.reset_stream(sid, item.reset)
            except H2Error as e:
                log.debug("HTTP/2 %s: stream %d cannot take more: %s", self.name, sid, e)
                self._discard(item, f"stream closed: {e}")
                self.drop(sid)
                return
            if item.ack is not None:
                self.owed.append(item.ack)
            if item.done is not None:
                item.done(None)
        self.outq.pop(sid, None)
        self.owner.side_idle(self)

    def drop(self, sid: int) -> None:
        """Forget what waits to be sent on a stream; its sources get their credit back."""
        for item in self.outq.pop(sid, ()):
            self._discard(item, "stream dropped")

    def _discard(self, item: Out, why: str) -> None:
        if item.ack is not None:
            source, sid, n = item.ack
            source.ack(sid, n)
        if item.done is not None:
            item.done(why)

    def ack(self, sid: int, n: int) -> None:
        """Give the peer `n` bytes of credit on a stream (and the connection)."""
        if n <= 0 or self.lost is not None:
            return
        try:
            self.conn.acknowledge_received_data(n, sid)
        except H2Error:
            return
        self.wake.set()

    def reset_stream(self, sid: int, code: ErrorCodes) -> None:
        self.drop(sid)
        if self.lost is not None:
            return
        try:
            self.conn.reset_stream(sid, code)
        except H2Error:
            pass
        self.wake.set()

    # ----------------------------------------------------------- connection end

    def shut(self, reason: str, code: ErrorCodes | None, *, wire_gone: bool) -> None:
        """The connection is over: send the GOAWAY (with `code`, or what h2 queued) unless the
        wire is gone, then close (abort when gone). Queued output is discarded."""
        if self.lost is not None:
            return
        if not wire_gone:
            if code is not None:
                try:
                    self.conn.close_connection(error_code=code, additional_data=reason.encode()[:256])
                except H2Error:
                    pass
            self._flush_now()
        self.lost = reason
        self.wake.set()
        queued, self.outq = self.outq, {}
        for items in queued.values():
            for item in items:
                self._discard(item, reason)
        self.owed.clear()
        if wire_gone:
            self.stream.abort()
        else:
            self.stream.close()

    def close(self) -> None:
        """Close gracefully: GOAWAY(NO_ERROR), then the stream."""
        self.shut("closed", ErrorCodes.NO_ERROR, wire_gone=False)

    def _flush_now(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.stream.write(data)


def new_side(name: str, stream: ByteStream, owner: Owner, limits: Limits,
             clock: Callable[[], float], *, server: bool) -> H2Side[Any]:
    """A side with its preface queued: our SETTINGS (limits, windows) and the connection window."""
    conn = H2Conn(H2Configuration(client_side=not server, header_encoding=None), limits)
    splitter = FrameSplitter(server=server, max_header_list_size=limits.h2_header_cap,
                             max_resets=limits.h2_max_resets,
                             max_small_frames=limits.h2_max_small_frames)
    conn.initiate_connection()
    settings: dict[SettingCodes | int, int] = {
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.h2_header_cap,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.h2_stream_window,
    }
    if server:
        settings[SettingCodes.MAX_CONCURRENT_STREAMS] = limits.h2_max_concurrent_streams
    else:
        settings[SettingCodes.ENABLE_PUSH] = 0
    conn.update_settings(settings)
    if limits.h2_connection_window > _DEFAULT_WINDOW:
        conn.increment_flow_control_window(limits.h2_connection_window - _DEFAULT_WINDOW)
    return H2Side(name, stream, conn, splitter, owner, clock=clock, read_size=limits.read_size)
