"""Safe policy rollout, the pure parts: history rows and cursors, denial ranking, replay
(`ambit policy simulate`), grouping, and suggestions (`ambit policy suggest`), by tables."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import pytest
import yaml

from agent.history import (
    DropFolder,
    RequestCursor,
    SourceDenials,
    ZtunnelCursor,
    conn_row,
    rank_denials,
    request_row,
)
from agent.rollout import history_mode, parse_when
from agent.simulate import (
    Observed,
    SimulateError,
    apply_proposal,
    describe,
    group_changes,
    judge,
    simulate,
    snapshot_pair,
)
from agent.suggest import collapse_paths, generalize_path, render, suggest
from ambit.args import CliError
from ambit.cluster import build_state, load_documents, parse_object
from ambit.policy import compile_policy
from ambit.snapshot import Snapshot, build_snapshot
from ambit.wire.snapshot import encode_snapshot

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: pay, labels: {ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: shop, labels: {app: frontend}}
spec: {nodeName: node-a, serviceAccountName: frontend}
status: {podIP: 10.1.0.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: backend-x1, namespace: shop, labels: {app: backend, pod-template-hash: x1}}
spec: {nodeName: node-b, serviceAccountName: backend}
status: {podIP: 10.1.0.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: backend-x2, namespace: shop, labels: {app: backend, pod-template-hash: x2}}
spec: {nodeName: node-b, serviceAccountName: backend}
status: {podIP: 10.1.0.3, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: catalog, namespace: shop, labels: {app: catalog}}
spec: {nodeName: node-a, serviceAccountName: catalog}
status: {podIP: 10.1.0.4, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: bare, namespace: shop}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: idle, namespace: shop, labels: {app: idle}}
spec: {nodeName: node-a, serviceAccountName: idle}
status: {podIP: 10.1.0.6, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy}
spec: {nodeName: node-a}
status: {podIP: 10.2.0.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: orders, namespace: pay, labels: {app: orders}}
spec: {nodeName: node-a, serviceAccountName: orders}
status: {podIP: 10.3.0.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: reporting, namespace: pay, labels: {app: reporting}}
spec: {nodeName: node-a, serviceAccountName: reporting}
status: {podIP: 10.3.0.3, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: payment, namespace: pay, labels: {app: payment}}
spec: {nodeName: node-b, serviceAccountName: payment}
status: {podIP: 10.3.0.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-waypoint, namespace: pay, labels: {gateway.networking.k8s.io/gateway-name: wp,
  ambit.dev/dataplane-mode: none}}
spec: {nodeName: node-a, serviceAccountName: wp}
status: {podIP: 10.3.0.9, phase: Running}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: pay}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""

BACKEND_FROM_FRONTEND = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
"""

TD = "spiffe://cluster.local"


def objects(policies: str = BACKEND_FROM_FRONTEND) -> list[dict[str, Any]]:
    return load_documents(CLUSTER + "\n---\n" + policies)


def snap_of(policies: str = BACKEND_FROM_FRONTEND) -> Snapshot:
    snap = build_snapshot(build_state(objects(policies)), "node-b")
    assert not snap.errors, snap.errors
    return snap


def agent_objects(policies: str = BACKEND_FROM_FRONTEND) -> dict[str, Any]:
    """What an agent's /objects answers, through JSON as on the wire."""
    snap = snap_of(policies)
    body = {"node": "node-b", "snapshot": [[k, ns, n, v] for (k, ns, n), v in encode_snapshot(snap).items()],
            "objects": objects(policies)}
    loaded: dict[str, Any] = json.loads(json.dumps(body))
    return loaded


IPS = {"shop/frontend": "10.1.0.1", "shop/catalog": "10.1.0.4", "legacy/client": "10.2.0.1",
       "pay/orders": "10.3.0.1", "pay/reporting": "10.3.0.3", "pay/wp-waypoint": "10.3.0.9"}
