"""Byte streams: what the HTTP engine reads and writes, an adapter for callback-style legs,
and in-memory pipes.

The engine sees each side of a proxied connection as a `ByteStream` (asyncio,
pull-style reads, drain for back-pressure). The ztunnel's legs are push-style
(callbacks: data arrived, EOF, lost, pause/resume writing); `LegStream` turns
one into a `ByteStream`, with the same callback names as the ztunnel's splice,
so a leg can attach to it directly. `memory_pipe()` joins two `LegStream`s
back to back: what tests (and any in-process peer) use, with the buffering
bounded by its high-water mark and the peak recorded.

Contract of a `ByteStream`:
- `read(max)` returns 1..max bytes, b"" at EOF (and after `close()`); it raises
  `StreamReset` when the peer aborted (after the bytes already received).
- `write(data)` never blocks and never raises for a gone peer (the bytes are
  dropped); `drain()` waits until the peer has taken enough, and raises
  `StreamReset` once the peer is gone (reset, or closed without reading).
- `write_eof()` half-closes; `close()` is a graceful close of both halves;
  `abort()` resets the connection.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from waypoint import WaypointError

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class StreamReset(WaypointError):
    """The byte stream was reset (by the peer, or aborted here); the message says by whom."""


class ByteStream(Protocol):
    """One direction pair of a proxied connection (see the module docstring)."""

    async def read(self, max_bytes: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class Leg(Protocol):
    """A push-style connection end (a ztunnel splice leg, or one end of a memory wire)."""

    def send(self, data: bytes | memoryview) -> None: ...
    def send_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class LegStream:
    """A `ByteStream` over a push-style `Leg`.

    The leg calls `on_data`/`on_eof`/`on_lost`/`on_write_paused`/`on_write_resumed`
    (the ztunnel splice's callback names, leg first). Received bytes wait in a
    buffer; above `high` bytes the leg is told to pause reading, below `low` to
    resume, so the buffer holds at most `high` plus one delivery.
    """

    def __init__(self, leg: Leg, *, high: int = HIGH_WATER, low: int = LOW_WATER,
                 name: str = "stream") -> None:
        if not 0 <= low <= high:
            raise WaypointError(f"LegStream {name}: need 0 <= low ({low}) <= high ({high})")
        self.leg = leg
        self.name = name
        self.high = high
        self.low = low
        self._buffer = bytearray()
        self._eof = False  # the peer half-closed: read returns b"" once the buffer is empty
        self._lost: str | None = None  # the peer is gone: why
        self._lost_clean = False  # ... by a clean close (reads end with b"", not an error)
        self._closed = False  # closed or aborted here
        self._eof_sent = False
        self._reading_paused = False
        self._write_paused = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        # statistics (tests assert bounded buffering with these)
        self.peak_buffered = 0
        self.received = 0
        self.sent = 0

    # ------------------------------------------------------------ from the leg

    def on_data(self, leg: object, data: bytes | memoryview) -> None:
        if self._closed or self._eof or self._lost is not None:
            return
        self._buffer += data  # a copy: the leg may reuse a shared buffer after this returns
        self.received += len(data)
        if len(self._buffer) > self.peak_buffered:
            self.peak_buffered = len(self._buffer)
        if len(self._buffer) > self.high and not self._reading_paused:
            self._reading_paused = True
            self.leg.pause_reading()
        self._readable.set()

    def on_eof(self, leg: object) -> None:
        self._eof = True
        self._readable.set()

    def on_lost(self, leg: object, error: str | None) -> None:
        if self._lost is not None:
            return
        self._lost = error or "closed by peer"
        self._lost_clean = error is None
        self._readable.set()
        self._writable.set()

    def on_write_paused(self, leg: object) -> None:
        self._write_paused = True
        self._writable.clear()

    def on_write_resumed(self, leg: object) -> None:
        self._write_paused = False
        self._writable.set()

    # ------------------------------------------------------------- ByteStream

    async def read(self, max_bytes: int) -> bytes:
        if max_bytes < 1:
            raise WaypointError(f"{self.name}: read({max_bytes}): ask for at least one byte")
        while not self._buffer:
            if self._closed:
                if self._lost is not None and not self._lost_clean:
                    raise StreamReset(f"{self.name}: {self._lost}")
                return b""
            if self._lost is not None:
                if self._lost_clean:
                    return b""
                raise StreamReset(f"{self.name}: {self._lost}")
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        if self._reading_paused and len(self._buffer) <= self.low:
            self._reading_paused = False
            if not self._closed and self._lost is None:
                self.leg.resume_reading()
        return chunk

    def write(self, data: bytes) -> None:
        if self._eof_sent and not self._closed:
            raise WaypointError(f"{self.name}: write() after write_eof()")
        if self._closed or self._lost is not None or not data:
            return
        self.sent += len(data)
        self.leg.send(data)

    async def drain(self) -> None:
        while True:
            if self._lost is not None:
                raise StreamReset(f"{self.name}: {self._lost}")
            if self._closed:
                raise StreamReset(f"{self.name}: closed here")
            if not self._write_paused:
                return
            await self._writable.wait()

    def write_eof(self) -> None:
        if self._eof_sent or self._closed or self._lost is not None:
            return
        self._eof_sent = True
        self.leg.send_eof()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._readable.set()
        self._writable.set()
        if self._lost is None:
            self.leg.close()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lost = self._lost or "aborted here"
        self._buffer.clear()
        self._readable.set()
        self._writable.set()
        self.leg.abort()

    @property
    def at_eof(self) -> bool:
        """The peer half-closed and every byte it sent has been read."""
        return self._eof and not self._buffer

    @property
    def gone(self) -> bool:
        """The peer closed or reset, or this end was closed: nothing more can be written."""
        return self._lost is not None or self._closed


class _Wire:
    """One direction's plumbing of a memory pipe: the leg of `near`, delivering to `far`."""

    def __init__(self) -> None:
        self.near: LegStream | None = None
        self.far: LegStream | None = None
        self._eof_sent = False
        self._gone = False

    def send(self, data: bytes | memoryview) -> None:
        if not self._gone and self.far is not None:
            self.far.on_data(self, bytes(data))

    def send_eof(self) -> None:
        if not self._gone and not self._eof_sent and self.far is not None:
            self._eof_sent = True
            self.far.on_eof(self)

    def pause_reading(self) -> None:
        # near's buffer is full: whoever writes into it (far) must wait
        if self.far is not None:
            self.far.on_write_paused(self)

    def resume_reading(self) -> None:
        if self.far is not None:
            self.far.on_write_resumed(self)

    def close(self) -> None:
        if self._gone:
            return
        self.send_eof()
        self._gone = True
        if self.far is not None:
            self.far.on_lost(self, None)

    def abort(self) -> None:
        if self._gone:
            return
        self._gone = True
        if self.far is not None:
            self.far.on_lost(self, "reset by peer")


def memory_pipe(*, high: int = HIGH_WATER, low: int = LOW_WATER,
                names: tuple[str, str] = ("a", "b")) -> tuple[LegStream, LegStream]:
    """Two connected `LegStream`s: what one writes, the other reads.

    Each end buffers at most `high` bytes (plus one write) before the writer's
    `drain()` waits; `peak_buffered` records the most it held.
    """
    wire_a, wire_b = _Wire(), _Wire()
    a = LegStream(wire_a, high=high, low=low, name=names[0])
    b = LegStream(wire_b, high=high, low=low, name=names[1])
    wire_a.near, wire_a.far = a, b
    wire_b.near, wire_b.far = b, a
    return a, b
