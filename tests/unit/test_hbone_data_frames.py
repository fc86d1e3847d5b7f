"""Received DATA frames: the direct path (past h2's frame buffer) behaves exactly like h2's own.

Each case feeds the same bytes to a server using the direct path and to one
that hands every frame to h2.receive_data, and compares events and output.
When one fails after an h2 or hyperframe upgrade, the direct path in
ztunnel/hbone/h2compat.py no longer matches that release: narrow CHECKED_H2 /
CHECKED_HYPERFRAME there (the public path then takes over) until it is fixed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

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
    h2compat,
)

REQ = [(":method", "CONNECT"), (":authority", "10.1.0.5:80")]
Session = tuple[list[HboneEvent], bytes]


def data(sid: int, payload: bytes, end: bool = False, flags: int = 0) -> bytes:
    return raw_frame(0x0, flags | (0x1 if end else 0), sid, payload)


def padded(sid: int, payload: bytes, pad: int) -> bytes:
    return raw_frame(0x0, 0x8, sid, bytes([pad]) + payload + b"\x00" * pad)


def run(wire: list[bytes], respond: tuple[int, ...] = (1,)) -> Session:
    """One raw client session: each item of `wire` is one receive_data call."""
    client = RawClient(HboneServer(HboneConfig(), 0.0))
    events: list[HboneEvent] = []
    for sid in respond:
        events += client.send(client.headers(sid, REQ))
        client.server.respond(sid, 200)
    for chunk in wire:
        events += client.send(chunk)
    return events, client.server.data_to_send()


def compare(monkeypatch: pytest.MonkeyPatch, session: Callable[[], Session]) -> Session:
    """Run `session` on the direct path, then on h2's public path; both must give the same.

    The direct path is forced on, also outside the h2 versions it is gated on: these
    tests are how a new h2 is checked before the gate is widened.
    """
    monkeypatch.setattr(h2compat, "DIRECT_DATA_OFF", None)
    taken: list[int] = []
    for name in ("receive_data_frame", "receive_data_fast"):  # items 1 and 5
        direct_frame = getattr(h2compat.HboneH2Connection, name)

        def counted(self: h2compat.HboneH2Connection, *args: Any, _direct: Any = direct_frame) -> Any:
            taken.append(args[0])
            return _direct(self, *args)

        monkeypatch.setattr(h2compat.HboneH2Connection, name, counted)
    direct = session()
    assert taken, "no frame took the direct path: the comparison would prove nothing"
    monkeypatch.setattr(h2compat, "DIRECT_DATA_OFF", "test: h2's public path")
    monkeypatch.setattr(h2compat, "_logged_off", True)
    before = len(taken)
    through_h2 = session()
    assert len(taken) == before, "the public run took the direct path"
    assert same_outcome(direct, through_h2)
    return direct


def same_outcome(direct: Session, through_h2: Session) -> bool:
    """Equal, except that a connection error in the middle of a read may keep more events.

    h2.receive_data raises on the frame that breaks the connection and drops the
    events of the frames before it in the same call; the direct path has handed
    those frames to h2 one at a time, so their events are kept. Both then end
    the connection with the same GOAWAY.
    """
    direct, through_h2 = merged(direct), merged(through_h2)
    if direct == through_h2:
        return True
    (d_events, d_out), (h_events, h_out) = direct, through_h2
    if d_out != h_out or not h_events or not isinstance(h_events[-1], ConnectionTerminated):
        return False
    if d_events[-1] != h_events[-1]:
        return False
    rest = iter(d_events)
    return all(any(kept(e, d) for d in rest) for e in h_events)  # a subsequence


def kept(through_h2: HboneEvent, direct: HboneEvent) -> bool:
    """The same event; or, for data, the direct path's may go on (it hands a frame over as its
    bytes arrive, so it has passed on more of a frame that the failing read ended)."""
    if isinstance(through_h2, StreamData) and isinstance(direct, StreamData):
        return through_h2.stream_id == direct.stream_id and bytes(direct.data).startswith(through_h2.data)
    return through_h2 == direct


def merged(session: Session) -> Session:
    """Runs of StreamData of one stream as one event: a DATA frame that takes the fast path
    is handed over as its bytes arrive (in pieces when it spans reads), h2 hands it over
    whole; the bytes, their order and everything around them must still be the same."""
    events, out = session
    joined: list[HboneEvent] = []
    for ev in events:
        last = joined[-1] if joined else None
        if isinstance(ev, StreamData) and isinstance(last, StreamData) and last.stream_id == ev.stream_id:
            joined[-1] = StreamData(ev.stream_id, bytes(last.data) + bytes(ev.data))
        else:
            joined.append(ev)
    return joined, out


def both_paths(monkeypatch: pytest.MonkeyPatch, wire: list[bytes],
               respond: tuple[int, ...] = (1,)) -> Session:
    return compare(monkeypatch, lambda: run(wire, respond))


def test_plain_padded_and_final_data_in_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = data(1, b"a" * 1000) + padded(1, b"bb", 7) + data(1, b"c" * 70_000) + data(1, b"d", end=True)
    events, _ = both_paths(monkeypatch, [wire])
    got = [e for e in events if isinstance(e, StreamData | StreamEnded)]
    assert got == [StreamData(1, b"a" * 1000), StreamData(1, b"bb"), StreamData(1, b"c" * 70_000),
                   StreamData(1, b"d"), StreamEnded(1)]


def test_data_split_across_reads_and_interleaved_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = data(1, b"x" * 5000) + data(3, b"y" * 3000) + data(1, b"z", end=True)
    events, _ = merged(both_paths(monkeypatch, [wire[:10], wire[10:4000], wire[4000:], b""], respond=(1, 3)))
    assert [e for e in events if isinstance(e, StreamData | StreamEnded)] == [
        StreamData(1, b"x" * 5000), StreamData(3, b"y" * 3000), StreamData(1, b"z"), StreamEnded(1)]


def test_undefined_flags_and_empty_final_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0x20 (PRIORITY on HEADERS) and 0x4 mean nothing on DATA: both paths ignore them.
    wire = data(1, b"abc", flags=0x20) + data(1, b"de", flags=0x4) + data(1, b"", end=True)
    events, _ = both_paths(monkeypatch, [wire])
    assert [e for e in events if isinstance(e, StreamData | StreamEnded)] == [
        StreamData(1, b"abc"), StreamData(1, b"de"), StreamEnded(1)]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        ([data(5, b"never opened")], ErrorCodes.PROTOCOL_ERROR),
        ([data(2, b"a server's stream, never opened")], ErrorCodes.PROTOCOL_ERROR),
        ([data(1, b"x" * 16_384)] * 260, ErrorCodes.FLOW_CONTROL_ERROR),  # 4 MiB stream window
        ([data(1, b"end", end=True), data(1, b"after the end")], ErrorCodes.STREAM_CLOSED),
        ([raw_frame(0x3, 0, 1, (8).to_bytes(4, "big")), data(1, b"after our reset")],
         ErrorCodes.STREAM_CLOSED),
    ],
    ids=["idle-stream", "even-stream", "over-the-window", "after-end-stream", "after-peer-reset"],
)
def test_data_errors_match_h2(monkeypatch: pytest.MonkeyPatch, wire: list[bytes], code: int) -> None:
    events, out = both_paths(monkeypatch, wire)
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    resets = [f.error_code for f in parse_frames(out) if isinstance(f, RstStreamFrame)]
    assert [t.error_code for t in terminated] == [code] or resets == [code], (events, resets)


@pytest.mark.parametrize("seed", range(24))
def test_random_data_sequences_match_h2(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Plain, padded, flagged, empty and final DATA on two streams, cut at random read boundaries;
    every fourth sequence also has a frame for a stream never opened (a connection error)."""
    rng = random.Random(seed)
    frames = []
    streams = [1, 3]
    for _ in range(rng.randint(5, 40)):
        sid = rng.choice(streams)
        payload = rng.randbytes(rng.choice((0, 1, 31, 1000, 16_384, rng.randint(0, 16_384))))
        kind = rng.random()
        if kind < 0.15:
            frames.append(padded(sid, payload, rng.randint(0, 20)))
        else:
            end = kind > 0.95
            frames.append(data(sid, payload, end=end, flags=rng.choice((0, 0, 0x20))))
            if end:
                streams.remove(sid)
                if not streams:
                    break
    if seed % 4 == 0:
        frames.insert(rng.randint(0, len(frames)), data(5, b"never opened"))
    wire = b"".join(frames)
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randint(0, 8))))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    both_paths(monkeypatch, chunks, respond=(1, 3))


