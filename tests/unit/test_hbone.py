"""HBONE protocol objects: two in-memory peers exchanging bytes, no sockets."""

from __future__ import annotations

import hashlib
import re

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import RstStreamFrame

from tests.unit.test_hbone_peers import PREFACE, Pair, RawClient, goaway_codes
from ztunnel.hbone import (
    ConnectionTerminated,
    ConnectRequest,
    HboneClient,
    HboneConfig,
    HboneError,
    HboneServer,
    RequestRejected,
    StreamData,
    StreamEnded,
    StreamReset,
    TunnelResponse,
    WindowOpened,
)
from ztunnel.hbone.wire import BadRequest, format_authority, parse_authority, parse_forwarded


def open_tunnel(pair: Pair, authority: str = "10.1.0.5:8080", **kw: str) -> int:
    sid = pair.client.open_stream(authority, **kw)
    _, s_events = pair.pump()
    [req] = [e for e in s_events if isinstance(e, ConnectRequest)]
    assert req.stream_id == sid
    pair.server.respond(sid, 200)
    c_events, _ = pair.pump()
    assert TunnelResponse(sid, 200) in c_events
    return sid


def test_tunnel_open_and_data_both_ways() -> None:
    pair = Pair()
    sid = pair.client.open_stream(
        "10.1.0.5:8080", forwarded_for="10.2.0.7", baggage="k8s.pod=a", traceparent="00-ab-cd-01"
    )
    _, s_events = pair.pump()
    assert s_events == [
        ConnectRequest(sid, "10.1.0.5:8080", "10.1.0.5", 8080, "10.2.0.7", "k8s.pod=a", "00-ab-cd-01")
    ]
    pair.server.respond(sid, 200)
    c_events, _ = pair.pump()
    assert c_events == [TunnelResponse(sid, 200)]
    assert pair.client.send_data(sid, b"ping from client") == 16
    assert pair.server.send_data(sid, memoryview(b"pong from server")) == 16
    c_events, s_events = pair.pump()
    assert s_events == [StreamData(sid, b"ping from client")]
    assert c_events == [StreamData(sid, b"pong from server")]


def test_ipv6_authority_and_forwarded() -> None:
    pair = Pair()
    sid = pair.client.open_stream("[fd00::5]:443", forwarded_for="fd00::7")
    _, s_events = pair.pump()
    assert s_events == [ConnectRequest(sid, "[fd00::5]:443", "fd00::5", 443, "fd00::7", None, None)]


def test_half_close_each_way() -> None:
    pair = Pair()
    sid = open_tunnel(pair)
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    c_events, s_events = pair.pump()
    assert s_events == [StreamData(sid, b"request"), StreamEnded(sid)]
    # The server still sends after the client's END_STREAM.
    pair.server.send_data(sid, b"reply part 1")
    pair.server.send_data(sid, b"reply part 2")
    c_events, _ = pair.pump()
    assert c_events == [StreamData(sid, b"reply part 1"), StreamData(sid, b"reply part 2")]
    assert pair.server.open_streams == 1
    with pytest.raises(HboneError, match="not open for sending"):
        pair.client.send_data(sid, b"late")
    pair.server.end_stream(sid)
    c_events, _ = pair.pump()
    assert c_events == [StreamEnded(sid)]
    assert pair.client.open_streams == 0 and pair.server.open_streams == 0


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.1.0.5:80")], "pseudo-header :scheme"),
        ([(":method", "POST"), (":authority", "10.1.0.5:80")], "only CONNECT"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5:80"), (":path", "/x")], ":path"),
        ([(":method", "CONNECT"), (":authority", "backend.svc:80")], "not 'backend.svc'"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5")], "missing :port"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5:0")], "port must be"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5:99999")], "port must be"),
        ([(":method", "CONNECT"), (":authority", "fd00::1:80")], "must be in brackets"),
        ([(":method", "CONNECT"), (":authority", "[fd00::1]80")], r"\[IPv6\]:port"),
        ([(":method", "CONNECT")], ":authority missing"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5:80"), ("forwarded", "for=evil")], "forwarded"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5:80"), ("connection", "close")], "connection-specific"),
        ([(":method", "CONNECT"), (":authority", "10.1.0.5:80"), ("X-Up", "1")], "lowercase"),
    ],
)
def test_malformed_requests_get_400_and_connection_survives(
    headers: list[tuple[str, str]], why: str
) -> None:
    raw = RawClient(HboneServer(HboneConfig(), 0.0))
    events = raw.send(raw.headers(1, headers))
    [rejected] = [e for e in events if isinstance(e, RequestRejected)]
    assert rejected.stream_id == 1 and rejected.status == 400
    assert re.search(why, rejected.reason)
    answer = raw.frames()
    assert any((b":status", b"400") in getattr(f, "headers", []) for f in answer)
    assert any(isinstance(f, RstStreamFrame) and f.error_code == 0 for f in answer)
    assert raw.server.open_streams == 0
    # The pooled connection is still fine for a good request.
    events = raw.send(raw.headers(3, [(":method", "CONNECT"), (":authority", "10.1.0.5:80")]))
    assert [type(e) for e in events] == [ConnectRequest]


