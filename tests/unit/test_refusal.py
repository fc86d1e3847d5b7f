"""The ztunnel's refusal table: complete, consistent, and the same bytes on the wire as before.

The labels, flags, statuses and SOCKS5 codes are read by users' dashboards and
alerts, so the table is pinned here value by value; and records written through
the table and the enums must render exactly as records written with the bare
strings they replaced (access log, /connections, /metrics).
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ambit.http import Response
from ambit.policy import Verdict
from ztunnel import conntrack, socks5
from ztunnel.accesslog import AccessLog
from ztunnel.conntrack import INBOUND, INBOUND_PLAINTEXT, OUTBOUND, ConnRecord, Route
from ztunnel.context import ProxyContext
from ztunnel.metrics import Metrics, source_labels
from ztunnel.pool import PoolError
from ztunnel.refusal import REFUSALS, Refusal, ResponseFlag

R, F = Refusal, ResponseFlag

# label, flag, HBONE status, SOCKS5 reply: as the ztunnel wrote them before the table
PINNED: dict[Refusal, tuple[str, str, int | None, int | None]] = {
    R.UNKNOWN_SOURCE: ("unknown_source", "NR", None, 2),
    R.NO_ORIGINAL_DST: ("no_original_dst", "NR", None, None),
    R.LOOP: ("loop", "NR", None, None),
    R.UNKNOWN_NAME: ("unknown_name", "NR", None, 4),
    R.NO_SERVICE_PORT: ("no_service_port", "NR", None, 4),
    R.NO_ENDPOINTS: ("no_endpoints", "NR", None, 4),
    R.FORBIDDEN_DESTINATION: ("forbidden_destination", "NR", None, 4),
    R.UNKNOWN_NODE: ("unknown_node", "NR", None, 4),
    R.BAD_DESTINATION: ("bad_destination", "NR", None, 4),
    R.WAYPOINT_UNAVAILABLE: ("waypoint_unavailable", "UH", None, 4),
    R.CERT_NOT_READY: ("cert_not_ready", "UAEX", None, 1),
    R.PEER_BAD_REQUEST: ("peer_bad_request", "NR", None, 4),
    R.SOCKS5_PROTOCOL: ("socks5_protocol", "DPE", None, None),
    R.SOCKS5_TIMEOUT: ("socks5_timeout", "DPE", None, None),
    R.DRAINING: ("draining", "DR", 503, 1),
    R.POLICY_DENIED: ("policy_denied", "DENY", 401, 2),
    R.UNKNOWN_DESTINATION: ("unknown_destination", "NR", 400, 4),
    R.UPSTREAM_UNREACHABLE: ("upstream_unreachable", "UF", 503, 5),
    R.STRICT_MTLS: ("strict_mtls", "DENY", 401, None),
    R.UNTRUSTED_CLIENT_ADDRESS: ("untrusted_client_address", "NR", 400, None),
    R.BAD_REQUEST: ("bad_request", "DPE", 400, None),
    R.PEER_CERTIFICATE: ("peer_certificate", "DPE", None, None),
}

# Every refusal `Outbound.proxy` (and its SOCKS5 front) can answer a SOCKS5 client with.
SOCKS5_REFUSALS = {
    R.DRAINING, R.UNKNOWN_SOURCE, R.NO_SERVICE_PORT, R.NO_ENDPOINTS, R.FORBIDDEN_DESTINATION,
    R.UNKNOWN_NODE, R.UNKNOWN_NAME, R.BAD_DESTINATION, R.WAYPOINT_UNAVAILABLE, R.CERT_NOT_READY, R.UPSTREAM_UNREACHABLE,
    R.PEER_BAD_REQUEST, R.POLICY_DENIED, R.UNKNOWN_DESTINATION,
}


# ---------------------------------------------------------------------------
# the table


def test_every_refusal_has_one_row_with_a_flag_a_label_and_a_description() -> None:
    assert set(REFUSALS) == set(Refusal)
    labels = [s.label for s in REFUSALS.values()]
    assert len(set(labels)) == len(labels)
    for r, s in REFUSALS.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", s.label), r
        assert isinstance(s.flag, ResponseFlag) and s.flag is not F.NONE, r
        assert s.description, r
        assert r.spec is s


def test_the_table_is_the_one_the_dashboards_know() -> None:
    got = {r: (s.label, str(s.flag), s.status, s.socks5) for r, s in REFUSALS.items()}
    assert got == PINNED


def test_hbone_statuses_mean_what_design_says() -> None:
    """400 malformed or not a local workload; 401 denied by policy; 503 upstream or draining."""
    for r, s in REFUSALS.items():
        assert s.status in (None, 400, 401, 503), r
        # a policy denial, and only one, answers 401 and carries Istio's DENY flag
        assert (s.status == 401) == (s.flag is F.POLICY_DENIED), r
        if s.status is None:
            with pytest.raises(ValueError):
                _ = r.hbone_status
        else:
            assert r.hbone_status == s.status


def test_every_status_the_destination_answers_reads_back_as_one_refusal() -> None:
    peer = [s.peer_status for s in REFUSALS.values() if s.peer_status is not None]
    assert len(set(peer)) == len(peer)
    # the HBONE layer itself answers 400 to a malformed CONNECT (RequestRejected)
    answered = {s.status for s in REFUSALS.values() if s.status is not None} | {400}
    assert answered == {400, 401, 503}
    for status in answered:
        r = Refusal.from_peer_status(status)
        assert r.spec.peer_status == status
        assert PoolError("x", status=status).refusal is r
    assert Refusal.from_peer_status(401) is R.POLICY_DENIED
    assert Refusal.from_peer_status(400) is R.PEER_BAD_REQUEST
    assert Refusal.from_peer_status(503) is R.UPSTREAM_UNREACHABLE
    # no answer (dial, TLS, timeout, reset) or an unexpected one: the upstream failed
    for other in (None, 0, 404, 502):
        assert Refusal.from_peer_status(other) is R.UPSTREAM_UNREACHABLE
    assert PoolError("connect timed out").refusal is R.UPSTREAM_UNREACHABLE


def test_socks5_codes_follow_rfc_1928() -> None:
    # RFC 1928 section 6, the REP field
    rfc = {"SUCCEEDED": 0, "GENERAL_FAILURE": 1, "NOT_ALLOWED": 2, "NETWORK_UNREACHABLE": 3,
           "HOST_UNREACHABLE": 4, "CONNECTION_REFUSED": 5, "COMMAND_NOT_SUPPORTED": 7,
           "ADDRESS_NOT_SUPPORTED": 8}
    assert {k: getattr(socks5, k) for k in rfc} == rfc
    for r in SOCKS5_REFUSALS:
        assert r.spec.socks5 is not None, r
    for r, s in REFUSALS.items():
        if s.socks5 is not None:
            assert s.socks5 != socks5.SUCCEEDED and 1 <= s.socks5 <= 8, r
            assert r.socks5_reply == s.socks5
            reply = socks5.reply(r.socks5_reply)
            assert reply[:4] == bytes([5, s.socks5, 0, 1]) and len(reply) == 10
        else:
            assert r.socks5_reply == socks5.GENERAL_FAILURE
    # "connection not allowed by ruleset": policy, and a source the ztunnel lends no identity to
    assert {r for r, s in REFUSALS.items() if s.socks5 == socks5.NOT_ALLOWED} == {
        R.POLICY_DENIED, R.UNKNOWN_SOURCE}
    # "connection refused": the destination was reached and refused (or failed) the connection
    assert R.UPSTREAM_UNREACHABLE.spec.socks5 == socks5.CONNECTION_REFUSED


def test_route_values_are_the_recorded_ones() -> None:
    assert [(r.name, str(r)) for r in Route] == [
        ("HBONE", "hbone"), ("LOCAL", "same-node"), ("PASSTHROUGH", "passthrough"),
        ("REFUSE", "refuse"), ("WAYPOINT", "waypoint"), ("PLAINTEXT", "plaintext"),
    ]


# ---------------------------------------------------------------------------
# the same bytes on the wire


# direction, route, verdict, refusal (None: proxied and closed), and how the
# ztunnel recorded the same connection before: route, flag, refused label
CASES: list[tuple[str, Route, Verdict, Refusal | None, str, str, str | None]] = [
    (INBOUND, Route.HBONE, "deny", R.POLICY_DENIED, "hbone", "DENY", "policy_denied"),
    (INBOUND, Route.HBONE, "pending", R.UNKNOWN_DESTINATION, "hbone", "NR", "unknown_destination"),
    (INBOUND, Route.HBONE, "pending", R.DRAINING, "hbone", "DR", "draining"),
    (INBOUND_PLAINTEXT, Route.PLAINTEXT, "deny", R.STRICT_MTLS, "plaintext", "DENY", "strict_mtls"),
    (OUTBOUND, Route.REFUSE, "pending", R.UNKNOWN_SOURCE, "refuse", "NR", "unknown_source"),
    (OUTBOUND, Route.HBONE, "pending", R.CERT_NOT_READY, "hbone", "UAEX", "cert_not_ready"),
    (OUTBOUND, Route.HBONE, "pending", PoolError("peer answered 400", 400).refusal, "hbone", "NR",
     "peer_bad_request"),
    (OUTBOUND, Route.HBONE, "deny", PoolError("peer answered 401", 401).refusal, "hbone", "DENY",
     "policy_denied"),
    (OUTBOUND, Route.PASSTHROUGH, "allow", R.UPSTREAM_UNREACHABLE, "passthrough", "UF",
     "upstream_unreachable"),
    (OUTBOUND, Route.LOCAL, "allow", None, "same-node", "-", None),
    (INBOUND, Route.LOCAL, "allow", None, "same-node", "-", None),
]


def _render(
    tmp_path: Path, name: str, typed: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, bytes, bytes]:
    """Record every case, the new way (`typed`: enums and the table) or the old (bare strings)."""
    log_path = tmp_path / f"{name}.log"
    metrics, access = Metrics(), AccessLog(str(log_path))
    none = cast(Any, None)
    ctx = ProxyContext(config=none, snapshot=none, certs=none, bundle=none, hbone=none,
                       metrics=metrics, access_log=access)
    ctx.conns.on_close.append(access.write)
    ctx.conns.on_close.append(metrics.connection_closed)
    # every record lasts exactly half a second
    monkeypatch.setattr(conntrack, "time", types.SimpleNamespace(monotonic=lambda: 100.5))
    for i, (direction, route, verdict, refusal, old_route, old_flag, old_label) in enumerate(CASES):
        rec = ctx.conns.open(ConnRecord(
            direction, f"10.1.0.{i + 1}", 40000 + i, "10.2.0.1", 8080, started=100.0,
            started_wall=1_700_000_000.25 + i, src_workload="shop/client", dst_workload="shop/web-0",
            src_identity="spiffe://cluster.local/ns/shop/sa/client",
            dst_identity="spiffe://cluster.local/ns/shop/sa/web", mtls=route is not Route.PLAINTEXT,
            route=route if typed else cast(Any, old_route),
        ))
        rec.decision = verdict
        if verdict == "deny":
            rec.policy, rec.rule = "shop/deny-all", 0
        reason = f"case {i}"
        if refusal is None:
            rec.state = "open"
            metrics.connection_opened(rec)
            rec.counters.received, rec.counters.sent = 1000 + i, 2000 + i
            ctx.conns.close(rec)
        elif typed:
            ctx.refuse(rec, refusal, reason)
        else:  # what `ProxyContext.refuse(rec, key, reason, flags=...)` did
            rec.reason = reason
            rec.response_flags = cast(Any, old_flag)
            metrics.refused.labels(reason=old_label, direction=rec.direction, **source_labels(rec)).inc()
            ctx.conns.close(rec, None if rec.decision == "deny" else reason)
    access.close()
    connections = Response.json({"items": ctx.conns.snapshot()}).body
    exposition = b"\n".join(line for line in metrics.render(0.0).splitlines() if b"_created" not in line)
    return log_path.read_bytes(), connections, exposition


def test_records_render_the_same_bytes_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _render(tmp_path, "old", False, monkeypatch)
    new = _render(tmp_path, "new", True, monkeypatch)
    for what, a, b in zip(("access log", "/connections", "/metrics"), old, new, strict=True):
        assert a == b, what
    access_log, connections, exposition = new
    # and those bytes are the values users know
    first = access_log.splitlines()[0].decode()
    assert first == (
        '{"time":"2023-11-14T22:13:20.250Z","direction":"inbound","src":"10.1.0.1:40000",'
        '"dst":"10.2.0.1:8080","original_dst":null,"client_ip":null,"src_workload":"shop/client",'
        '"dst_workload":"shop/web-0","dst_service":null,"waypoint":null,'
        '"src_identity":"spiffe://cluster.local/ns/shop/sa/client",'
        '"dst_identity":"spiffe://cluster.local/ns/shop/sa/web","src_cert_serial":null,"mtls":true,'
        '"route":"hbone","decision":"deny","policy":"shop/deny-all","rule":0,"reason":"case 0","dry_run":[],'
        '"response_flags":"DENY","bytes_received":0,"bytes_sent":0,"duration_ms":500.0,"error":null}'
    )
    items = json.loads(connections)["items"]
    assert [(c["route"], c["response_flags"], c["state"]) for c in items] == [
        ("hbone", "DENY", "refused"), ("hbone", "NR", "failed"), ("hbone", "DR", "failed"),
        ("plaintext", "DENY", "refused"), ("refuse", "NR", "failed"), ("hbone", "UAEX", "failed"),
        ("hbone", "NR", "failed"), ("hbone", "DENY", "refused"), ("passthrough", "UF", "failed"),
        ("same-node", "-", "closed"), ("same-node", "-", "closed"),
    ]
    text = exposition.decode()
    refused: dict[str, float] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name == "ambit_connections_refused_total":
                assert s.labels["source_workload"] == "client"  # refusals say who they came from
                refused[s.labels["reason"]] = refused.get(s.labels["reason"], 0) + s.value
    assert refused["policy_denied"] == 2 and refused["strict_mtls"] == 1
    assert 'response_flags="-"' in text and "same-node" not in text
