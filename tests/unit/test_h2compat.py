"""What ztunnel/hbone/h2compat.py relies on in h2 and hyperframe is still there, and nothing is patched.

When one of these fails after an upgrade of h2 or hyperframe, its message says
what to do. The differential tests of the DATA fast path (the same bytes
through it and through h2's public path) are in test_hbone_data_frames.py.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import h2
import h2.events as h2e
import hyperframe
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hyperframe.frame import DataFrame, GoAwayFrame

from tests.unit.test_hbone_peers import PREFACE, Pair, parse_frames
from ztunnel.hbone import ConnectRequest, StreamData, TunnelResponse, h2compat
from ztunnel.hbone.h2compat import HboneH2Connection, StreamState

ROOT = Path(__file__).resolve().parents[2]
REQUEST = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")]
UPGRADE = (
    "ztunnel/hbone/h2compat.py relies on it (see its docstring): adapt h2compat to this "
    f"h2 {h2.__version__} / hyperframe {hyperframe.__version__}"
)


@pytest.fixture(autouse=True)
def fast_path_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Also outside the versions it is gated on: these tests are how a new h2 is checked."""
    monkeypatch.setattr(h2compat, "DIRECT_DATA_OFF", None)


def connected_client() -> HboneH2Connection:
    """Our client connection, preface and settings exchanged with a plain h2 server."""
    client = HboneH2Connection(H2Configuration(client_side=True), closed_streams_kept=4)
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client


# ------------------------------------------------------------------ the version gate


def test_installed_versions_are_the_checked_ones() -> None:
    off = h2compat.direct_data_off_reason(
        h2.__version__, hyperframe.__version__,
        has_frame_handler=callable(getattr(H2Connection, "_receive_frame", None)),
    )
    assert off is None, (
        f"{off}, so received DATA takes h2's much slower public path. The other tests of this "
        "file and of test_hbone_data_frames.py force the fast path on: when they pass, widen "
        "CHECKED_H2/CHECKED_HYPERFRAME in ztunnel/hbone/h2compat.py (and the h2 bound in "
        "pyproject.toml); when they fail, fix h2compat first"
    )


@pytest.mark.parametrize(
    ("h2_version", "hf_version", "handler", "off"),
    [
        ("4.1.0", "6.0.1", True, None),
        ("4.4.1", "6.1.0", True, None),
        ("4.0.0", "6.1.0", True, "h2 4.0.0 is outside"),
        ("4.5.0", "6.1.0", True, "h2 4.5.0 is outside"),
        ("5.0.0rc1", "6.1.0", True, "h2 5.0.0rc1 is outside"),
        ("4.4.1", "6.2.0", True, "hyperframe 6.2.0 is outside"),
        ("unknown", "6.1.0", True, "h2 unknown is outside"),
        ("4.4.1", "6.1.0", False, "has no H2Connection._receive_frame"),
    ],
)
def test_the_gate(h2_version: str, hf_version: str, handler: bool, off: str | None) -> None:
    got = h2compat.direct_data_off_reason(h2_version, hf_version, has_frame_handler=handler)
    assert got == off if off is None else off in (got or "")


def test_outside_the_gate_data_takes_the_public_path_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(h2compat, "DIRECT_DATA_OFF", "h2 9.9 is outside the versions (test)")
    monkeypatch.setattr(h2compat, "_logged_off", False)
    taken: list[int] = []
    monkeypatch.setattr(HboneH2Connection, "receive_data_frame", lambda *a: taken.append(1))
    with caplog.at_level(logging.WARNING, logger="ambit.ztunnel.hbone"):
        p = Pair()
        Pair()
    assert [r.getMessage().count("h2 9.9 is outside") for r in caplog.records] == [1]
    sid = p.client.open_stream("10.1.0.5:8080")
    p.pump()
    p.server.respond(sid, 200)
    p.pump()
    assert p.client.send_data(sid, b"x" * 100_000) == 100_000
    _, s_events = p.pump()
    assert b"".join(e.data for e in s_events if isinstance(e, StreamData)) == b"x" * 100_000
    assert not taken