SA = {"shop/frontend": "frontend", "shop/catalog": "catalog", "pay/orders": "orders", "pay/reporting": "reporting",
      "pay/wp-waypoint": "wp", "shop/backend-x1": "backend", "shop/backend-x2": "backend",
      "shop/catalog-dst": "catalog", "pay/payment": "payment", "shop/idle": "idle"}


def ident(uid: str) -> str | None:
    sa = SA.get(uid)
    return f"{TD}/ns/{uid.split('/')[0]}/sa/{sa}" if sa else None


def conn(src: str, dst: str, port: int = 8080, verdict: str = "allow", *, mtls: bool = True,
         count: int = 1, node: str = "node-b", last: float = 1000.0, **kw: Any) -> Observed:
    return Observed(
        kind="conn", node=node, src_ip=IPS.get(src, src), src_workload=src if "/" in src else None,
        src_identity=ident(src) if mtls else None, dst_workload=dst, dst_identity=ident(dst), dst_port=port,
        mtls=mtls, verdict=verdict, direction="inbound" if mtls else "inbound_plaintext", count=count,
        first=last - 10, last=last, **kw)


def req(src: str, method: str, path: str, verdict: str = "allow", *, status: int = 200, count: int = 1,
        dst: str = "pay/payment") -> Observed:
    return Observed(kind="request", node="node-a", src_ip=IPS[src], src_workload=src, src_identity=ident(src),
                    dst_workload=dst, dst_identity=ident(dst), dst_port=8080, mtls=True, verdict=verdict,
                    method=method, path=path, host="payment.pay.svc.cluster.local", status=status, count=count,
                    waypoint="pay/wp", first=990.0, last=1000.0)


# ---------------------------------------------------------------------------
# history rows and cursors


def test_a_ztunnel_record_becomes_a_row_with_istio_byte_directions() -> None:
    rec = {"id": 7, "direction": "inbound", "src": "10.200.0.10:40000", "dst": "10.1.0.2:8080",
           "client_ip": "10.1.0.1", "src_workload": "shop/frontend", "dst_workload": "shop/backend-x1",
           "src_identity": f"{TD}/ns/shop/sa/frontend", "mtls": True, "route": "hbone", "decision": "allow",
           "policy": "shop/backend-allow-frontend", "rule": 0, "reason": "allowed", "state": "closed",
           "bytes_received": 100, "bytes_sent": 900, "age_s": 2.5, "started_at": 1000.0,
           "dry_run": [{"policy": "shop/strict", "decision": "deny"}]}
    row = conn_row(rec, "node-b", lambda uid: {"labels": {"app": "backend"}})
    assert row["src_ip"] == "10.1.0.1" and row["src_port"] == 40000  # policy saw the client's address
    assert (row["dst_ip"], row["dst_port"]) == ("10.1.0.2", 8080)
    assert (row["t_start"], row["t_end"]) == (1000.0, 1002.5)
    assert (row["bytes_sent"], row["bytes_received"]) == (100, 900)
    assert row["mtls"] == 1 and row["rkey"] == "1000.0:7" and json.loads(row["dst_meta"]) == {"labels": {"app": "backend"}}
    # a field this version does not know is kept, not lost
    assert json.loads(row["extra"]) == {"dry_run": [{"decision": "deny", "policy": "shop/strict"}]}


def test_a_waypoint_request_becomes_a_row() -> None:
    rec = {"seq": 3, "time": 2000.0, "method": "GET", "authority": "payment.pay.svc.cluster.local:80",
           "path": "/api/v1/charges", "status": 403, "decision": "deny", "policy": None, "client_ip": "10.3.0.3",
           "src_workload": "pay/reporting", "src_identity": f"{TD}/ns/pay/sa/reporting", "dst_port": 8080,
           "dst_workload": "pay/payment", "waypoint": "pay/wp", "request_principal": "https://iss/alice"}
    row = request_row(rec, "node-a", "abc")
    assert row["kind"] == "request" and row["dst_port"] == 8080 and row["host"] == "payment.pay.svc.cluster.local"
    assert row["rkey"] == "abc:3" and row["verdict"] == "deny" and row["status"] == 403
    assert json.loads(row["extra"]) == {"request_principal": "https://iss/alice"}
    del rec["dst_port"]
    assert request_row(rec, "node-a", "abc")["dst_port"] == 80  # an older waypoint: the port dialed