@pytest.mark.parametrize("status", [401, 503])
def test_denied_and_unreachable_pass_through_and_free_the_slot(status: int) -> None:
    pair = Pair()
    sid = pair.client.open_stream("10.1.0.5:80")
    pair.pump()
    pair.server.respond(sid, status)
    c_events, s_events = pair.pump()
    assert c_events == [TunnelResponse(sid, status)]
    assert s_events == []
    assert pair.client.open_streams == 0 and pair.server.open_streams == 0
    assert open_tunnel(pair) == sid + 2


def test_big_transfer_through_flow_control_windows() -> None:
    pair = Pair()
    sid = open_tunnel(pair)
    total = 32 * 1024 * 1024
    payload = memoryview(bytes(range(251)) * (total // 251 + 1))[:total]
    digest = hashlib.sha256()
    sent = received = 0
    blocked = windows = 0
    while received < total:
        if sent < total:
            chunk = payload[sent : sent + 8 * 1024 * 1024]
            n = pair.client.send_data(sid, chunk)
            blocked += n < len(chunk)
            sent += n
        wire = pair.client.data_to_send()
        for ev in pair.server.receive_data(wire, pair.now):
            assert isinstance(ev, StreamData)
            digest.update(ev.data)
            received += len(ev.data)
            pair.server.acknowledge_received(sid, len(ev.data))
        for ev in pair.client.receive_data(pair.server.data_to_send(), pair.now):
            windows += isinstance(ev, WindowOpened)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert blocked > 0 and windows > 0  # the windows really limited and reopened


def test_unconsumed_data_back_pressures_the_sender() -> None:
    pair = Pair()
    sid = open_tunnel(pair)
    block = bytes(1024 * 1024)
    sent = 0
    for _ in range(10):
        sent += pair.client.send_data(sid, block)
        pair.pump()  # the server never acknowledges
    assert sent == HboneConfig().stream_window  # exactly one stream window, then stuck
    assert pair.client.send_data(sid, block) == 0
    pair.server.acknowledge_received(sid, sent)
    c_events, _ = pair.pump()
    assert WindowOpened(sid) in c_events
    assert pair.client.send_data(sid, block) == len(block)


def test_reset_returns_unconsumed_connection_credit() -> None:
    cfg = HboneConfig(connection_window_mib=1, stream_window_mib=1)
    pair = Pair(cfg)
    first = open_tunnel(pair)
    assert pair.client.send_data(first, bytes(1024 * 1024)) == 1024 * 1024
    pair.pump()
    pair.server.reset_stream(first)  # the upstream died with the data unread
    c_events, _ = pair.pump()
    assert StreamReset(first, ErrorCodes.CANCEL) in c_events
    second = open_tunnel(pair)
    assert pair.client.send_data(second, bytes(1024 * 1024)) == 1024 * 1024


def test_many_streams_up_to_the_limit_then_refusal() -> None:
    pair = Pair()
    ids = [pair.client.open_stream(f"10.1.0.5:{1000 + i}") for i in range(100)]
    _, s_events = pair.pump()
    assert len([e for e in s_events if isinstance(e, ConnectRequest)]) == 100
    assert not pair.client.can_open_stream()
    with pytest.raises(HboneError, match="no stream slot"):
        pair.client.open_stream("10.1.0.5:80")
    pair.client.reset_stream(ids[0])
    pair.pump()
    assert pair.client.can_open_stream()


def test_server_refuses_more_concurrent_streams_than_advertised() -> None:
    raw = RawClient(HboneServer(HboneConfig(server_max_concurrent_streams=200), 0.0))
    req = [(":method", "CONNECT"), (":authority", "10.1.0.5:80")]
    wire = b"".join(raw.headers(2 * i + 1, req) for i in range(200))
    assert len([e for e in raw.send(wire) if isinstance(e, ConnectRequest)]) == 200
    events = raw.send(raw.headers(401, req))
    assert events == [ConnectionTerminated(ErrorCodes.ENHANCE_YOUR_CALM, events[0].reason)]  # type: ignore[union-attr]
    assert "200 concurrent streams" in events[0].reason  # type: ignore[union-attr]
    assert goaway_codes(raw.server.data_to_send()) == [ErrorCodes.ENHANCE_YOUR_CALM]


def test_keepalive_ping_and_timeout_with_fake_clock() -> None:
    cfg = HboneConfig(keepalive_interval=10, keepalive_timeout=5)
    pair = Pair(cfg)
    assert pair.client.next_deadline() == 10
    assert pair.client.handle_timeout(9) == []
    assert pair.client.handle_timeout(10) == []  # PING sent
    assert pair.client.next_deadline() == 15
    pair.now = 11
    pair.pump()  # peer answers the PING
    assert pair.client.next_deadline() == 21
    assert pair.client.handle_timeout(21) == []  # another PING; this time nobody answers
    pair.client.data_to_send()
    events = pair.client.handle_timeout(26)
    assert len(events) == 1 and isinstance(events[0], ConnectionTerminated)
    assert "keepalive timeout" in events[0].reason
    assert pair.client.is_closed and pair.client.next_deadline() is None


def test_server_drain_finishes_open_streams_and_refuses_new_ones() -> None:
    pair = Pair()
    sid = open_tunnel(pair)
    pair.server.start_drain()
    c_events, _ = pair.pump()
    assert c_events == []
    assert pair.client.draining and not pair.client.can_open_stream()
    with pytest.raises(HboneError, match="draining"):
        pair.client.open_stream("10.1.0.5:80")
    # The open stream still works both ways.
    pair.client.send_data(sid, b"still")
    pair.server.send_data(sid, b"flowing")
    c_events, s_events = pair.pump()
    assert s_events == [StreamData(sid, b"still")] and c_events == [StreamData(sid, b"flowing")]
    pair.client.end_stream(sid)
    c_events, s_events = pair.pump()
    assert s_events == [StreamEnded(sid)]
    pair.server.end_stream(sid)  # the last stream closes by a local action...
    assert pair.server.next_deadline() == pair.now  # ...so the deadline turns due
    s_events = pair.server.handle_timeout(pair.now)
    c_events += pair.client.receive_data(pair.server.data_to_send(), pair.now)
    assert ConnectionTerminated(0, "we drained; no streams left") in s_events
    assert any(isinstance(e, ConnectionTerminated) and e.error_code == 0 for e in c_events)
    assert pair.client.is_closed and pair.server.is_closed


def test_stream_opened_after_drain_goaway_is_refused() -> None:
    raw = RawClient(HboneServer(HboneConfig(), 0.0))
    req = [(":method", "CONNECT"), (":authority", "10.1.0.5:80")]
    raw.send(raw.headers(1, req))
    raw.server.start_drain()
    assert goaway_codes(raw.server.data_to_send()) == [ErrorCodes.NO_ERROR]
    assert raw.send(raw.headers(3, req)) == []
    resets = [f for f in raw.frames() if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in resets] == [(3, ErrorCodes.REFUSED_STREAM)]


def test_client_streams_beyond_peer_goaway_are_refused() -> None:
    pair = Pair()
    first = open_tunnel(pair)
    second = pair.client.open_stream("10.1.0.5:81")  # not yet seen by the server
    pair.server.start_drain()
    events = pair.client.receive_data(pair.server.data_to_send(), pair.now)
    assert events == [StreamReset(second, ErrorCodes.REFUSED_STREAM)]
    assert pair.client.open_streams == 1
    assert first < second


def test_client_drain() -> None:
    pair = Pair()
    sid = open_tunnel(pair)
    pair.client.start_drain()
    pair.pump()
    assert pair.server.draining
    pair.client.reset_stream(sid)
    c_events, s_events = pair.pump()
    assert any(isinstance(e, ConnectionTerminated) for e in s_events)
    c_events += pair.client.handle_timeout(pair.now)
    assert any(isinstance(e, ConnectionTerminated) for e in c_events)


def test_misuse_raises_hbone_error() -> None:
    client = HboneClient(HboneConfig(), 0.0)
    with pytest.raises(HboneError, match="initiate"):
        client.receive_data(b"", 0.0)
    pair = Pair()
    with pytest.raises(HboneError, match="stream 99"):
        pair.client.send_data(99, b"x")
    with pytest.raises(HboneError, match="must be a pod IP"):
        pair.client.open_stream("example.com:80")
    with pytest.raises(HboneError, match="never opened"):
        pair.client.reset_stream(7)
    sid = pair.client.open_stream("10.1.0.5:80")
    pair.pump()
    with pytest.raises(HboneError, match="not open for sending"):
        pair.server.send_data(sid, b"before 200")
    pair.server.respond(sid, 200)
    with pytest.raises(HboneError, match="cannot be answered"):
        pair.server.respond(sid, 200)
    with pytest.raises(HboneError, match="final HTTP status"):
        pair.server.respond(sid, 100)
    with pytest.raises(HboneError, match="negative"):
        pair.server.acknowledge_received(sid, -1)
    pair.client.close()
    with pytest.raises(HboneError, match="closed"):
        pair.client.send_data(sid, b"x")
    with pytest.raises(HboneError, match="SETTINGS_MAX_HEADER_LIST_SIZE"):
        Pair().client.open_stream("10.1.0.5:80", baggage="b" * 70_000)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_frame_size", 1000), ("stream_window_mib", 4096), ("server_max_concurrent_streams", 0),
     ("keepalive_interval", -1), ("max_header_list_size", 10)],
)
def test_config_validation_names_the_field(field: str, value: float) -> None:
    with pytest.raises(HboneError, match=field):
        HboneConfig(**{field: value})  # type: ignore[arg-type]


