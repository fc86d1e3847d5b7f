"""What keeps the data path's memory small and returned: the shared receive buffer, splices that
free themselves, the heap trim after closes, and HBONE's bounded memory of closed streams."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from collections.abc import Iterator

import pytest

from tests.unit.test_hbone_peers import Pair
from ztunnel.conntrack import ByteCounters
from ztunnel.copy import HeapTrimmer, Splice, TcpLeg
from ztunnel.hbone import ConnectRequest, TunnelResponse
from ztunnel.hbone.connection import CLOSED_STREAMS_KEPT


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only refcounting frees objects here (what the cyclic GC would find is a leak until it runs)."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


class FakeLeg:
    def __init__(self) -> None:
        self.splice: Splice | None = None
        self.sent: list[bytes] = []
        self.closed = False

    def attach(self, splice: Splice) -> None:
        self.splice = splice

    def send(self, data: bytes | memoryview) -> None:
        self.sent.append(bytes(data))

    def send_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


async def test_tcp_legs_share_one_receive_buffer_and_copy_what_they_keep() -> None:
    a, b = TcpLeg(), TcpLeg()
    buf = a.get_buffer(-1)
    assert b.get_buffer(-1).obj is buf.obj  # one buffer, however many connections
    buf[:5] = b"hello"
    a.buffer_updated(5)  # no splice yet: kept, as a copy
    buf[:5] = b"xxxxx"  # the next read of any leg lands in the same buffer
    assert bytes(a.early) == b"hello"


@pytest.mark.parametrize("end", ["eof", "lost", "abort"])
async def test_a_finished_splice_is_freed_without_the_gc(no_gc: None, end: str) -> None:
    down, up = FakeLeg(), FakeLeg()
    sp = Splice(down, up, ByteCounters())
    sp.start()
    sp.on_data(down, memoryview(b"request"))
    if end == "eof":
        sp.on_eof(down)
        sp.on_eof(up)
    elif end == "lost":
        sp.on_lost(up, "reset")
    else:
        sp.abort("shutdown")
    assert sp.done and up.sent == [b"request"] and down.closed and (up.closed or end == "lost")
    assert down.splice is None and up.splice is None
    ref = weakref.ref(sp)
    del sp
    assert ref() is None


async def test_heap_trimmer_trims_once_per_burst_of_closes() -> None:
    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    t = HeapTrimmer(min_closed=3, delay=0.0, trim=trim)
    # the third close asks for a run; closes while it is pending only count
    assert [t.closed() for _ in range(5)] == [False, False, True, False, False]
    await t.run()
    assert trims == [1] and t.trims == 1 and not t.pending and t.closed_since == 0
    assert [t.closed() for _ in range(3)] == [False, False, True]  # a new burst counts from zero


def test_hbone_remembers_a_bounded_number_of_closed_streams() -> None:
    """h2 keeps how each closed stream ended; by default for 65,536 streams per connection."""
    pair = Pair()

    def churn(n: int) -> None:
        for _ in range(n):
            sid = pair.client.open_stream("10.1.0.5:8080")
            _, s_events = pair.pump()
            assert [e for e in s_events if isinstance(e, ConnectRequest)]
            pair.server.respond(sid, 503)  # the stream ends with the answer
            c_events, _ = pair.pump()
            assert TunnelResponse(sid, 503) in c_events

    tracemalloc.start()
    try:
        churn(CLOSED_STREAMS_KEPT + 100)  # the history is full
        base = tracemalloc.get_traced_memory()[0]
        churn(2000)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # ~100 KB now (the history's dict tables, as they churn); h2's default history grows by
    # ~250 bytes per stream here, 500 KB and on
    assert grown < 250_000, grown
