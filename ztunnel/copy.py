"""The byte pumps: a `Splice` joins two legs (a TCP socket, or an HBONE stream) both ways.

Hot path notes:
- `TcpLeg` is an asyncio `BufferedProtocol`: the loop reads straight into one
  256 KiB buffer (`recv_into`) shared by every leg of the thread, no per-read
  allocation and no per-connection buffer (an idle connection costs no buffer).
- A chunk is handed to the other leg as a memoryview of that buffer, and the
  rule that makes sharing it safe: no leg keeps that view past `send`. An
  HBONE leg frames (copies) it at once; a TCP leg copies it (`bytes(view)`),
  as it must anyway because transports may keep a reference to what they
  could not send at once (uvloop queues memoryviews without copying).
  The other way, an HBONE leg hands over read-only views of the immutable
  bytes TLS decrypted (a DATA frame's payload, or the part of it that has
  arrived): a TCP leg writes those as they are, no copy.
- Back-pressure both ways: when a leg cannot take more (its transport buffer
  is over the high-water mark, or the HBONE stream window is exhausted) the
  other leg stops reading until it drains; an HBONE leg "stops reading" by
  withholding its WINDOW_UPDATEs.
- Half-close: EOF one way becomes shutdown(SHUT_WR) or END_STREAM on the
  other leg; the splice is done when both directions are done, or at once
  when either leg fails (the other one is then reset).
- Byte counts are plain int additions; metrics read them in batches.
- A finished splice and its legs drop their references to each other, so a
  closed connection is freed at once by refcounting, not by a later GC pass.
- Allocator: the ztunnel keeps chunk-sized blocks on the glibc heap
  (`tune_allocator`), instead of an mmap/munmap (and fresh pages to fault in)
  for every copy of every chunk; since freed heap then stays with the
  process, `HeapTrimmer` hands it back (`malloc_trim`) once connections have
  closed, at most once per interval.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol, cast

from ztunnel.conntrack import ByteCounters

log = logging.getLogger("ambit.ztunnel.copy")

BUFFER_SIZE = 256 * 1024
# bytes a leg keeps before its splice exists (a handshake, or data racing the dial)
EARLY_LIMIT = BUFFER_SIZE
# transport write buffer limits: pause the other leg's reads above HIGH
WRITE_HIGH = 512 * 1024
WRITE_LOW = 128 * 1024
# glibc allocator settings (tune_allocator): blocks below MMAP come from the heap;
# up to TRIM bytes freed at the heap's top are kept for the next chunks
HEAP_MMAP_THRESHOLD = 1024 * 1024
HEAP_TRIM_THRESHOLD = 4 * 1024 * 1024
# HeapTrimmer: a trim once this many connections have closed, this many seconds later
# (so a burst of closes is one trim)
TRIM_AFTER_CLOSED = 16
TRIM_DELAY = 2.0
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


class Leg(Protocol):
    """One side of a splice. `send` must not keep `data` (a view of a shared buffer) after it returns."""

    splice: Splice | None

    def attach(self, splice: Splice) -> None: ...
    def send(self, data: bytes | memoryview) -> None: ...
    def send_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt/malloc_trim take glibc's numbers)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


@functools.cache
def tune_allocator() -> bool:
    """Serve the data path's chunk-sized buffers from the heap (glibc only); True when set.

    Each chunk is copied a few times into new bytes objects whichever way it
    goes (h2 frames and joins what we send; slices and copies what we
    receive; TLS joins its records), and those blocks are 16 KiB..1 MiB. glibc
    serves blocks above its mmap threshold (128 KiB at start, adjusted as
    blocks are freed) with mmap and returns them with munmap, so every copy
    landed on fresh pages: page faults and page zeroing were about half of the
    two ztunnels' CPU in a bulk transfer. A fixed 1 MiB threshold keeps them on
    the heap, and a 4 MiB trim threshold keeps up to that much freed heap for
    the next chunks instead of returning it at once. The ztunnel calls it once, at start.
    The price is that freed heap stays with the process: `HeapTrimmer` returns it.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))
    except AttributeError:
        return False


