"""Abusive and broken peers: each flood ends in GOAWAY with the right code, nothing raises."""

from __future__ import annotations

import random

import pytest
from h2.errors import ErrorCodes

from tests.unit.test_hbone_peers import PREFACE, Pair, RawClient, goaway_codes, raw_frame
from ztunnel.hbone import (
    ConnectionTerminated,
    ConnectRequest,
    HboneConfig,
    HboneEvent,
    HboneServer,
    TunnelResponse,
)

REQ = [(":method", "CONNECT"), (":authority", "10.1.0.5:80")]
CALM = ErrorCodes.ENHANCE_YOUR_CALM


def rst(sid: int, code: int = ErrorCodes.CANCEL) -> bytes:
    return raw_frame(0x3, 0, sid, code.to_bytes(4, "big"))


def ping(n: int) -> bytes:
    return raw_frame(0x6, 0, 0, n.to_bytes(8, "big"))


def window_update(sid: int, increment: int) -> bytes:
    return raw_frame(0x8, 0, sid, increment.to_bytes(4, "big"))


def data(sid: int, payload: bytes, end: bool = False) -> bytes:
    return raw_frame(0x0, 0x1 if end else 0, sid, payload)


def raw(**limits: float) -> RawClient:
    return RawClient(HboneServer(HboneConfig(**limits), 0.0))  # type: ignore[arg-type]


def open_raw_tunnel(client: RawClient, sid: int = 1) -> None:
    assert [type(e) for e in client.send(client.headers(sid, REQ))] == [ConnectRequest]
    client.server.respond(sid, 200)
    client.server.data_to_send()


def assert_goaway(client: RawClient, events: list[HboneEvent], code: int, words: str) -> None:
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(terminated) == 1, events
    assert terminated[0].error_code == code
    assert words in terminated[0].reason
    assert goaway_codes(client.server.data_to_send()) == [code]
    assert client.server.is_closed
    # The dead connection ignores whatever else arrives, and a fresh one works.
    assert client.send(ping(1) + b"\x00garbage") == []
    fresh = Pair()
    sid = fresh.client.open_stream("10.1.0.5:80")
    fresh.pump()
    fresh.server.respond(sid, 200)
    assert TunnelResponse(sid, 200) in fresh.pump()[0]


def test_rapid_reset_is_counted_per_window() -> None:
    client = raw(max_resets_per_window=20, flood_window=10)
    wire = b"".join(client.headers(2 * i + 1, REQ) + rst(2 * i + 1) for i in range(20))
    events = client.send(wire)
    assert not any(isinstance(e, ConnectionTerminated) for e in events)
    client.now = 10.0  # a new window: another 20 are fine
    wire = b"".join(client.headers(2 * i + 41, REQ) + rst(2 * i + 41) for i in range(20))
    assert not any(isinstance(e, ConnectionTerminated) for e in client.send(wire))
    events = client.send(client.headers(81, REQ) + rst(81))
    assert_goaway(client, events, CALM, "RST_STREAM frames (rapid reset)")


def test_rapid_reset_default_limit() -> None:
    client = raw()
    wire = b"".join(client.headers(2 * i + 1, REQ) + rst(2 * i + 1) for i in range(501))
    assert_goaway(client, client.send(wire), CALM, "more than 500 RST_STREAM")


def test_settings_flood() -> None:
    client = raw()
    events = client.send(raw_frame(0x4, 0, 0, b"") * 101)
    assert_goaway(client, events, CALM, "SETTINGS frames")


def test_ping_flood() -> None:
    client = raw()
    events = client.send(b"".join(ping(i) for i in range(101)))
    assert_goaway(client, events, CALM, "PING frames")


def test_unread_ping_acks_are_bounded() -> None:
    client = raw(max_pings_per_window=10**6, max_pending_control_frames=50)
    for _ in range(3):  # the acks are taken each time: fine
        assert client.send(b"".join(ping(i) for i in range(40))) == []
        client.server.data_to_send()
    events = client.send(b"".join(ping(i) for i in range(51)))
    assert_goaway(client, events, CALM, "without reading them")


def test_window_update_flood() -> None:
    client = raw()
    events = client.send(window_update(0, 1024) * 1001)
    assert_goaway(client, events, CALM, "WINDOW_UPDATE frames")


def test_window_updates_earned_by_data_we_sent() -> None:
    client = raw(max_window_updates_per_window=10, window_updates_per_data_frame=10)
    open_raw_tunnel(client)
    assert client.server.send_data(1, b"x" * 100) == 100  # one DATA frame: 10 more updates
    events = client.send(window_update(1, 4096) * 20)
    assert events == []
    events = client.send(window_update(1, 4096))
    assert_goaway(client, events, CALM, "more than 20 WINDOW_UPDATE")


