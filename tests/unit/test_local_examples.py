"""The demo manifests in examples/ parse, and mean what the demo says, by the real policy engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.local.cluster import read_manifests
from ambit.cluster import build_state
from ambit.policy import ConnectionFacts, authorize, mtls_mode
from ambit.snapshot import build_snapshot
from ambit.spiffe import SpiffeId

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _cluster() -> Any:
    return build_state(_cluster_objects())


def _cluster_objects() -> list[Any]:
    objs = read_manifests([EXAMPLES])
    ips = {"backend": "10.1.1.2", "frontend": "10.1.0.2", "client": "10.1.0.3", "catalog": "10.1.0.4",
           "payment": "10.1.1.5", "order-service": "10.1.0.6", "reporting": "10.1.0.7", "orders": "10.1.1.8",
           "partner": "10.1.0.9", "stranger": "10.1.1.10"}
    for i, o in enumerate(objs):
        if o["kind"] == "Pod":
            o["status"] = {"podIP": ips[o["metadata"]["name"]], "phase": "Running"}
        if o["kind"] == "Service":  # the local cluster allocates these on apply
            o["spec"].setdefault("clusterIP", f"10.96.0.{10 + i}")
    nodes = [
        {"kind": "Node", "metadata": {"name": n}, "status": {"addresses": [{"type": "InternalIP", "address": a}]}}
        for n, a in (("node-a", "10.200.1.10"), ("node-b", "10.200.1.11"))
    ]
    return [*objs, *nodes]


def test_examples_describe_the_demo() -> None:
    state = _cluster()
    assert set(state.namespaces) == {"shop", "legacy", "payments", "edge", "orders", "internet"}
    pods = {k[1]: p for k, p in state.pods.items()}
    assert pods["frontend"].node_name == "node-a" and pods["backend"].node_name == "node-b"
    assert state.is_enrolled(pods["frontend"]) and state.is_enrolled(pods["backend"])
    assert not state.is_enrolled(pods["client"])
    assert pods["catalog"].node_name == "node-a" and state.is_enrolled(pods["catalog"])
    for name in ("backend", "catalog"):
        svc = state.services[("shop", name)]
        assert [p.name for p in state.service_endpoints(svc)] == [name]
    assert all(p.command and p.command[0] == "python3" for p in pods.values()
               if p.name not in ("client", "order-service", "reporting", "partner", "stranger"))


def test_examples_policy_allows_only_the_frontend_with_mtls() -> None:
    snap = build_snapshot(_cluster(), "node-b")
    assert snap.errors == ()
    backend = snap.workload_by_ip("10.1.1.2")
    assert backend is not None
    assert mtls_mode(backend, 8080, snap.policies) == "STRICT"
    frontend = SpiffeId("cluster.local", "shop", "frontend")
    other = SpiffeId("cluster.local", "shop", "catalog")
    assert authorize(ConnectionFacts("10.1.0.2", frontend, backend, 8080, True), snap.policies).allowed
    assert not authorize(ConnectionFacts("10.1.0.2", other, backend, 8080, True), snap.policies).allowed
    # the unenrolled legacy client speaks plaintext: STRICT refuses it
    assert not authorize(ConnectionFacts("10.1.0.3", None, backend, 8080, False), snap.policies).allowed


def test_examples_payments_go_through_a_waypoint_that_decides_per_request() -> None:
    from ambit.policy import HttpFacts, authorize_http

    snap = build_snapshot(_cluster(), "node-b")
    payment = snap.workload_by_ip("10.1.1.5")
    assert payment is not None and payment.waypoint == "waypoint"
    svc = next(s for s in snap.services.values() if s.name == "payment")
    assert svc.waypoint == "waypoint" and snap.waypoint("payments", "waypoint") is not None
    orders = SpiffeId("cluster.local", "payments", "order-service")
    reporting = SpiffeId("cluster.local", "payments", "reporting")

    def allowed(who: SpiffeId, method: str, path: str) -> bool:
        facts = ConnectionFacts("10.1.0.6", who, payment, 8080, True)
        return authorize_http(facts, HttpFacts(method, path, "payment"), snap.policies).allowed

    assert allowed(orders, "POST", "/api/v1/charges") and allowed(orders, "GET", "/api/v1/charges/42")
    assert not allowed(orders, "DELETE", "/api/v1/charges")
    assert not allowed(reporting, "GET", "/api/v1/charges")


def test_examples_ingress_gateway_serves_the_demo_issuers_tokens() -> None:
    """50-ingress.yaml: the gateway compiles, its pod is made by the local cluster, and the demo
    issuer's key (examples/demo-issuer-key.pem) signs tokens its RequestAuthentication accepts."""
    import time

    from joserfc import jwt
    from joserfc.jwk import ECKey

    from agent.local.cluster import waypoint_pod
    from agent.local.layout import plan
    from ambit.policy import authenticate
    from gateway.view import build_view

    objs = read_manifests([EXAMPLES / "50-ingress.yaml"])
    gw = next(o for o in objs if o["kind"] == "Gateway")
    pod = waypoint_pod(plan(Path("/tmp/ambit-examples-test"), 2, Path("/sys/fs/cgroup")), gw)
    assert pod is not None and pod["metadata"]["name"] == "ingress-gateway"
    assert pod["spec"]["serviceAccountName"] == "ingress" and pod["spec"]["nodeName"] == "node-a"
    assert "gateway" in pod["spec"]["containers"][0]["command"]
    pod["status"] = {"podIP": "10.1.0.20", "phase": "Running"}
    cluster = build_state([*_cluster_objects(), pod])
    view = build_view(cluster, "edge", "ingress")
    assert view.errors == () and view.identity is not None
    snap = build_snapshot(cluster, "node-a")
    assert view.subject is not None
    rules = snap.policies.jwt_rules(view.subject)
    key = ECKey.import_key((EXAMPLES / "demo-issuer-key.pem").read_bytes())
    now = int(time.time())
    token = jwt.encode({"alg": "ES256", "kid": "demo-1"}, {"iss": "https://issuer.demo.ambit.dev", "sub": "alice",
                                                           "aud": "orders", "exp": now + 60}, key)
    authn = authenticate(rules, {"authorization": f"Bearer {token}"}, "/", now=now)
    assert authn.ok and authn.auth is not None and authn.auth.principal == "https://issuer.demo.ambit.dev/alice"