# ------------------------------------------------------------ what h2compat relies on


def test_h2s_per_frame_handler_and_dispatch_table() -> None:
    handler = getattr(H2Connection, "_receive_frame", None)
    assert callable(handler), f"H2Connection._receive_frame is gone: {UPGRADE}"
    assert list(inspect.signature(handler).parameters) == ["self", "frame"], (
        f"H2Connection._receive_frame{inspect.signature(handler)} changed: {UPGRADE}"
    )
    conn = HboneH2Connection(H2Configuration(client_side=False), closed_streams_kept=4)
    table = getattr(conn, "_frame_dispatch_table", None)
    assert isinstance(table, dict) and DataFrame in table, (
        f"h2 no longer dispatches frames through a per-connection _frame_dispatch_table: {UPGRADE}"
    )
    assert conn.direct_data
    quiet = [cls for cls in table if cls is not DataFrame and issubclass(cls, DataFrame)]
    assert len(quiet) == 1 and table[quiet[0]] == table[DataFrame]
    assert table is not getattr(H2Connection(), "_frame_dispatch_table", None)


def test_direct_data_frames_become_h2_events_without_formatting_the_payload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hyperframe's repr of a DATA frame serializes the payload; ours must never reach it."""
    client = H2Connection(H2Configuration(client_side=True))
    server = HboneH2Connection(H2Configuration(client_side=False), closed_streams_kept=4)
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    serialized: list[int] = []
    serialize = DataFrame.serialize_body

    def counted(frame: DataFrame) -> bytes:
        serialized.append(1)
        return serialize(frame)

    monkeypatch.setattr(DataFrame, "serialize_body", counted)
    events = server.receive_data_frame(1, 0x1 | 0x20, memoryview(b"p" * 16_000))
    assert [type(e) for e in events] == [h2e.DataReceived, h2e.StreamEnded], (
        f"{events}: h2's DATA handler answers differently: {UPGRADE}")
    received = events[0]
    assert isinstance(received, h2e.DataReceived)
    assert (received.data, received.flow_controlled_length) == (b"p" * 16_000, 16_000)
    assert not serialized, "h2 formatted our DATA frame's payload: the quiet repr no longer applies"


def test_a_protocol_error_on_the_direct_path_queues_h2s_goaway() -> None:
    conn = HboneH2Connection(H2Configuration(client_side=False), closed_streams_kept=4)
    conn.initiate_connection()
    conn.receive_data(PREFACE)
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        conn.receive_data_frame(5, 0, memoryview(b"idle stream"))
    assert conn.goaway_done
    goaway = parse_frames(conn.data_to_send())
    assert len(goaway) == 1 and isinstance(goaway[0], GoAwayFrame), goaway
    assert goaway[0].error_code == ErrorCodes.PROTOCOL_ERROR


def test_closed_stream_memory_is_bounded_by_our_setting() -> None:
    client = connected_client()
    for _ in range(10):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, REQUEST)
        client.reset_stream(sid, ErrorCodes.CANCEL)
        client.tracked_stream_ids()  # h2 moves closed streams to its history here
    history = getattr(client, "_closed_streams", None)
    assert history is not None and len(history) == 4, (
        "h2 no longer sizes its closed-stream history from MAX_CLOSED_STREAMS (len "
        f"{None if history is None else len(history)}, expected 4): a pooled connection's memory "
        f"grows again (test_memory.py shows it); {UPGRADE}"
    )


def test_stream_and_connection_state() -> None:
    client = connected_client()
    assert client.stream_state(1) is None and client.stream_closed(1) and not client.headers_sent(1)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST)
    assert client.stream_state(sid) is StreamState.OPEN, f"h2's stream states changed: {UPGRADE}"
    assert client.headers_sent(sid) and not client.stream_closed(sid)
    client.end_stream(sid)
    assert client.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert client.tracked_stream_ids() == {sid}
    client.reset_stream(sid, ErrorCodes.CANCEL)
    assert client.stream_state(sid) in (None, StreamState.CLOSED) and client.stream_closed(sid)
    assert client.tracked_stream_ids() == set(), (
        f"reading open_outbound_streams no longer lets go of closed streams: {UPGRADE}"
    )
    assert client.stream_state(sid) is None
    assert not client.goaway_done
    client.close_connection()
    assert client.goaway_done, f"h2's connection state machine changed: {UPGRADE}"