def z(i: int, state: str, started: float = 100.0) -> dict[str, Any]:
    return {"id": i, "state": state, "started_at": started}


def test_the_ztunnel_cursor_takes_each_closed_record_once_and_counts_what_it_missed() -> None:
    cur = ZtunnelCursor()
    assert [r["id"] for r in cur.take([z(1, "open"), z(2, "closed"), z(3, "refused")])] == [2, 3]
    # the same ring again: nothing new; 1 closes
    assert [r["id"] for r in cur.take([z(1, "closed"), z(2, "closed"), z(3, "refused")])] == [1]
    assert cur.take([z(1, "closed"), z(2, "closed"), z(3, "refused")]) == []
    # 2 and 3 left the ring: forgotten, so the set stays as small as the ring
    assert cur.take([z(1, "closed"), z(4, "open")]) == [] and cur.seen == {"100.0:1"}
    # 4 was open, then closed and left the ring before the next poll: lost
    cur.take([z(5, "failed")])
    assert cur.lost == 1
    # 6 and 7 opened and closed between two polls and left the ring unseen: numbered, so counted
    cur.take([z(5, "failed"), z(8, "closed")])
    assert cur.lost == 3
    # a restarted ztunnel numbers from 1 again: its records have another start time
    assert [r["id"] for r in cur.take([z(1, "closed", started=200.0)])] == [1]
    cur.take([z(1, "closed", started=200.0), z(2, "closed", started=200.0)])
    assert cur.lost == 3


def test_a_restarted_agent_does_not_write_the_ring_again() -> None:
    cur = ZtunnelCursor(seen={"100.0:1", "100.0:2"})
    assert [r["id"] for r in cur.take([z(1, "closed"), z(2, "closed"), z(3, "closed")])] == [3]


def test_the_request_cursor_follows_instances_and_counts_gaps() -> None:
    cur = RequestCursor()
    assert [r["seq"] for r in cur.take({"instance": "a", "items": [{"seq": 1}, {"seq": 2}]})] == [1, 2]
    assert cur.take({"instance": "a", "items": [{"seq": 2}]}) == [] and cur.after == 2
    # records 3..4 fell out of the waypoint's ring before the agent asked
    assert [r["seq"] for r in cur.take({"instance": "a", "items": [{"seq": 5}]})] == [5] and cur.lost == 2
    # a restarted waypoint starts over
    assert [r["seq"] for r in cur.take({"instance": "b", "items": [{"seq": 1}]})] == [1] and cur.after == 1


def test_a_dropped_syn_and_its_retransmissions_are_one_attempt() -> None:
    f = DropFolder(window=120)
    key = ("drop_strict", "10.2.0.1", 5000, "10.1.0.2", 8080)
    assert f.first(*key, now=0.0) and not f.first(*key, now=1.0) and not f.first(*key, now=3.0)
    assert f.first("drop_strict", "10.2.0.1", 5001, "10.1.0.2", 8080, now=3.0)  # another connection
    assert f.first(*key, now=200.0)


@pytest.mark.parametrize(("recent", "earlier", "window", "baseline", "spike", "ratio"), [
    # a quiet source that suddenly probes: spike
    (40, 0, 300, 86100, True, pytest.approx(40 / 5 / (1 / (86100 / 60)))),
    # a source that is always denied at this rate: no spike
    (10, 2870, 300, 86100, False, pytest.approx(1.0, rel=0.01)),
    # too few to matter
    (3, 0, 300, 86100, False, pytest.approx(3 / 5 * 86100 / 60)),
    # no baseline yet (the history is younger than the window): a burst with no history is a spike
    (12, 0, 300, 100, True, None),
])
def test_rank_denials(recent: int, earlier: int, window: float, baseline: float, spike: bool, ratio: Any) -> None:
    [r] = rank_denials([SourceDenials("shop/x", None, recent, earlier, 3, 1.0)], window, baseline)
    assert r.spike is spike and r.ratio == ratio