def test_preface_is_settings_and_big_connection_window() -> None:
    client = HboneClient(HboneConfig(), 0.0)
    client.initiate()
    assert client.data_to_send().startswith(PREFACE)


def test_bytes_arriving_one_at_a_time() -> None:
    pair = Pair()
    sid = pair.client.open_stream("10.1.0.5:80", forwarded_for="10.2.0.1")
    wire = pair.client.data_to_send()
    events = []
    for i in range(len(wire)):
        events += pair.server.receive_data(wire[i : i + 1], pair.now)
    assert events == [ConnectRequest(sid, "10.1.0.5:80", "10.1.0.5", 80, "10.2.0.1", None, None)]
    pair.server.respond(sid, 200)
    pair.pump()
    pair.client.send_data(sid, b"x" * 70_000)  # spans frames and reads
    wire = pair.client.data_to_send()
    got = b""
    for off in range(0, len(wire), 777):
        for ev in pair.server.receive_data(memoryview(wire)[off : off + 777], pair.now):
            assert isinstance(ev, StreamData)
            got += ev.data
    assert got == b"x" * 70_000


@pytest.mark.parametrize(
    ("value", "ip"),
    [
        ("for=10.1.2.3", "10.1.2.3"),
        ('for="10.1.2.3:4711"', "10.1.2.3"),
        ('For="[2001:db8::1]"', "2001:db8::1"),
        ('for="[2001:db8::1]:80";proto=https', "2001:db8::1"),
        ("proto=http;for=10.0.0.9, for=10.0.0.1", "10.0.0.9"),
        ("proto=http", None),
    ],
)
def test_parse_forwarded(value: str, ip: str | None) -> None:
    assert parse_forwarded(value) == ip


@pytest.mark.parametrize("value", ["for=unknown", "for=_hidden", 'for="[2001:db8::1"', "for=10.1.2"])
def test_parse_forwarded_rejects(value: str) -> None:
    with pytest.raises(BadRequest, match="forwarded"):
        parse_forwarded(value)


@pytest.mark.parametrize(
    ("host", "port", "authority"),
    [("10.0.0.1", 80, "10.0.0.1:80"), ("fd00::1", 443, "[fd00::1]:443"),
     ("FD00:0::1", 443, "[fd00::1]:443")],
)
def test_authority_round_trip(host: str, port: int, authority: str) -> None:
    assert format_authority(host, port) == authority
    assert parse_authority(authority) == (host.lower().replace(":0:", ":"), port)


def test_thousands_of_refused_streams_keep_bookkeeping_bounded() -> None:
    pair = Pair()
    for _ in range(1500):
        sid = pair.client.open_stream("10.1.0.5:80")
        pair.pump()
        pair.server.respond(sid, 401)
        c_events, _ = pair.pump()
        assert c_events == [TunnelResponse(sid, 401)]
    assert pair.client.open_streams == 0 and pair.server.open_streams == 0
    assert len(pair.server._finished) <= 401 and len(pair.client._finished) <= 401
