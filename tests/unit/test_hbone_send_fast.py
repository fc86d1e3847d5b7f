"""Sent and received DATA frames past h2's per-frame machinery (h2compat item 5) are h2's own.

Sending: the same sequence of sends through the fast path (`debit_send_fast`) and through h2's
send_data gives the same bytes on the wire and the same windows, and a plain h2
peer reads them as the DATA it was sent. Receiving: `receive_data_fast` debits
the same windows h2 does (the event-by-event comparison with h2's public path
is in test_hbone_data_frames.py). When one fails after an h2 upgrade, narrow
CHECKED_H2 in ztunnel/hbone/h2compat.py until item 5 is adapted.
"""

from __future__ import annotations

import random

import h2.events as h2e
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from ztunnel.hbone import (
    HboneClient,
    HboneConfig,
    HboneServer,
    StreamData,
    TunnelResponse,
    h2compat,
)
from ztunnel.hbone.h2compat import HboneH2Connection, data_frame_header

UPGRADE = "h2compat item 5 no longer matches this h2: narrow CHECKED_H2 and adapt it"


def tunnel(monkeypatch: pytest.MonkeyPatch, fast: bool) -> tuple[HboneClient, HboneServer, int]:
    monkeypatch.setattr(h2compat, "DIRECT_DATA_OFF", None if fast else "test: h2's public path")
    monkeypatch.setattr(h2compat, "_logged_off", True)
    client, server = HboneClient(HboneConfig(), 0.0), HboneServer(HboneConfig(), 0.0)
    client.initiate()
    server.initiate()
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    sid = client.open_stream("10.0.0.1:80")
    server.receive_data(client.data_to_send(), 0.0)
    server.respond(sid, 200)
    events = client.receive_data(server.data_to_send(), 0.0)
    assert TunnelResponse(sid, 200) in events
    return client, server, sid


@pytest.mark.parametrize("seed", range(8))
def test_sends_give_the_same_wire_bytes_as_h2(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Sizes from 0 to past the windows, both directions, then the end of each direction."""
    outputs = []
    taken: list[bool] = []
    original = HboneH2Connection.debit_send_fast

    def counted(self: HboneH2Connection, stream_id: int, n: int) -> bool:
        ok = original(self, stream_id, n)
        taken.append(ok)
        return ok

    monkeypatch.setattr(HboneH2Connection, "debit_send_fast", counted)
    for fast in (True, False):
        rng = random.Random(seed)
        client, server, sid = tunnel(monkeypatch, fast)
        calls: list[object] = []
        wire = b""
        for _ in range(60):
            size = rng.choice((0, 1, 64, 1024, 16_384, 100_000, 1_048_576, 3_000_000))
            side = rng.choice((client, server))
            n = side.send_data(sid, b"\x5a" * size)
            calls.append((side is client, n, side._h2.local_flow_control_window(sid)))
            out = side.data_to_send()
            wire += out
            peer = server if side is client else client
            for ev in peer.receive_data(out, 0.0):
                if isinstance(ev, StreamData) and rng.random() < 0.7:
                    peer.acknowledge_received(sid, len(ev.data))
            back = peer.data_to_send()
            wire += back
            side.receive_data(back, 0.0)
        client.end_stream(sid)
        server.end_stream(sid)
        wire += client.data_to_send() + server.data_to_send()
        outputs.append((calls, wire))
        if fast:
            assert any(taken), "no frame took the fast path: the comparison would prove nothing"
            taken.clear()
    assert not taken, "h2's public run took the fast path"
    assert outputs[0] == outputs[1], UPGRADE


def test_a_plain_h2_peer_reads_the_fast_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2compat, "DIRECT_DATA_OFF", None)
    ours = HboneH2Connection(H2Configuration(client_side=True), closed_streams_kept=4)
    peer = H2Connection(H2Configuration(client_side=False))
    ours.initiate_connection()
    peer.initiate_connection()
    peer.receive_data(ours.data_to_send())
    ours.receive_data(peer.data_to_send())
    ours.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    wire = bytearray()

    def send_fast(data: bytes | memoryview) -> bool:
        """As the HBONE connection sends a fast frame: debit, then h2's bytes so far and the frame."""
        if not ours.debit_send_fast(1, len(data)):
            return False
        wire.extend(ours.data_to_send() + data_frame_header(1, len(data)) + bytes(data))
        return True

    assert send_fast(b"hello"), UPGRADE
    assert send_fast(memoryview(b"x" * 16_384)), UPGRADE
    assert not send_fast(b"y" * 16_385), "over the peer's frame size: h2's own path"
    window = ours.local_flow_control_window(1)
    assert window == 65_535 - 5 - 16_384, UPGRADE
    events = peer.receive_data(bytes(wire) + ours.data_to_send())
    got = [(e.stream_id, e.data) for e in events if isinstance(e, h2e.DataReceived)]
    assert got == [(1, b"hello"), (1, b"x" * 16_384)]
    ours.end_stream(1)
    assert not send_fast(b"z"), "a half-closed (local) stream takes h2's path (which refuses)"


def test_fast_receive_debits_h2s_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    client, server, sid = tunnel(monkeypatch, True)
    h2conn = server._h2
    before_conn = h2conn._inbound_flow_control_window_manager.current_window_size
    before_stream = h2conn.streams[sid]._inbound_window_manager.current_window_size
    client.send_data(sid, b"a" * 1000)
    events = server.receive_data(client.data_to_send(), 0.0)
    assert events == [StreamData(sid, b"a" * 1000)]
    assert h2conn._inbound_flow_control_window_manager.current_window_size == before_conn - 1000, UPGRADE
    assert h2conn.streams[sid]._inbound_window_manager.current_window_size == before_stream - 1000, UPGRADE
    assert h2conn.streams[sid]._actual_content_length == 1000, UPGRADE


@pytest.mark.parametrize("seed", range(8))
def test_fast_acknowledgements_match_h2(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Item 6: acknowledgements counted straight into h2's window managers give the same
    WINDOW_UPDATEs, at the same moments, and the same window state as h2's own
    acknowledge_received_data, also once our side has ended (half-closed, h2's path)."""
    traces = []
    taken: list[bool] = []
    original = HboneH2Connection.acknowledge_fast
    for fast in (True, False):

        def counted(self: HboneH2Connection, n: int, stream_id: int, _fast: bool = fast) -> bool:
            ok = _fast and original(self, n, stream_id)
            taken.append(ok)
            return ok

        monkeypatch.setattr(HboneH2Connection, "acknowledge_fast", counted)
        rng = random.Random(seed)
        client, server, sid = tunnel(monkeypatch, True)
        trace: list[object] = []
        for step in range(150):
            if step == 100:
                server.end_stream(sid)
            size = rng.choice((1, 64, 1000, 16_384, 100_000, 1_000_000))
            client.send_data(sid, b"a" * size)
            got = sum(len(e.data) for e in server.receive_data(client.data_to_send(), 0.0)
                      if isinstance(e, StreamData))
            while got:
                part = rng.randint(1, got)
                server.acknowledge_received(sid, part)
                got -= part
            out = server.data_to_send()
            client.receive_data(out, 0.0)
            conn = server._h2._inbound_flow_control_window_manager
            stream = server._h2.streams[sid]._inbound_window_manager
            trace.append((out, conn.current_window_size, conn._bytes_processed,
                          stream.current_window_size, stream._bytes_processed))
        traces.append(trace)
        if fast:
            assert any(taken), "no acknowledgement took the fast path: the comparison would prove nothing"
            taken.clear()
    assert not any(taken), "h2's public run took the fast path"
    assert traces[0] == traces[1], UPGRADE
