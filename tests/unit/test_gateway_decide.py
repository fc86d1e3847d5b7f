"""The gateway's pipeline (gateway/decide.py) on examples/50-ingress.yaml, by the real policy engine:
the demo's acts as pure decisions, and the order of the steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from agent.local.cluster import read_manifests
from ambit.cluster import build_state
from ambit.snapshot import build_snapshot
from gateway.decide import Connection, Context, Judgement, decide
from gateway.ratelimit import RateLimiter
from gateway.view import GatewayView, build_view
from waypoint.exchange import Request

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = ECKey.import_key((EXAMPLES / "demo-issuer-key.pem").read_bytes())
ISSUER = "https://issuer.demo.ambit.dev"
PARTNER, STRANGER, OUTSIDE = "10.1.0.9", "10.1.1.10", "192.0.2.7"


def token(scope: str = "read:orders", sub: str = "alice", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": sub, "aud": "orders", "scope": scope, "iat": now, "exp": now + 600, **claims}
    return str(jwt.encode({"alg": "ES256", "kid": "demo-1"}, body, KEY))


def gateway_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ingress-gateway", "namespace": "edge",
                         "labels": {"gateway.networking.k8s.io/gateway-name": "ingress",
                                    "ambit.dev/dataplane-mode": "none"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "ingress"},
            "status": {"podIP": "10.1.0.20", "phase": "Running"}}


def objects(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    objs = [o for o in read_manifests([EXAMPLES]) if o["metadata"].get("namespace") in (None, "edge", "orders",
                                                                                        "internet")]
    ips = {"orders": "10.1.1.8", "partner": PARTNER, "stranger": STRANGER}
    for i, o in enumerate(objs):
        if o["kind"] == "Pod":
            o["status"] = {"podIP": ips[o["metadata"]["name"]], "phase": "Running"}
        if o["kind"] == "Service":
            o["spec"].setdefault("clusterIP", f"10.96.0.{10 + i}")
    nodes = [{"kind": "Node", "metadata": {"name": n}, "status": {"addresses": [{"type": "InternalIP", "address": a}]}}
             for n, a in (("node-a", "10.200.1.10"), ("node-b", "10.200.1.11"))]
    return [*objs, *nodes, gateway_pod(), *(extra or [])]


class Rig:
    def __init__(self, extra: list[dict[str, Any]] | None = None) -> None:
        cluster = build_state(objects(extra))
        self.snap = build_snapshot(cluster, "node-a")
        self.view: GatewayView = build_view(cluster, "edge", "ingress")
        self.ctx = Context(RateLimiter())
        self.mono = 1000.0

    def __call__(self, method: str, target: str, headers: list[tuple[str, str]] | None = None, *,
                 peer: str = PARTNER, host: str = "shop.example.com", port: int = 80, tls: bool = False,
                 sni: str | None = None) -> Judgement:
        path, _, query = target.partition("?")
        hs = [(n.lower(), v) for n, v in (headers or [])]
        req = Request(method, "https" if tls else "http", host, target, path, query if "?" in target else None,
                      hs, "HTTP/1.1")
        self.mono += 0.001
        return decide(self.view, self.snap, Connection(peer, port, tls, sni), req, self.ctx, now=time.time(),
                      mono=self.mono)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def bearer(t: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {t}")]


def test_the_example_compiles_without_errors(rig: Rig) -> None:
    assert rig.snap.errors == () and rig.view.errors == ()
    assert rig.view.gateway is not None and list(rig.view.gateway.ports) == [80]
    assert [r.uid for r in rig.view.routes["http"]] == ["orders/orders"]
    assert str(rig.view.identity) == "spiffe://cluster.local/ns/edge/sa/ingress"
    assert [rl.uid for rl in rig.view.rate_limits] == ["orders/orders-per-user"]


def test_the_demo_acts(rig: Rig) -> None:
    # no token: the scopes policy needs a principal
    j = rig("GET", "/api/v1/orders")
    assert (j.status, j.rejection, j.policy) == (403, "denied", None)
    # a token without the scope
    j = rig("GET", "/api/v1/orders", bearer(token(scope="profile")))
    assert (j.status, j.rejection) == (403, "denied")
    # an invalid token: 401 with a challenge
    j = rig("GET", "/api/v1/orders", bearer(token()[:-4] + "AAAA"))
    assert j.status == 401 and j.rejection == "jwt_invalid" and dict(j.headers)["www-authenticate"]
    # the right token: forwarded to orders, with the scopes policy's rule named
    j = rig("GET", "/api/v1/orders/7", bearer(token()))
    assert j.action == "forward" and j.backend is not None and j.backend.uid == "orders/orders"
    assert (j.policy, j.policy_rule, j.request_principal, j.subject) == (
        "edge/orders-scopes", 0, f"{ISSUER}/alice", "alice")
    assert j.route == "orders/orders" and j.rule == 0
    assert ("x-edge", "ingress") in j.add_headers and "authorization" in j.remove_headers
    assert dict(j.add_response_headers)["ratelimit-remaining"] == "4"
    # POST needs write:orders
    assert rig("POST", "/api/v1/orders", [*bearer(token()), ("content-type", "application/json"),
                                          ("content-length", "2")]).status == 403
    both = token(scope="read:orders write:orders", sub="bob")
    assert rig("POST", "/api/v1/orders", [*bearer(both), ("content-type", "application/json"),
                                          ("content-length", "2")]).action == "forward"
    # over the limit: alice had 1 of her 5
    for _ in range(4):
        assert rig("GET", "/api/v1/orders", bearer(token())).action == "forward"
    j = rig("GET", "/api/v1/orders", bearer(token()))
    h = dict(j.headers)
    assert (j.status, j.rejection, j.limit) == (429, "rate_limited", "orders/orders-per-user limit per-user")
    assert (j.policy, j.policy_rule, j.allowed_by) == ("orders/orders-per-user", None, "edge/orders-scopes rule 0")
    assert int(h["retry-after"]) >= 1 and h["ratelimit-remaining"] == "0" and h["ratelimit-limit"] == "5"
    assert "5;w=60" in h["ratelimit-policy"]
    # bob has his own bucket
    assert rig("GET", "/api/v1/orders", bearer(both)).action == "forward"
    # from outside the private network: denied by the DENY policy, before anything else
    j = rig("GET", "/api/v1/orders", bearer(token(sub="carol")), peer=OUTSIDE)
    assert (j.status, j.policy) == (403, "edge/edge-networks")


def test_rate_limits_refill_with_time(rig: Rig) -> None:
    t = token(sub="dave")
    assert all(rig("GET", "/api/v1/orders", bearer(t)).action == "forward" for _ in range(5))
    assert rig("GET", "/api/v1/orders", bearer(t)).status == 429
    rig.mono += 12.0  # 5 per 60 s: one token per 12 s
    assert rig("GET", "/api/v1/orders", bearer(t)).action == "forward"
    assert rig("GET", "/api/v1/orders", bearer(t)).status == 429


def test_cors_preflight_is_answered_before_authentication(rig: Rig) -> None:
    ok = rig("OPTIONS", "/api/v1/orders", [("origin", "https://shop.example.com"),
                                           ("access-control-request-method", "POST"),
                                           ("access-control-request-headers", "Authorization, Content-Type")])
    h = dict(ok.headers)
    assert ok.status == 204 and h["access-control-allow-origin"] == "https://shop.example.com"
    assert h["access-control-allow-headers"] == "authorization, content-type" and h["access-control-max-age"] == "600"
    bad = rig("OPTIONS", "/api/v1/orders", [("origin", "https://evil.example"),
                                            ("access-control-request-method", "GET")])
    assert bad.status == 403 and "access-control-allow-origin" not in dict(bad.headers)
    assert rig("OPTIONS", "/api/v1/orders", [("origin", "https://shop.example.com"),
                                             ("access-control-request-method", "DELETE")]).status == 403
    # an actual request from the allowed origin gets the CORS headers on its response
    j = rig("GET", "/api/v1/orders", [*bearer(token(sub="erin")), ("origin", "https://shop.example.com")])
    assert ("access-control-allow-origin", "https://shop.example.com") in j.add_response_headers
    # the filter owns the CORS response headers: the backend's are removed whatever the origin,
    # so a backend echoing any origin cannot widen the route's filter (review 14, finding 13)
    evil = rig("GET", "/api/v1/orders", [*bearer(token(sub="erin")), ("origin", "https://evil.example")])
    assert evil.action == "forward" and not any(n.startswith("access-control-") for n, _ in evil.add_response_headers)
    for judged in (j, evil):
        assert {"access-control-allow-origin", "access-control-allow-credentials"} <= set(judged.remove_response_headers)


def test_input_validation(rig: Rig) -> None:
    w = token(scope="write:orders", sub="frank")
    j = rig("POST", "/api/v1/orders", [*bearer(w), ("content-type", "text/plain"), ("content-length", "3")])
    assert (j.status, j.rejection, j.policy, j.policy_rule) == (415, "unsupported_media_type", "orders/orders", 0)
    assert rig("POST", "/api/v1/orders", [*bearer(w), ("content-type", "application/json; charset=utf-8"),
                                          ("content-length", str(64 * 1024 + 1))]).status == 413
    j = rig("POST", "/api/v1/orders", [*bearer(w), ("content-type", "application/json"), ("content-length", "9")])
    assert j.action == "forward" and j.max_body == 64 * 1024


def test_no_route_is_404_after_policy(rig: Rig) -> None:
    j = rig("GET", "/admin", bearer(token(sub="gina")))
    assert j.status == 403, "the scopes policy judges before routing, as Istio's gateways do"
    assert rig("GET", "/", peer=OUTSIDE).policy == "edge/edge-networks"


def test_numtrustedproxies_takes_the_trusted_hop() -> None:
    extra = build_gateway_annotation({"ambit.dev/num-trusted-proxies": "1"})
    rig = Rig(extra)
    # through a trusted proxy at 10.1.0.9: the client is what the proxy saw
    j = rig("GET", "/api/v1/orders", [*bearer(token(sub="hal")), ("x-forwarded-for", f"1.2.3.4, {OUTSIDE}")])
    assert j.client_ip == OUTSIDE and j.status == 403 and j.policy == "edge/edge-networks"
    j = rig("GET", "/api/v1/orders", [*bearer(token(sub="hal")), ("x-forwarded-for", "10.9.9.9")])
    assert j.client_ip == "10.9.9.9" and j.action == "forward"
    assert ("x-forwarded-for", f"10.9.9.9, {PARTNER}") in j.add_headers


def build_gateway_annotation(annotations: dict[str, str]) -> list[dict[str, Any]]:
    gw = next(o for o in read_manifests([EXAMPLES / "50-ingress.yaml"]) if o["kind"] == "Gateway")
    gw["metadata"]["annotations"].update(annotations)
    return [gw]


def _class_policy(kind: str, name: str, class_name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": "istio-system"},
            "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "GatewayClass",
                                     "name": class_name}], **spec}}


@pytest.mark.parametrize("waypoint_class", ["istio-waypoint", "ambit-waypoint"])
def test_policies_for_the_waypoint_classes_never_apply_at_the_ingress_gateway(waypoint_class: str) -> None:
    # review 14: the gateway's subject was judged as a waypoint, so a mesh-wide ALLOW for the
    # waypoints' class widened access at the edge, and a JWT rule for them applied there
    reads = _class_policy("AuthorizationPolicy", "waypoints-allow-reads", waypoint_class,
                          {"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    jwt = _class_policy("RequestAuthentication", "waypoints-jwt", waypoint_class,
                        {"jwtRules": [{"issuer": "https://other.example", "jwks": '{"keys": []}'}]})
    rig = Rig([reads, jwt])
    j = rig("GET", "/api/v1/orders")
    assert (j.status, j.rejection) == (403, "denied") and j.policy != "istio-system/waypoints-allow-reads"
    assert rig.view.subject is not None
    assert all(r.issuer == ISSUER for r in rig.snap.policies.jwt_rules(rig.view.subject))
    # a workload at its waypoint still gets them
    w = next(w for w in rig.snap.workloads.values() if w.uid == "orders/orders")
    assert "istio-system/waypoints-allow-reads" in [p.ref for p in rig.snap.policies.applicable(w, at_waypoint=True)]


def test_a_policy_for_the_ingress_class_applies_at_the_ingress_gateway() -> None:
    deny = _class_policy("AuthorizationPolicy", "ingress-deny-delete", "ambit-ingress",
                         {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/api/v1/orders/secret"]}}]}]})
    rig = Rig([deny])
    j = rig("GET", "/api/v1/orders/secret", bearer(token(sub="ivy")))
    assert (j.status, j.policy) == (403, "istio-system/ingress-deny-delete")
    w = next(w for w in rig.snap.workloads.values() if w.uid == "orders/orders")
    assert "istio-system/ingress-deny-delete" not in [p.ref for p in rig.snap.policies.applicable(w, at_waypoint=True)]


def test_repeated_credentials_are_judged_together() -> None:
    # review 14: only the last Authorization (and Cookie) was checked: a forged bearer token
    # followed by `Authorization: Basic ...` skipped JWT and reached the backend
    public = [
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "public", "namespace": "edge"},
         "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"}],
                  "action": "ALLOW", "rules": [{"to": [{"operation": {"paths": ["/api/v1/orders/public"]}}]}]}}]
    rig = Rig(public)
    forged = token(sub="admin")[:-6] + "AAAAAA"
    assert rig("GET", "/api/v1/orders/public", bearer(forged)).status == 401
    j = rig("GET", "/api/v1/orders/public", [*bearer(forged), ("authorization", "Basic Zm9v")])
    assert (j.action, j.status, j.rejection) == ("answer", 401, "jwt_invalid")
    j = rig("GET", "/api/v1/orders", [*bearer(forged), *bearer(token(sub="jo"))])
    assert j.action == "answer" and j.request_principal is None


def test_joined_is_the_one_view_both_proxies_check() -> None:
    from waypoint.headers import joined

    assert joined([("a", "1"), ("cookie", "s=1"), ("A-B", "x"), ("a", "2"), ("cookie", "t=2")]) == {
        "a": "1, 2", "cookie": "s=1; t=2", "A-B": "x"}
    r = Request("GET", "http", "h", "/", "/", None, [("cookie", "s=1"), ("cookie", "t=2")], "HTTP/2")
    assert r.header("Cookie") == "s=1; t=2"


def test_allowed_content_types_hold_for_http2_bodies(rig: Rig) -> None:
    # review 14: HTTP/2 frames its body without Content-Length or Transfer-Encoding, so a POST of
    # text/xml in DATA frames skipped allowed-content-types
    w = bearer(token(scope="write:orders", sub="kim"))
    req = Request("POST", "http", "shop.example.com", "/api/v1/orders", "/api/v1/orders", None,
                  [*w, ("content-type", "text/xml")], "HTTP/2", 1, True)
    j = decide(rig.view, rig.snap, Connection(PARTNER, 80, False), req, rig.ctx, now=time.time(), mono=2000.0)
    assert (j.status, j.rejection) == (415, "unsupported_media_type")


def test_tls_with_an_unknown_handshake_listener_is_misdirected(rig: Rig) -> None:
    # review 14: after a certificate context rebuild the handshake's listener is unknown (None),
    # and the Host/SNI check let any Host through (domain fronting across listeners)
    j = rig("GET", "/api/v1/orders", bearer(token(sub="lee")), tls=True, sni=None)
    assert (j.status, j.rejection) == (421, "misdirected")
    assert rig("GET", "/api/v1/orders", tls=True, sni="other").status == 421
    assert rig("GET", "/api/v1/orders", bearer(token(sub="lee")), tls=True, sni="http").action == "forward"


def test_a_dry_run_policy_at_the_edge_is_reported_not_enforced() -> None:
    # review 14: the gateway left dry-run policies out (right) but reported nothing of them
    deny = _class_policy("AuthorizationPolicy", "ingress-deny-orders", "ambit-ingress",
                         {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/api/v1/orders*"]}}]}]})
    deny["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    rig = Rig([deny])
    j = rig("GET", "/api/v1/orders", bearer(token(sub="ivy")))
    assert j.action == "forward"
    assert [(x.policy, x.decision) for x in j.dry_run] == [("istio-system/ingress-deny-orders", "deny")]


def test_a_pod_labelled_for_the_gateway_under_another_account_does_not_make_its_identity() -> None:
    # the gateway's identity is the service account named after its Gateway, as a waypoint's:
    # a pod carrying the label but running as another account neither names nor takes it
    impostor = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "aaa-impostor", "namespace": "edge",
                             "labels": {"gateway.networking.k8s.io/gateway-name": "ingress"}},
                "spec": {"nodeName": "node-a", "serviceAccountName": "aaa"},
                "status": {"podIP": "10.99.0.9", "phase": "Running"}}
    rig = Rig([impostor])
    assert str(rig.view.identity) == "spiffe://cluster.local/ns/edge/sa/ingress"
    assert rig.view.subject is not None and rig.view.subject.ip != "10.99.0.9"
    assert any("aaa-impostor" in e and "does not serve the gateway" in e for e in rig.view.errors)


def test_a_forged_x_forwarded_for_does_not_move_the_client(rig: Rig) -> None:
    # numTrustedProxies 0 (the example's): a client outside the allowed network naming a partner
    # address in X-Forwarded-For is still judged by its TCP peer address
    j = rig("GET", "/api/v1/orders", [*bearer(token(sub="ivy")), ("x-forwarded-for", PARTNER)], peer=OUTSIDE)
    assert (j.client_ip, j.status, j.policy) == (OUTSIDE, 403, "edge/edge-networks")
    # and with one trusted proxy, fewer hops than trusted: the peer, not a forged first hop
    one = Rig(build_gateway_annotation({"ambit.dev/num-trusted-proxies": "1"}))
    j = one("GET", "/api/v1/orders", bearer(token(sub="ivy")), peer=OUTSIDE)
    assert (j.client_ip, j.status) == (OUTSIDE, 403)
