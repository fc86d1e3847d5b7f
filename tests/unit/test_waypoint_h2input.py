"""The HTTP/2 input filter (waypoint/h2input.py): frames split, GOAWAY kept from h2, floods."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from waypoint.h2input import Flood, FrameSplitter, GracefulGoaway
from waypoint.sniff import PREFACE


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


SETTINGS = frame(0x4, 0, 0, b"")
PING = frame(0x6, 0, 0, b"12345678")


def goaway(last: int, code: int) -> bytes:
    return frame(0x7, 0, 0, last.to_bytes(4, "big") + code.to_bytes(4, "big"))


def joined(out: list[bytes | GracefulGoaway]) -> bytes:
    return b"".join(o for o in out if isinstance(o, bytes))


def test_bytes_pass_through_in_whole_frames_whatever_the_chunking() -> None:
    data = PREFACE + SETTINGS + PING + frame(0x0, 0x1, 1, b"body")
    for cut in range(1, len(data)):
        s = FrameSplitter(server=True)
        out = s.feed(data[:cut], 0.0) + s.feed(data[cut:], 0.0)
        assert joined(out) == data, cut
        assert all(isinstance(o, bytes) for o in out)


def test_a_partial_frame_waits_for_the_rest() -> None:
    s = FrameSplitter(server=False)
    data = PING + frame(0x0, 0, 1, b"x" * 100)
    assert joined(s.feed(data[:20], 0.0)) == PING
    assert s.feed(data[20:50], 0.0) == []
    assert joined(s.feed(data[50:], 0.0)) == data[len(PING):]


def test_a_graceful_goaway_is_taken_out() -> None:
    s = FrameSplitter(server=False)
    out = s.feed(SETTINGS + goaway(7, 0) + PING, 0.0)
    assert out == [SETTINGS, GracefulGoaway(7), PING]


def test_an_error_goaway_goes_to_h2() -> None:
    s = FrameSplitter(server=False)
    data = goaway(7, ErrorCodes.PROTOCOL_ERROR)
    assert s.feed(data, 0.0) == [data]


def test_a_goaway_inside_a_header_block_is_left_for_h2_to_refuse() -> None:
    s = FrameSplitter(server=False)
    data = frame(0x1, 0x0, 1, b"\x82") + goaway(0, 0)
    assert s.feed(data, 0.0) == [data]


def test_a_frame_over_the_size_limit_ends_the_connection_before_it_is_buffered() -> None:
    s = FrameSplitter(server=False)
    with pytest.raises(Flood) as err:
        s.feed((1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01", 0.0)
    assert err.value.code == ErrorCodes.FRAME_SIZE_ERROR


def test_a_continuation_flood_ends_the_connection() -> None:
    s = FrameSplitter(server=False, max_continuation_frames=4)
    data = frame(0x1, 0x0, 1, b"\x82") + frame(0x9, 0x0, 1, b"a" * 40) * 5
    with pytest.raises(Flood) as err:
        s.feed(data, 0.0)
    assert err.value.code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "CONTINUATION" in err.value.reason


def test_a_header_block_over_its_cap_ends_the_connection() -> None:
    s = FrameSplitter(server=False, max_header_list_size=1024)
    with pytest.raises(Flood, match="exceeds 4096 bytes"):
        s.feed(frame(0x1, 0x0, 1, b"a" * 3000) + frame(0x9, 0x0, 1, b"b" * 3000), 0.0)


def test_rapid_resets_are_counted_per_window() -> None:
    s = FrameSplitter(server=True, max_resets=3)
    s.feed(PREFACE, 0.0)
    rst = frame(0x3, 0, 1, b"\x00\x00\x00\x08")
    for _ in range(3):
        s.feed(rst, 0.0)
    with pytest.raises(Flood, match="RST_STREAM"):
        s.feed(rst, 1.0)
    t = FrameSplitter(server=True, max_resets=3)
    t.feed(PREFACE, 0.0)
    for second in range(10):
        t.feed(rst, second * 10.0)  # one per window: never a flood