def test_data_on_a_stream_we_reset_keeps_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def session() -> Session:
        client = RawClient(HboneServer(HboneConfig(), 0.0))
        client.send(client.headers(1, REQ))
        client.server.respond(1, 200)
        client.server.reset_stream(1)
        events = client.send(data(1, b"late" * 100))
        client.send(client.headers(3, REQ))
        client.server.respond(3, 200)
        events += client.send(data(3, b"fresh"))
        return events, client.server.data_to_send()

    direct = compare(monkeypatch, session)
    assert direct[0] == [StreamData(3, b"fresh")]


def test_frame_over_the_acknowledged_size_is_refused_like_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our SETTINGS (1 MiB frames) are not acknowledged yet: h2 still allows 16 KiB.
    def session() -> Session:
        server = HboneServer(HboneConfig(), 0.0)
        server.initiate()
        events = server.receive_data(PREFACE + SettingsFrame(0).serialize(), 0.0)
        events += server.receive_data(raw_frame(0x1, 0x4, 1, Encoder().encode(REQ)), 0.0)
        server.respond(1, 200)
        events += server.receive_data(data(1, b"x" * 100), 0.0)  # within 16 KiB: direct
        events += server.receive_data(data(1, b"x" * 20_000), 0.0)
        events += server.receive_data(ack_settings(), 0.0)
        return events, server.data_to_send()

    direct = compare(monkeypatch, session)
    assert [e.error_code for e in direct[0] if isinstance(e, ConnectionTerminated)] == [
        ErrorCodes.FRAME_SIZE_ERROR]