def test_hbone_pair_still_tunnels() -> None:
    """The whole of HBONE over this h2, end to end in memory (a smoke test for an upgrade)."""
    p = Pair()
    sid = p.client.open_stream("10.1.0.5:8080")
    _, s_events = p.pump()
    assert [e for e in s_events if isinstance(e, ConnectRequest)]
    p.server.respond(sid, 200)
    c_events, _ = p.pump()
    assert TunnelResponse(sid, 200) in c_events
    assert p.client.send_data(sid, b"y" * 2_000_000) == 2_000_000
    _, s_events = p.pump()
    assert sum(len(e.data) for e in s_events if isinstance(e, StreamData)) == 2_000_000


# ------------------------------------------------------------------ nothing patched


_SNAPSHOT = """
import inspect, json, pkgutil, importlib, sys

def load_all():
    for top in ("h2", "hyperframe", "hpack"):
        pkg = importlib.import_module(top)
        for info in pkgutil.walk_packages(pkg.__path__, top + "."):
            importlib.import_module(info.name)

def snapshot():
    seen = {}
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] not in ("h2", "hyperframe", "hpack"):
            continue
        for attr, value in vars(mod).items():
            seen[f"{name}.{attr}"] = id(value)
            if inspect.isclass(value) and value.__module__ == name:
                for key, member in vars(value).items():
                    seen[f"{name}.{attr}.{key}"] = id(member)
    return seen

load_all()
before = snapshot()
import ztunnel.hbone
from tests.unit.test_hbone_peers import Pair
from ztunnel.hbone import StreamData
p = Pair()
sid = p.client.open_stream("10.1.0.5:8080")
p.pump()
p.server.respond(sid, 200)
p.pump()
p.client.send_data(sid, b"z" * 300_000)
_, events = p.pump()
assert sum(len(e.data) for e in events if isinstance(e, StreamData)) == 300_000
after = snapshot()
print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))
"""


def test_importing_and_using_hbone_patches_nothing_of_h2_hyperframe_hpack() -> None:
    out = subprocess.run([sys.executable, "-c", _SNAPSHOT], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    changed = json.loads(out.stdout.strip().splitlines()[-1])
    assert changed == [], f"ztunnel.hbone changed these for the whole process: {changed}"


def test_hyperframes_repr_helpers_are_hyperframes_own() -> None:
    import hyperframe.frame as frame

    raw = getattr(frame, "_raw_data_repr", None)
    assert raw is None or raw.__module__ == "hyperframe.frame"
    assert "_body_repr" not in vars(DataFrame) or DataFrame._body_repr.__module__ == "hyperframe.frame"


# ------------------------------------------------------------------ in one place


_PRIVATE = {
    "ztunnel/hbone/h2compat.py": re.compile(
        r"\b_receive_frame\b|_frame_dispatch_table|_closed_streams\b|MAX_CLOSED_STREAMS"
        r"|\b_terminate_connection\b|_raw_data_repr|_body_repr|\.state_machine\b"
        r"|\bh2\.stream\b|\bConnectionState\b|\bincoming_buffer\b"
    ),
    "ztunnel/identity/sslcompat.py": re.compile(r"^\s*(import|from) _ssl\b|\b_sslobj\b", re.M),
}


def test_private_api_is_used_only_in_the_compat_modules() -> None:
    strays = []
    for top in ("ambit", "agent", "ztunnel", "controlplane", "waypoint", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            for home, pattern in _PRIVATE.items():
                if rel != home:
                    strays += [f"{rel}: {m.group(0).strip()}" for m in pattern.finditer(text)]
    assert not strays, (
        f"private h2/hyperframe/_ssl API outside its compat module: {strays}; move the use "
        "into ztunnel/hbone/h2compat.py or ztunnel/identity/sslcompat.py, with a test here"
    )
