"""A waypoint between two loopback ztunnels: L7 policy per request, JWT, telemetry and tracing.

  node-a: pay/orders (client), pay/wp-waypoint (the waypoint of Gateway pay/wp), shop/client
  node-b: pay/charges (the app, HTTP/1.1 and HTTP/2), service pay/charges -> charges:8080

Namespace pay uses waypoint wp (for services, Istio's default). The clients reach the
app through their node's SOCKS5 listener, as an enrolled pod's connect would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.integration.http_apps import H1Client, H2Client, http_app
from tests.integration.ztunnel_harness import Mesh, loopback_mesh, pod_yaml, service_yaml
from waypoint.server import Waypoint, WaypointConfig
from ztunnel.config import Listen, Timeouts

ISSUER = "https://issuer.example"


CHARGES_L7 = f"""
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/pay/sa/orders]}}}}]
    to: [{{operation: {{methods: [POST], paths: [/api/v1/charges*]}}}}]
  - to: [{{operation: {{methods: [GET], paths: [/health]}}}}]
    when: [{{key: "request.headers[x-probe]", values: ["yes"]}}]
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    to: [{{operation: {{paths: [/jwt/*]}}}}]
"""
# an L4-only policy: only the RequestAuthentication needs HTTP
CHARGES_L4 = """
  rules:
  - from: [{source: {namespaces: [pay]}}]
"""


def cluster_yaml(prefix: str, jwks: str, charges: str = CHARGES_L7) -> str:
    return f"""
---
apiVersion: v1
kind: Namespace
metadata: {{name: pay, labels: {{ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: pay}}
spec: {{gatewayClassName: ambit-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: charges, namespace: pay}}
spec:
  selector: {{matchLabels: {{app: charges}}}}
  action: ALLOW{charges}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: pay}}
spec:
  selector: {{matchLabels: {{app: charges}}}}
  jwtRules:
  - issuer: "{ISSUER}"
    jwks: '{jwks}'
    outputPayloadToHeader: x-jwt-payload
""" + pod_yaml("pay", "orders", "node-a", "orders", f"{prefix}.61") \
        + pod_yaml("pay", "wp-waypoint", "node-a", "wp", f"{prefix}.50",
                   {"gateway.networking.k8s.io/gateway-name": "wp", "ambit.dev/dataplane-mode": "none"}) \
        + pod_yaml("pay", "charges", "node-b", "charges", f"{prefix}.60", {"app": "charges"}) \
        + service_yaml("pay", "charges", f"{prefix}.210", {"app": "charges"}, 80, 8080)


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC trace receiver (the real TraceService wire)."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@dataclass
class Rig:
    mesh: Mesh
    wp: Waypoint
    key: RSAKey
    jwks: str
    traces: TraceReceiver
    tmp: Path

    @property
    def vip(self) -> str:
        return f"{self.mesh.prefix}.210"

    async def h1(self, src: str) -> H1Client:
        node = "node-a"
        r, w = await self.mesh.socks5_connect(node, src, self.vip, 80)
        return H1Client(r, w, "charges.pay.svc.cluster.local")

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 300, **claims}
        return str(jwt.encode({"alg": "RS256", "kid": "k1"}, body, self.key))

    def access_log(self) -> list[dict[str, Any]]:
        path = self.tmp / "waypoint.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    key = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048), {"kid": "k1"})
    jwks = json.dumps({"keys": [key.as_dict(private=False) | {"kid": "k1", "alg": "RS256"}]})
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    prefix_holder: dict[str, str] = {}
    try:
        async with loopback_mesh(tmp_path, extra_yaml="") as mesh:
            prefix_holder["p"] = mesh.prefix
            mesh.write("pay", cluster_yaml(mesh.prefix, jwks))
            for node in ("node-a", "node-b"):
                zt = mesh.ztunnels[node]
                for _ in range(200):
                    if zt.store.current.waypoint("pay", "wp") is not None:
                        break
                    await asyncio.sleep(0.05)
            wp_addr = f"{mesh.prefix}.50"
            cfg = WaypointConfig(
                namespace="pay", gateway="wp", node="node-a", cluster=f"local:{mesh.cluster_dir}",
                ca_address=f"127.0.0.1:{mesh.ca.port}", credential_dir=mesh.credential_dir("node-a"),
                hbone=Listen(wp_addr, 15008), metrics=Listen(wp_addr, 0), readiness=None,
                admin=Listen("127.0.0.1", 0), access_log=str(tmp_path / "waypoint.log"),
                state_dir=tmp_path / "wp-state", otlp_endpoint=f"127.0.0.1:{otlp_port}",
                timeouts=Timeouts(connect=2.0, cert=5.0, pool_idle=30.0, drain=2.0),
                peer_hbone_ports={mesh.nodes["node-b"]: 15008},
            )
            wp = Waypoint(cfg)
            await wp.start()
            try:
                for _ in range(200):
                    if wp.readiness()[0]:
                        break
                    await asyncio.sleep(0.05)
                assert wp.readiness()[0], wp.readiness()
                await mesh.wait_ready("node-a")
                await mesh.wait_ready("node-b")
                async with http_app(f"{mesh.prefix}.60", 8080):
                    yield Rig(mesh, wp, key, jwks, receiver, tmp_path)
            finally:
                await wp.stop()
    finally:
        server.stop(0)


async def test_requests_are_decided_one_by_one_on_a_keep_alive_connection(rig: Rig) -> None:
    orders = f"{rig.mesh.prefix}.61"
    c = await rig.h1(orders)
    try:
        ok = await c.request("POST", "/api/v1/charges", b'{"amount": 5}')
        assert ok.status == 200, ok
        seen = ok.json()
        assert seen["path"] == "/api/v1/charges" and seen["body"] == 13
        # the app sees the original client's address, and the trace context
        assert seen["x-forwarded-for"] == orders and seen["forwarded"] == f"for={orders}"
        assert seen["traceparent"] and seen["traceparent"].startswith("00-")
        denied = await c.request("GET", "/api/v1/charges")
        assert denied.status == 403 and denied.body == b"RBAC: access denied"
        again = await c.request("POST", "/api/v1/charges/refund")
        assert again.status == 200, "the denial closed the keep-alive connection"
        # paths are normalized before matching: //api/v1/./charges is /api/v1/charges
        assert (await c.request("POST", "//api/v1/./charges")).status == 200
        assert (await c.request("POST", "/api/v1/charges/..%2F..%2Fadmin")).status == 400
    finally:
        c.close()


async def test_a_wrong_principal_and_a_header_condition(rig: Rig) -> None:
    other = await rig.mesh.socks5_connect("node-a", rig.mesh.pods["shop/client"], rig.vip, 80)
    c = H1Client(*other, "charges.pay.svc.cluster.local")
    try:
        assert (await c.request("POST", "/api/v1/charges")).status == 403
        assert (await c.request("GET", "/health", headers=[("x-probe", "yes")])).status == 200
        assert (await c.request("GET", "/health", headers=[("x-probe", "no")])).status == 403
    finally:
        c.close()


async def test_http2_prior_knowledge_is_decided_per_stream(rig: Rig) -> None:
    r, w = await rig.mesh.socks5_connect("node-a", f"{rig.mesh.prefix}.61", rig.vip, 80)
    c = H2Client(r, w, "charges.pay.svc.cluster.local")
    try:
        assert (await c.request("POST", "/api/v1/charges", b"x")).status == 200
        assert (await c.request("GET", "/api/v1/charges")).status == 403
        assert (await c.request("POST", "/api/v1/charges")).status == 200
    finally:
        c.close()


async def test_jwt_valid_missing_expired_and_foreign(rig: Rig) -> None:
    c = await rig.h1(rig.mesh.pods["shop/client"])
    try:
        ok = await c.request("GET", "/jwt/me", headers=[("authorization", f"Bearer {rig.token()}")])
        assert ok.status == 200, ok
        assert ok.json()["authorization"] is None, "the token is not passed on (forwardOriginalToken false)"
        assert (await c.request("GET", "/jwt/me")).status == 403  # no token: the policy needs a principal
        expired = rig.token(exp=int(time.time()) - 3600)
        r = await c.request("GET", "/jwt/me", headers=[("authorization", f"Bearer {expired}")])
        assert r.status == 401 and b"expired" in r.body.lower() and "www-authenticate" in r.headers
        foreign = str(jwt.encode({"alg": "RS256", "kid": "k1"}, {"iss": "https://other", "sub": "x"}, rig.key))
        assert (await c.request("GET", "/jwt/me", headers=[("authorization", f"Bearer {foreign}")])).status == 401
    finally:
        c.close()


async def test_the_pod_cannot_be_reached_around_the_waypoint(rig: Rig) -> None:
    # a waypoint for services: pod-IP traffic goes to the pod's ztunnel, which admits only the waypoint
    _, w = await rig.mesh.socks5_connect("node-a", f"{rig.mesh.prefix}.61", f"{rig.mesh.prefix}.60", 8080,
                                         expect=2)  # SOCKS5 "not allowed by ruleset": the peer answered 401
    w.close()


async def test_metrics_access_log_and_spans(rig: Rig) -> None:
    c = await rig.h1(f"{rig.mesh.prefix}.61")
    try:
        assert (await c.request("POST", "/api/v1/charges")).status == 200
        assert (await c.request("GET", "/api/v1/charges")).status == 403
    finally:
        c.close()
    host, port = rig.wp.addresses["metrics"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    codes = {ln.split('response_code="')[1].split('"')[0] for ln in lines}
    assert {"200", "403"} <= codes, lines
    assert all('reporter="waypoint"' in ln and 'destination_workload="charges"' in ln for ln in lines), lines
    assert any('source_principal="spiffe://cluster.local/ns/pay/sa/orders"' in ln for ln in lines), lines
    # one access-log line per request, naming the deciding policy and the trace
    log = [e for e in rig.access_log() if e["path"] == "/api/v1/charges"]
    allowed = [e for e in log if e["status"] == 200][-1]
    denied = [e for e in log if e["status"] == 403][-1]
    assert allowed["policy"] == "pay/charges" and allowed["rule"] == 0 and allowed["trace_id"]
    assert denied["decision"] == "deny" and denied["src_identity"].endswith("/sa/orders")
    # the spans reach the OTLP receiver over gRPC, with the security facts
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(rig.traces.spans) < 2:
        await asyncio.sleep(0.1)
    attrs = [{a.key: a.value for a in s.attributes} for s in rig.traces.spans]
    decisions = {a["ambit.decision"].string_value for a in attrs if "ambit.decision" in a}
    assert {"allow", "deny"} <= decisions, attrs
    assert any(a.get("ambit.source.principal") and "orders" in a["ambit.source.principal"].string_value
               for a in attrs)


async def test_with_the_waypoint_down_traffic_is_refused(rig: Rig) -> None:
    await rig.wp.stop()
    with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
        c = await rig.h1(f"{rig.mesh.prefix}.61")
        await c.request("POST", "/api/v1/charges")


async def test_traffic_that_is_not_http_is_denied_where_http_rules_apply(rig: Rig) -> None:
    r, w = await rig.mesh.socks5_connect("node-a", f"{rig.mesh.prefix}.61", rig.vip, 80)
    w.write(b"\x00\x01 this is no HTTP request\r\n\r\n")
    await w.drain()
    assert await asyncio.wait_for(r.read(), 10) == b"", "opaque bytes reached the app"
    w.close()
    entry = [e for e in rig.access_log() if e["protocol"] == "tcp"][-1]
    assert entry["decision"] == "deny" and "rules that need HTTP apply" in entry["reason"], entry
    # and in the records `ambit flows` and the node's history take
    last = list(rig.wp.recent)[-1]
    assert last["protocol"] == "tcp" and last["decision"] == "deny" and last["dst_port"] == 8080, last


async def test_a_repeated_header_is_judged_by_all_its_values(rig: Rig) -> None:
    # the app may read the first x-probe ("no"); the policy must not judge only the last
    other = await rig.mesh.socks5_connect("node-a", rig.mesh.pods["shop/client"], rig.vip, 80)
    c = H1Client(*other, "charges.pay.svc.cluster.local")
    try:
        probes = [("x-probe", "no"), ("x-probe", "yes")]
        assert (await c.request("GET", "/health", headers=probes)).status == 403
    finally:
        c.close()


async def test_x_forwarded_for_ends_with_the_client_the_mesh_verified(rig: Rig) -> None:
    c = await rig.h1(f"{rig.mesh.prefix}.61")
    try:
        seen = (await c.request("POST", "/api/v1/charges", headers=[("x-forwarded-for", "6.6.6.6")])).json()
        # the waypoint appends the address it vouches for: the last hop is the real client
        assert seen["x-forwarded-for"] == f"6.6.6.6, {rig.mesh.prefix}.61", seen
    finally:
        c.close()


async def _raw(rig: Rig, *parts: bytes, pause: float = 0.0) -> bytes:
    r, w = await rig.mesh.socks5_connect("node-a", f"{rig.mesh.prefix}.61", rig.vip, 80)
    try:
        for n, part in enumerate(parts):
            if n:
                await asyncio.sleep(pause)
            w.write(part)
            await w.drain()
        return await asyncio.wait_for(r.read(65536), 10)
    finally:
        w.close()


async def test_http_sent_slowly_or_oddly_does_not_skip_the_jwt_checks(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import waypoint.server

    monkeypatch.setattr(waypoint.server, "SNIFF_TIMEOUT", 0.2)
    rig.mesh.write("pay", cluster_yaml(rig.mesh.prefix, rig.jwks, CHARGES_L4))
    charges = rig.wp.store.current.workload("pay/charges")
    assert charges is not None
    for _ in range(200):  # the waypoint has the L4-only policy
        pols = rig.wp.store.current.policies.applicable(charges, at_waypoint=True)
        if all(not r.l7_fields for p in pols for r in p.rules):
            break
        await asyncio.sleep(0.05)
    forged = (b"Host: charges\r\nx-jwt-payload: eyJzdWIiOiJhZG1pbiJ9\r\n"
              b"authorization: Bearer not.a.jwt\r\n\r\n")
    # sent at once, the request is HTTP: the bad token is refused
    assert (await _raw(rig, b"GET / HTTP/1.1\r\n" + forged)).startswith(b"HTTP/1.1 401")
    # sent too slowly to be recognized, it is opaque, and opaque is refused where a
    # RequestAuthentication applies (it would pass around the token check and header cleaning)
    assert await _raw(rig, b"GET / HT", b"TP/1.1\r\n" + forged, pause=0.5) == b""
    entry = [e for e in rig.access_log() if e["protocol"] == "tcp"][-1]
    assert entry["decision"] == "deny" and "pay/jwt jwtRules[0]" in entry["reason"], entry
    # empty lines before the request line are HTTP/1 (answered 400), not opaque
    assert (await _raw(rig, b"\r\nGET / HTTP/1.1\r\n" + forged)).startswith(b"HTTP/1.1 400")
    # a CORS preflight is not checked for a token, but its forged claim headers are removed
    reply = await _raw(rig, b"OPTIONS / HTTP/1.1\r\norigin: https://a.example\r\n"
                            b"access-control-request-method: GET\r\nHost: charges\r\n"
                            b"x-jwt-payload: eyJzdWIiOiJhZG1pbiJ9\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["x-jwt-payload"] is None