def test_rank_denials_puts_spikes_first() -> None:
    rows = rank_denials([SourceDenials("steady", None, 30, 8000, 1, 1.0), SourceDenials("prober", None, 9, 0, 9, 1.0)],
                        300, 86100)
    assert [r.source.source for r in rows] == ["prober", "steady"]


# ---------------------------------------------------------------------------
# replay


@pytest.mark.parametrize(("obs", "policies", "allowed", "words"), [
    (conn("shop/frontend", "shop/backend-x1"), BACKEND_FROM_FRONTEND, True,
     "allow: ALLOW shop/backend-allow-frontend rule 0"),
    (conn("shop/catalog", "shop/backend-x1"), BACKEND_FROM_FRONTEND, False,
     "deny: no ALLOW rule matched (default deny)"),
    (conn("shop/frontend", "shop/catalog-dst".replace("-dst", "")), BACKEND_FROM_FRONTEND, True,
     "allow: no ALLOW policy applies"),
    # plaintext: no identity; judged with mtls False, as the ztunnel's 15006 does
    (conn("legacy/client", "shop/backend-x1", mtls=False), BACKEND_FROM_FRONTEND, False,
     "deny: no ALLOW rule matched (default deny)"),
    (conn("legacy/client", "shop/catalog", mtls=False),
     "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\n"
     "spec: {mtls: {mode: STRICT}}", False, "deny: shop/strict (DENY)"),
    # from the destination's waypoint: the waypoint enforced, the ztunnel admits it
    (conn("pay/wp-waypoint", "pay/payment"), BACKEND_FROM_FRONTEND, True, "allow: through its waypoint"),
    # straight to a pod that uses a waypoint
    (conn("pay/orders", "pay/payment"), BACKEND_FROM_FRONTEND, False, "deny: must come through its waypoint"),
])
def test_judge(obs: Observed, policies: str, allowed: bool, words: str) -> None:
    d = judge(obs, snap_of(policies))
    assert not isinstance(d, str)
    assert d.allowed is allowed and describe(d) == words, d


def test_judge_requests_at_the_waypoint() -> None:
    snap = snap_of(PAYMENT_L7)
    ok = judge(req("pay/orders", "POST", "/api/v1/charges"), snap)
    no = judge(req("pay/reporting", "GET", "/api/v1/charges"), snap)
    assert not isinstance(ok, str) and ok.allowed and ok.policy == "pay/charges-from-orders"
    assert not isinstance(no, str) and not no.allowed
    assert judge(req("pay/orders", "", "/x"), snap) == "malformed requests (refused before any policy)"
    assert "RequestAuthentication" in str(judge(req("pay/orders", "GET", "/x", "deny", status=401), snap))


def test_opaque_tcp_through_a_waypoint_is_judged_as_the_waypoint_does() -> None:
    tcp = replace(req("pay/orders", "", ""), route="waypoint_tcp", host=None, path=None)
    assert tcp.what == "port 8080"
    d = judge(tcp, snap_of(PAYMENT_L7))  # rules that need HTTP apply: the whole connection is denied
    assert not isinstance(d, str) and not d.allowed and "not HTTP" in d.reason
    only_l4 = PAYMENT_L7.replace("    to: [{operation: {methods: [POST, GET], paths: [/api/v1/charges, "
                                 "/api/v1/charges/*]}}]\n", "")
    d = judge(tcp, snap_of(only_l4))
    assert not isinstance(d, str) and d.allowed and d.policy == "pay/charges-from-orders"
    row = request_row({"seq": 1, "protocol": "tcp", "method": "", "path": "", "dst_port": 8080}, "node-a", "i")
    assert row["route"] == "waypoint_tcp" and row["method"] is None and row["extra"] is None


