"""Received DATA frames: the direct path (past h2's frame buffer) behaves exactly like h2's own.

Each case feeds the same bytes to a server using the direct path and to one
that hands every frame to h2.receive_data, and compares events and output.
"""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import RstStreamFrame, SettingsFrame

from tests.unit.test_hbone_peers import PREFACE, RawClient, ack_settings, parse_frames, raw_frame
from ztunnel.hbone import (
    ConnectionTerminated,
    HboneConfig,
    HboneEvent,
    HboneServer,
    StreamData,
    StreamEnded,
)
from ztunnel.hbone import connection as hbone_connection

REQ = [(":method", "CONNECT"), (":authority", "10.1.0.5:80")]


def data(sid: int, payload: bytes, end: bool = False) -> bytes:
    return raw_frame(0x0, 0x1 if end else 0, sid, payload)


def padded(sid: int, payload: bytes, pad: int) -> bytes:
    return raw_frame(0x0, 0x8, sid, bytes([pad]) + payload + b"\x00" * pad)


def run(wire: list[bytes], respond: tuple[int, ...] = (1,)) -> tuple[list[HboneEvent], bytes]:
    """One raw client session: each item of `wire` is one receive_data call."""
    client = RawClient(HboneServer(HboneConfig(), 0.0))
    events: list[HboneEvent] = []
    for sid in respond:
        events += client.send(client.headers(sid, REQ))
        client.server.respond(sid, 200)
    for chunk in wire:
        events += client.send(chunk)
    return events, client.server.data_to_send()


def both_paths(monkeypatch: pytest.MonkeyPatch, wire: list[bytes],
               respond: tuple[int, ...] = (1,)) -> tuple[list[HboneEvent], bytes]:
    assert hbone_connection._DIRECT_DATA, "this h2 has no per-frame handler: the direct path is off"
    direct = run(wire, respond)
    monkeypatch.setattr(hbone_connection, "_DIRECT_DATA", False)
    through_h2 = run(wire, respond)
    assert direct == through_h2
    return direct


def test_plain_padded_and_final_data_in_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = data(1, b"a" * 1000) + padded(1, b"bb", 7) + data(1, b"c" * 70_000) + data(1, b"d", end=True)
    events, _ = both_paths(monkeypatch, [wire])
    got = [e for e in events if isinstance(e, StreamData | StreamEnded)]
    assert got == [StreamData(1, b"a" * 1000), StreamData(1, b"bb"), StreamData(1, b"c" * 70_000),
                   StreamData(1, b"d"), StreamEnded(1)]


def test_data_split_across_reads_and_interleaved_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = data(1, b"x" * 5000) + data(3, b"y" * 3000) + data(1, b"z", end=True)
    events, _ = both_paths(monkeypatch, [wire[:10], wire[10:4000], wire[4000:], b""], respond=(1, 3))
    assert [e for e in events if isinstance(e, StreamData | StreamEnded)] == [
        StreamData(1, b"x" * 5000), StreamData(3, b"y" * 3000), StreamData(1, b"z"), StreamEnded(1)]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        ([data(5, b"never opened")], ErrorCodes.PROTOCOL_ERROR),
        ([data(1, b"x" * 16_384)] * 260, ErrorCodes.FLOW_CONTROL_ERROR),  # 4 MiB stream window
        ([data(1, b"end", end=True), data(1, b"after the end")], ErrorCodes.STREAM_CLOSED),
    ],
    ids=["idle-stream", "over-the-window", "after-end-stream"],
)
def test_data_errors_match_h2(monkeypatch: pytest.MonkeyPatch, wire: list[bytes], code: int) -> None:
    events, out = both_paths(monkeypatch, wire)
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    resets = [f.error_code for f in parse_frames(out) if isinstance(f, RstStreamFrame)]
    assert [t.error_code for t in terminated] == [code] or resets == [code], (events, resets)


def test_data_on_a_stream_we_reset_keeps_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def session() -> tuple[list[HboneEvent], bytes]:
        client = RawClient(HboneServer(HboneConfig(), 0.0))
        client.send(client.headers(1, REQ))
        client.server.respond(1, 200)
        client.server.reset_stream(1)
        events = client.send(data(1, b"late" * 100))
        client.send(client.headers(3, REQ))
        client.server.respond(3, 200)
        events += client.send(data(3, b"fresh"))
        return events, client.server.data_to_send()

    direct = session()
    monkeypatch.setattr(hbone_connection, "_DIRECT_DATA", False)
    assert direct == session()
    assert direct[0] == [StreamData(3, b"fresh")]


def test_frame_over_the_acknowledged_size_is_refused_like_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our SETTINGS (1 MiB frames) are not acknowledged yet: h2 still allows 16 KiB.
    def session() -> tuple[list[HboneEvent], bytes]:
        server = HboneServer(HboneConfig(), 0.0)
        server.initiate()
        events = server.receive_data(PREFACE + SettingsFrame(0).serialize(), 0.0)
        events += server.receive_data(raw_frame(0x1, 0x4, 1, Encoder().encode(REQ)), 0.0)
        server.respond(1, 200)
        events += server.receive_data(data(1, b"x" * 20_000), 0.0)
        events += server.receive_data(ack_settings(), 0.0)
        return events, server.data_to_send()

    direct = session()
    monkeypatch.setattr(hbone_connection, "_DIRECT_DATA", False)
    assert direct == session()
    assert [e.error_code for e in direct[0] if isinstance(e, ConnectionTerminated)] == [
        ErrorCodes.FRAME_SIZE_ERROR]
