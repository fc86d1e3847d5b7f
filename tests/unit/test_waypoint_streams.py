"""Byte streams (waypoint/streams.py): the leg adapter and the memory pipes."""

from __future__ import annotations

import asyncio

import pytest

from waypoint import WaypointError
from waypoint.streams import LegStream, StreamReset, memory_pipe


class FakeLeg:
    """A push-style leg that records what the stream asked of it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.calls: list[str] = []

    def send(self, data: bytes | memoryview) -> None:
        self.sent.append(bytes(data))

    def send_eof(self) -> None:
        self.calls.append("send_eof")

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


async def test_leg_stream_copies_what_the_leg_delivers() -> None:
    leg = FakeLeg()
    s = LegStream(leg)
    shared = bytearray(b"abc")
    s.on_data(leg, memoryview(shared))
    shared[:] = b"xyz"  # the leg reuses its buffer once on_data returns
    assert await s.read(10) == b"abc"


async def test_leg_stream_pauses_the_leg_above_high_and_resumes_below_low() -> None:
    leg = FakeLeg()
    s = LegStream(leg, high=100, low=40)
    s.on_data(leg, b"x" * 60)
    assert leg.calls == []
    s.on_data(leg, b"x" * 60)
    assert leg.calls == ["pause_reading"]
    s.on_data(leg, b"x" * 10)  # a leg may deliver a little more after the pause
    assert leg.calls == ["pause_reading"]
    await s.read(50)
    assert leg.calls == ["pause_reading"]  # 80 left, above the low mark
    await s.read(50)
    assert leg.calls == ["pause_reading", "resume_reading"]
    assert s.peak_buffered == 130


async def test_leg_stream_read_waits_and_is_cancel_safe() -> None:
    leg = FakeLeg()
    s = LegStream(leg)
    reader = asyncio.ensure_future(s.read(10))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    s.on_data(leg, b"kept")
    assert await s.read(10) == b"kept"


async def test_leg_stream_eof_and_half_close() -> None:
    leg = FakeLeg()
    s = LegStream(leg)
    s.on_data(leg, b"last")
    s.on_eof(leg)
    assert await s.read(10) == b"last"
    assert await s.read(10) == b""
    assert s.at_eof
    s.write(b"still writing")  # half-closed: our direction is open
    s.write_eof()
    assert leg.sent == [b"still writing"]
    assert leg.calls == ["send_eof"]
    with pytest.raises(WaypointError, match="after write_eof"):
        s.write(b"more")


async def test_leg_stream_lost_with_an_error_raises_after_the_data() -> None:
    leg = FakeLeg()
    s = LegStream(leg)
    s.on_data(leg, b"before")
    s.on_lost(leg, "connection reset by peer")
    assert await s.read(10) == b"before"
    with pytest.raises(StreamReset, match="connection reset by peer"):
        await s.read(10)
    with pytest.raises(StreamReset):
        await s.drain()
    s.write(b"dropped")  # never raises
    assert leg.sent == []
    assert s.gone


async def test_leg_stream_drain_follows_the_leg() -> None:
    leg = FakeLeg()
    s = LegStream(leg)
    s.on_write_paused(leg)
    drained = asyncio.ensure_future(s.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    s.on_write_resumed(leg)
    await asyncio.wait_for(drained, 1)
    s.on_write_paused(leg)
    waiting = asyncio.ensure_future(s.drain())
    await asyncio.sleep(0)
    s.on_lost(leg, None)
    with pytest.raises(StreamReset):
        await asyncio.wait_for(waiting, 1)


async def test_leg_stream_close_and_abort_reach_the_leg_once() -> None:
    leg = FakeLeg()
    s = LegStream(leg)
    s.close()
    s.close()
    s.abort()
    assert leg.calls == ["close"]
    assert await s.read(10) == b""
    leg2 = FakeLeg()
    t = LegStream(leg2)
    t.abort()
    assert leg2.calls == ["abort"]
    with pytest.raises(StreamReset):
        await t.read(10)


def test_leg_stream_refuses_bad_marks() -> None:
    with pytest.raises(WaypointError, match="low"):
        LegStream(FakeLeg(), high=10, low=20)


async def test_memory_pipe_carries_bytes_both_ways_and_eof() -> None:
    a, b = memory_pipe()
    a.write(b"hello")
    assert await b.read(100) == b"hello"
    b.write(b"back")
    b.write_eof()
    assert await a.read(2) == b"ba"
    assert await a.read(100) == b"ck"
    assert await a.read(100) == b""


async def test_memory_pipe_back_pressure_bounds_the_buffer() -> None:
    a, b = memory_pipe(high=1000, low=100)
    a.write(b"x" * 600)
    await asyncio.wait_for(a.drain(), 1)  # under the high-water mark: no wait
    a.write(b"x" * 600)
    drained = asyncio.ensure_future(a.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    assert len(await b.read(700)) == 700
    await asyncio.sleep(0)
    assert not drained.done()  # 500 left, above the low-water mark
    await b.read(450)
    await asyncio.wait_for(drained, 1)
    assert b.peak_buffered == 1200


async def test_memory_pipe_abort_and_close() -> None:
    a, b = memory_pipe()
    a.write(b"last words")
    a.abort()
    assert await b.read(100) == b"last words"  # what arrived before the reset is delivered
    with pytest.raises(StreamReset):
        await b.read(100)
    with pytest.raises(StreamReset):
        await b.drain()
    c, d = memory_pipe()
    c.write(b"bye")
    c.close()
    assert await d.read(100) == b"bye"
    assert await d.read(100) == b""
    d.write(b"dropped")  # never raises
    with pytest.raises(StreamReset):
        await d.drain()