def test_an_ingress_gateways_request_is_kept_but_not_replayed() -> None:
    rec = {"seq": 2, "method": "GET", "path": "/api", "status": 403, "decision": "deny", "gateway": "edge/ingress",
           "client_ip": "192.0.2.9", "request_principal": "https://iss/dan", "dst_workload": "pay/payment",
           "dst_port": 8080}
    row = request_row(rec, "node-a", "g")
    assert row["route"] == "gateway" and row["waypoint"] is None and row["src_identity"] is None
    assert json.loads(row["extra"])["gateway"] == "edge/ingress"
    obs = replace(req("pay/orders", "GET", "/api"), route="gateway", waypoint=None)
    assert "ingress gateway" in str(judge(obs, snap_of(PAYMENT_L7)))


def test_a_gone_pod_is_judged_by_what_the_history_kept_of_it() -> None:
    snap = snap_of()
    gone = conn("shop/catalog", "shop/backend-old", dst_meta={"labels": {"app": "backend"}})
    gone = Observed(**{**gone.__dict__, "dst_identity": f"{TD}/ns/shop/sa/backend"})
    d = judge(gone, snap)
    assert not isinstance(d, str) and not d.allowed  # backend-allow-frontend still selects it by label
    assert "no longer exists" in str(judge(Observed(**{**gone.__dict__, "dst_meta": None}), snap))