def release_heap() -> bool:
    """Give the free pages of the C heap back to the OS (glibc `malloc_trim`); True when any were.

    Unlike the trim threshold, which only ever shrinks the top of the heap,
    this also releases whole free pages in the middle of it, which is where
    most of what closed connections freed ends up.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        return bool(libc.malloc_trim(0))
    except AttributeError:
        return False


class HeapTrimmer:
    """Returns freed heap to the OS after connections close: one delayed trim per burst of closes.

    `closed()` counts a finished connection and says when the owner should
    start `run()`; `run()` waits `delay` seconds (a burst of closes becomes one
    trim, and there is at most one trim per `delay`), then trims. Nothing runs
    while connections only open, so a bulk transfer keeps its recycled heap.
    """

    def __init__(self, min_closed: int = TRIM_AFTER_CLOSED, delay: float = TRIM_DELAY,
                 trim: Callable[[], bool] = release_heap) -> None:
        self.min_closed = min_closed
        self.delay = delay
        self._trim = trim
        self.closed_since = 0  # connections closed since the last trim
        self.pending = False  # a run() is scheduled or running
        self.trims = 0

    def closed(self) -> bool:
        """A connection closed; True when the caller should start `run()` now."""
        self.closed_since += 1
        if self.pending or self.closed_since < self.min_closed:
            return False
        self.pending = True
        return True

    async def run(self) -> None:
        try:
            await asyncio.sleep(self.delay)
            closed, self.closed_since = self.closed_since, 0
            started = time.perf_counter()
            released = self._trim()
            self.trims += 1
            log.debug("heap trim after %d closed connections: %s in %.1f ms", closed,
                      "released memory" if released else "nothing to release",
                      (time.perf_counter() - started) * 1000)
        finally:
            self.pending = False


class Splice:
    """Joins a downstream leg (the client's side) to an upstream leg, both ways."""

    def __init__(
        self,
        down: Leg,
        up: Leg,
        counters: ByteCounters,
        on_done: Callable[[str | None], None] | None = None,
    ) -> None:
        self.down, self.up = down, up
        self.counters = counters
        self._on_done = on_done
        self._eof_from: set[int] = set()
        self.done = False
        self.error: str | None = None
        self.finished: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        """Attach both legs; each replays what it received before the splice existed."""
        self.down.attach(self)
        if not self.done:
            self.up.attach(self)

    def other(self, leg: Leg) -> Leg:
        return self.up if leg is self.down else self.down

    # -- callbacks from the legs

    def on_data(self, leg: Leg, data: bytes | memoryview) -> None:
        if self.done:
            return
        if leg is self.down:
            self.counters.received += len(data)
            self.up.send(data)
        else:
            self.counters.sent += len(data)
            self.down.send(data)

    def on_eof(self, leg: Leg) -> None:
        if self.done or id(leg) in self._eof_from:
            return
        self._eof_from.add(id(leg))
        self.other(leg).send_eof()
        if len(self._eof_from) == 2:
            self._finish(None)
            self.down.close()
            self.up.close()
            self._detach()

    def on_lost(self, leg: Leg, error: str | None) -> None:
        """A leg is gone. A clean close ends the other side gracefully; an error resets it."""
        if self.done:
            return
        other = self.other(leg)
        if error is None:
            if id(leg) not in self._eof_from:
                self._eof_from.add(id(leg))
                other.send_eof()
            other.close()
        else:
            other.abort()
        self._finish(error)
        self._detach()

    def on_write_paused(self, leg: Leg) -> None:
        self.other(leg).pause_reading()

    def on_write_resumed(self, leg: Leg) -> None:
        self.other(leg).resume_reading()

    def abort(self, error: str) -> None:
        """Tear both legs down (shutdown, or a failure elsewhere)."""
        if self.done:
            return
        self.down.abort()
        self.up.abort()
        self._finish(error)
        self._detach()

    def _finish(self, error: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        if not self.finished.done():
            self.finished.set_result(error)
        if self._on_done is not None:
            self._on_done(error)

    def _detach(self) -> None:
        """Done: the legs forget the splice, so the pair is freed by refcount, not by the GC.

        (A splice and its legs point at each other; left to the cyclic GC, every
        finished connection's objects waited for a full collection.)
        """
        self._on_done = None
        for leg in (self.down, self.up):
            if leg.splice is self:
                leg.splice = None


class _ReceiveBuffer(threading.local):
    """The receive buffer every TcpLeg of a thread (of its event loop) reads into."""

    view: memoryview | None = None


_receive = _ReceiveBuffer()


def receive_buffer() -> memoryview:
    """This thread's shared receive buffer (BUFFER_SIZE bytes), made on first use.

    Shared, because nothing keeps what a leg reads past `buffer_updated`:
    every consumer copies a chunk before returning (h2 frames it, a TCP leg
    copies it, the pre-splice bytes are appended to `early`), so one buffer
    serves every connection. A buffer per connection was 256 KiB of each idle
    connection's memory.
    """
    view = _receive.view
    if view is None:
        view = _receive.view = memoryview(bytearray(BUFFER_SIZE))
    return view


class TcpLeg(asyncio.BufferedProtocol):
    """A TCP socket as a splice leg. Before attach, received bytes and EOF are kept."""

    def __init__(self, on_connected: Callable[[TcpLeg], None] | None = None) -> None:
        self._on_connected = on_connected
        self._view = receive_buffer()
        self.transport: asyncio.Transport | None = None
        self.splice: Splice | None = None
        self.early = bytearray()
        self.early_eof = False
        self.lost: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reading = True
        self._write_paused = False
        # optional hook for a pre-splice handshake (SOCKS5): called after early bytes arrive
        self.on_early: Callable[[TcpLeg], None] | None = None

    # -- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its API
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if not self.connected.done():
            self.connected.set_result(None)
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self.splice is not None:
            self.splice.on_data(self, self._view[:nbytes])
        else:
            self.early += self._view[:nbytes]
            if len(self.early) >= EARLY_LIMIT:
                self.pause_reading()  # nobody to forward to yet: bound what we hold
            if self.on_early is not None:
                self.on_early(self)

    def eof_received(self) -> bool:
        if self.splice is not None:
            self.splice.on_eof(self)
        else:
            self.early_eof = True
            if self.on_early is not None:
                self.on_early(self)
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        err = None if exc is None else (str(exc) or type(exc).__name__)
        if not self.lost.done():
            self.lost.set_result(err)
        if self.splice is not None:
            self.splice.on_lost(self, err)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.splice is not None:
            self.splice.on_write_paused(self)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.splice is not None:
            self.splice.on_write_resumed(self)

    # -- leg

    @property
    def peername(self) -> tuple[str, int]:
        assert self.transport is not None
        p = self.transport.get_extra_info("peername")
        return (str(p[0]), int(p[1]))

    @property
    def sockname(self) -> tuple[str, int]:
        assert self.transport is not None
        p = self.transport.get_extra_info("sockname")
        return (str(p[0]), int(p[1]))

    def attach(self, splice: Splice) -> None:
        self.splice = splice
        self.on_early = None
        if self.early:
            data, self.early = bytes(self.early), bytearray()
            splice.on_data(self, data)
        if self.early_eof:
            splice.on_eof(self)
        if self.lost.done():
            splice.on_lost(self, self.lost.result())
            return
        if self._write_paused:
            splice.on_write_paused(self)
        self.resume_reading()

    def take_early(self, n: int) -> bytes:
        """Consume `n` pre-splice bytes (a handshake parser took them)."""
        data = bytes(self.early[:n])
        del self.early[:n]
        return data

    def send(self, data: bytes | memoryview) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if isinstance(data, memoryview) and not data.readonly:
            data = bytes(data)  # a view of a buffer that is reused: the transport may keep it
        # (a read-only view is of immutable bytes, e.g. a DATA frame's payload: kept as it is)
        t.write(data)

    def send_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def pause_reading(self) -> None:
        if self._reading and self.transport is not None and not self.transport.is_closing():
            self._reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading and self.transport is not None and not self.transport.is_closing():
            self._reading = True
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            # RST, so the client sees the failure instead of a clean end of stream
            self.transport.abort()