def test_tiny_window_update_dribble() -> None:
    client = raw()
    events = client.send(window_update(0, 1) * 101)
    assert_goaway(client, events, CALM, "increments below 1 KiB")


def test_tiny_data_frames() -> None:
    client = raw(max_small_frames_per_window=200)
    open_raw_tunnel(client)
    events = client.send(data(1, b"a") * 200)
    assert len(events) == 200
    events = client.send(data(1, b"a"))
    assert_goaway(client, events, CALM, "DATA/CONTINUATION frames under 32 bytes")


def test_empty_frames() -> None:
    client = raw()
    open_raw_tunnel(client)
    events = client.send(data(1, b"") * 11)
    assert_goaway(client, events, CALM, "empty DATA/HEADERS/CONTINUATION")


def test_continuation_flood() -> None:
    client = raw()
    block = client.encoder.encode(REQ)
    wire = raw_frame(0x1, 0, 1, block[:1])  # HEADERS without END_HEADERS
    wire += b"".join(raw_frame(0x9, 0, 1, b"\x00" * 40) for _ in range(17))
    assert_goaway(client, client.send(wire), CALM, "CONTINUATION frames")


def test_oversized_header_list_closes_the_connection_not_the_process() -> None:
    client = raw()
    events = client.send(client.headers(1, [*REQ, ("baggage", "b" * 70_000)]))
    assert_goaway(client, events, CALM, "Oversized header block")


def test_huge_header_block_is_cut_before_decoding() -> None:
    client = raw()
    wire = raw_frame(0x1, 0, 1, b"\x00" * 200_000)
    wire += raw_frame(0x9, 0, 1, b"\x00" * 200_000)
    assert_goaway(client, client.send(wire), CALM, "exceeds 262144 bytes")


def test_frame_larger_than_max_frame_size_is_refused_at_the_header() -> None:
    client = raw()
    # Only the 9-byte header has arrived: no need to buffer 2 MiB to refuse it.
    events = client.send((2 * 1024 * 1024).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")
    assert_goaway(client, events, ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS_MAX_FRAME_SIZE")


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (data(0, b"on stream zero"), ErrorCodes.PROTOCOL_ERROR),
        (window_update(0, 2**31 - 1) * 2, ErrorCodes.FLOW_CONTROL_ERROR),
        (raw_frame(0x6, 0, 0, b"short"), ErrorCodes.FRAME_SIZE_ERROR),
        (raw_frame(0x5, 0x4, 1, b"\x00\x00\x00\x02"), ErrorCodes.PROTOCOL_ERROR),
        (raw_frame(0x1, 0, 1, b"\x82") + raw_frame(0x0, 0, 1, b"x"), ErrorCodes.PROTOCOL_ERROR),
        (raw_frame(0x1, 0x4, 2, b"\x82"), ErrorCodes.PROTOCOL_ERROR),
        (raw_frame(0x1, 0x4, 1, b"\xff\xff\xff\xff"), ErrorCodes.PROTOCOL_ERROR),  # h2 choice
    ],
    ids=["data-on-0", "window-overflow", "short-ping", "push-from-client", "interleaved-block",
         "even-stream", "bad-hpack"],
)
def test_protocol_violations_end_the_connection(wire: bytes, code: int) -> None:
    client = raw()
    events = client.send(wire)
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(terminated) == 1 and terminated[0].error_code == code, events
    assert goaway_codes(client.server.data_to_send()) == [code]


def test_bad_preface() -> None:
    server = HboneServer(HboneConfig(), 0.0)
    server.initiate()
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert len(events) == 1 and isinstance(events[0], ConnectionTerminated)
    assert events[0].error_code == ErrorCodes.PROTOCOL_ERROR


def test_random_input_never_raises() -> None:
    rng = random.Random(1234)
    good = RawClient(HboneServer(HboneConfig(), 0.0))
    sample = good.headers(1, REQ) + data(1, b"hello") + ping(3) + window_update(1, 5000) + rst(1)
    for _ in range(300):
        server = HboneServer(HboneConfig(), 0.0)
        server.initiate()
        wire = bytearray(PREFACE + raw_frame(0x4, 0, 0, b"") + sample)
        for _ in range(rng.randint(1, 6)):
            wire[rng.randrange(len(PREFACE), len(wire))] = rng.randrange(256)
        if rng.random() < 0.3:
            wire += rng.randbytes(rng.randint(1, 64))
        cut = rng.randrange(1, len(wire))
        server.receive_data(bytes(wire[:cut]), 0.0)
        server.receive_data(bytes(wire[cut:]), 1.0)
        server.data_to_send()
        server.handle_timeout(100.0)