PAYMENT_L7 = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: charges-from-orders, namespace: pay}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/pay/sa/orders]}}]
    to: [{operation: {methods: [POST, GET], paths: [/api/v1/charges, /api/v1/charges/*]}}]
"""

ONLY_FRONTEND_TO_CATALOG = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: catalog-lockdown, namespace: shop}
spec:
  selector: {matchLabels: {app: catalog}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
    to: [{operation: {ports: ["8080"]}}]
"""

OBSERVED = [
    conn("shop/frontend", "shop/backend-x1", count=10),
    conn("shop/frontend", "shop/backend-x2", count=5, node="node-a"),
    conn("shop/catalog", "shop/backend-x1", verdict="deny", count=3),
    conn("shop/frontend", "shop/catalog", count=4),
    conn("shop/frontend", "shop/catalog", port=9090, count=2, last=1500.0),
    conn("shop/backend-x1", "shop/catalog", count=7),
    conn("legacy/client", "shop/catalog", mtls=False, count=1),
]


def pairs(proposal: str, delete: bool = False) -> tuple[Snapshot, Snapshot]:
    return snapshot_pair(agent_objects(), load_documents(proposal), delete)


def test_simulate_lists_exactly_the_flows_a_proposal_breaks() -> None:
    pair = pairs(ONLY_FRONTEND_TO_CATALOG)
    sim = simulate(OBSERVED, {"node-b": pair}, pair)
    assert sim.breaks and sim.flows == 32 and sim.unchanged == 4 + 10 + 5 + 3
    groups = group_changes(sim.newly_denied)
    assert [(g.source, g.destination, g.what, g.flows) for g in groups] == [
        ("shop/backend-x1", "shop/catalog", ("port 8080",), 7),
        ("shop/frontend", "shop/catalog", ("port 9090",), 2),
        ("legacy/client", "shop/catalog", ("port 8080",), 1),
    ]
    assert groups[0].before == "allow: no ALLOW policy applies"
    assert groups[0].after == "deny: no ALLOW rule matched (default deny)"
    assert groups[1].last == 1500.0 and groups[1].nodes == ("node-b",)
    assert not sim.newly_allowed


def test_simulate_a_deletion_newly_allows() -> None:
    pair = pairs(BACKEND_FROM_FRONTEND, delete=True)
    sim = simulate(OBSERVED, {}, pair)
    assert not sim.breaks
    [g] = group_changes(sim.newly_allowed)
    assert (g.source, g.destination, g.flows) == ("shop/catalog", "shop/backend-x1", 3)
    assert g.before == "deny: no ALLOW rule matched (default deny)" and g.after == "allow: no ALLOW policy applies"


def test_simulate_counts_drift_and_skips() -> None:
    pair = pairs(ONLY_FRONTEND_TO_CATALOG)
    recorded_deny_now_allowed = conn("shop/frontend", "shop/backend-x1", verdict="deny", count=2)
    bypass = Observed(**{**conn("shop/frontend", "shop/backend-x1").__dict__, "kind": "drop",
                         "route": "drop_egress", "count": 4})
    sim = simulate([recorded_deny_now_allowed, bypass], {}, pair)
    assert sim.drifted == 2 and sum(sim.skipped.values()) == 4


@pytest.mark.parametrize(("proposal", "delete", "error"), [
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: shop}\nspec: {nodeName: a}", False,
     "only AuthorizationPolicy"),
    (BACKEND_FROM_FRONTEND.replace("backend-allow-frontend", "nope"), True, "not in the cluster"),
    (BACKEND_FROM_FRONTEND.replace("action: ALLOW", "action: PERMIT"), False, "the proposal is invalid"),
])
def test_bad_proposals_are_refused(proposal: str, delete: bool, error: str) -> None:
    with pytest.raises(SimulateError, match=error):
        apply_proposal(objects(), load_documents(proposal), delete)


# ---------------------------------------------------------------------------
# suggestions


@pytest.mark.parametrize(("path", "general"), [
    ("/api/v1/charges", "/api/v1/charges"),
    ("/api/v1/charges/7", "/api/v1/charges/*"),
    ("/users/123/orders", "/users/*"),
    ("/o/3f2b9c1e-8a4d-4b7e-9f00-1234567890ab", "/o/*"),
    ("/blob/9f86d081884c7d65", "/blob/*"),
    ("/static/deadbeefcafe", "/static/deadbeefcafe"),  # hex without a digit: a word
    ("/", "/"),
])
def test_generalize_path(path: str, general: str) -> None:
    assert generalize_path(path) == general


def test_collapse_paths() -> None:
    assert collapse_paths(["/a/1", "/a/2", "/a/list", "/a", "/b"]) == ["/a", "/a/*", "/b"]


SUGGEST_OBSERVED = [
    *OBSERVED,
    conn("shop/catalog", "shop/bare", count=2),
    req("pay/orders", "POST", "/api/v1/charges", count=5),
    req("pay/orders", "GET", "/api/v1/charges/7"),
    req("pay/orders", "GET", "/api/v1/charges/8"),
    req("pay/reporting", "GET", "/api/v1/charges", "deny", status=403, count=2),
    conn("pay/wp-waypoint", "pay/payment", count=9),
]


def suggested(namespace: str, policies: str = BACKEND_FROM_FRONTEND) -> tuple[Any, str]:
    result = suggest(SUGGEST_OBSERVED, snap_of(policies), namespace)
    return result, render(result, f"ambit policy suggest --namespace {namespace}")


def test_suggest_writes_one_commented_policy_per_workload() -> None:
    result, text = suggested("shop")
    docs = load_documents(text)
    assert [d["metadata"]["name"] for d in docs] == ["backend-allow-observed", "catalog-allow-observed"]
    backend, catalog = docs
    # the two backend pods are one workload, selected by `app` alone (not by pod-template-hash)
    assert backend["spec"]["selector"] == {"matchLabels": {"app": "backend"}}
    assert backend["spec"]["rules"] == [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                                         "to": [{"operation": {"ports": ["8080"]}}]}]
    # sources with the same ports share a rule; plaintext comes from its address
    assert catalog["spec"]["rules"] == [
        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/backend"]}},
                  {"source": {"ipBlocks": ["10.2.0.1"]}}],
         "to": [{"operation": {"ports": ["8080"]}}]},
        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
         "to": [{"operation": {"ports": ["8080", "9090"]}}]},
    ]
    for d in docs:
        compile_policy(parse_object(d))  # type: ignore[arg-type]
    assert "# not allowed here: 3 flows from shop/catalog, denied today" in text
    assert "  # shop/frontend (cluster.local/ns/shop/sa/frontend): 15 connections to port 8080, last at" in text
    assert "  # legacy/client (10.2.0.1), plaintext: its address, which may change: 1 connection to port 8080" in text
    assert "# shop/frontend (cluster.local/ns/shop/sa/frontend): 6 connections to ports 8080, 9090" in text
    assert result.unselectable == ["shop/bare"] and "shop/bare has traffic but no labels" in text
    assert result.quiet == ["shop/frontend", "shop/idle"]


def test_suggest_writes_methods_and_paths_where_a_waypoint_saw_requests() -> None:
    _, text = suggested("pay", PAYMENT_L7)
    [payment] = load_documents(text)
    assert payment["spec"]["selector"] == {"matchLabels": {"app": "payment"}}
    # the waypoint's own connections to the pod are not sources; reporting, denied today, is not allowed
    assert payment["spec"]["rules"] == [{
        "from": [{"source": {"principals": ["cluster.local/ns/pay/sa/orders"]}}],
        "to": [{"operation": {"ports": ["8080"], "methods": ["GET"], "paths": ["/api/v1/charges/*"]}},
               {"operation": {"ports": ["8080"], "methods": ["POST"], "paths": ["/api/v1/charges"]}}]}]
    assert "# not allowed here: 2 flows from pay/reporting, denied today" in text


@pytest.mark.parametrize("policies", ["", BACKEND_FROM_FRONTEND + "---" + PAYMENT_L7])
@pytest.mark.parametrize("namespace", ["shop", "pay"])
def test_simulating_a_suggestion_newly_denies_nothing_observed(namespace: str, policies: str) -> None:
    _, text = suggested(namespace, policies)
    pair = snapshot_pair(agent_objects(policies), load_documents(text))
    sim = simulate(SUGGEST_OBSERVED, {}, pair)
    assert not sim.breaks, group_changes(sim.newly_denied)
    # and a client nobody saw is denied once it is applied
    newcomer = conn("shop/idle", "shop/catalog") if namespace == "shop" else req("pay/reporting", "GET", "/x")
    after = judge(newcomer, pair[1])
    assert not isinstance(after, str) and not after.allowed


def test_suggest_yaml_is_a_document_stream_kubectl_takes() -> None:
    _, text = suggested("shop")
    assert text.startswith("# Least-privilege AuthorizationPolicies for namespace shop")
    assert [d["kind"] for d in yaml.safe_load_all(text) if d] == ["AuthorizationPolicy"] * 2


# ---------------------------------------------------------------------------
# the CLI's pure parts


def flows_args(**kw: Any) -> argparse.Namespace:
    base: dict[str, Any] = {"since": None, "until": None, "by_source": False, "source": None, "destination": None,
                            "verdict": None, "policy": None, "watch": False}
    base.update(kw)
    return argparse.Namespace(**base)


def test_history_mode() -> None:
    assert not history_mode(flows_args())
    assert history_mode(flows_args(since="1h")) and history_mode(flows_args(by_source=True))
    with pytest.raises(CliError, match="add --since"):
        history_mode(flows_args(source="shop/frontend"))
    with pytest.raises(CliError, match="--watch is the live view"):
        history_mode(flows_args(since="1h", watch=True))


def test_parse_when() -> None:
    assert parse_when("1h", 10_000.0, "--since") == 6400.0
    assert parse_when("2025-01-31T12:00:00Z", 0, "--since") == 1738324800.0
    with pytest.raises(CliError, match="expected a duration ago"):
        parse_when("yesterday", 0, "--since")
