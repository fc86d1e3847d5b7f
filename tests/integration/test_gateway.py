"""The ingress gateway in front of a loopback mesh (tests/integration/gateway_rig.py): clients outside
the mesh over real sockets and TLS, the gateway deciding each request, HBONE into the mesh with the
gateway's own identity (a real CA, two ztunnels)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ambit.http import get_json
from tests.integration.gateway_rig import GatewayMesh, gateway_mesh
from tests.integration.http_apps import H1Client, Reply

DENY_NETWORK = 200  # clients from 127.A.B.200/29 are "another network"


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[GatewayMesh]:
    async with gateway_mesh(tmp_path, extra="") as r:
        r.write(extra=f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: networks, namespace: edge}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: ingress}}]
  action: DENY
  rules: [{{from: [{{source: {{remoteIpBlocks: ["{r.mesh.prefix}.{DENY_NETWORK}/29"]}}}}]}}]
""")
        await r.wait(lambda: any(p.name == "networks" for p in r.gw.store.current.policies.authz))
        yield r


async def client(rig: GatewayMesh, *, host: str = "shop.example.com", src: str | None = None,
                 tls: bool = False, sni: str | None = None) -> H1Client:
    addr = rig.https if tls else rig.http
    ctx = None
    if tls:
        ctx = ssl.create_default_context(cadata=rig.ca[1].public_bytes(serialization.Encoding.PEM).decode())
    r, w = await asyncio.open_connection(*addr, local_addr=(src or rig.client_ip(), 0), ssl=ctx,
                                         server_hostname=(sni or host) if tls else None)
    return H1Client(r, w, host)


async def request(rig: GatewayMesh, method: str, path: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"", **kw: Any) -> Reply:
    c = await client(rig, **kw)
    try:
        return await c.request(method, path, body, headers)
    finally:
        c.close()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_the_demo_acts_over_real_sockets(rig: GatewayMesh) -> None:
    src = rig.client_ip()
    c = await client(rig, src=src)
    try:
        assert (await c.request("GET", "/api/v1/orders")).status == 403  # no token
        r = await c.request("GET", "/api/v1/orders", headers=bearer(rig.token(scope="profile")))
        assert (r.status, r.body) == (403, b"RBAC: access denied")  # a token without the scope
        r = await c.request("GET", "/api/v1/orders", headers=bearer(rig.token()[:-3] + "xyz"))
        assert r.status == 401 and "www-authenticate" in r.headers  # a forged token
        ok = await c.request("GET", "/api/v1/orders/7", headers=bearer(rig.token()))
        assert ok.status == 200, ok
        seen = ok.json()
        assert seen["server"] == "v1" and seen["path"] == "/api/v1/orders/7"
        assert seen["headers"]["x-forwarded-for"] == src and seen["headers"]["x-forwarded-proto"] == "http"
        assert "authorization" not in seen["headers"], "the token is not passed on"
        assert ok.headers["ratelimit-limit"] == "3" and ok.headers["ratelimit-remaining"] == "2"
        for _ in range(2):
            assert (await c.request("GET", "/api/v1/orders", headers=bearer(rig.token()))).status == 200
        over = await c.request("GET", "/api/v1/orders", headers=bearer(rig.token()))
        assert over.status == 429 and int(over.headers["retry-after"]) > 0
        assert over.headers["ratelimit-remaining"] == "0" and "3;w=60" in over.headers["ratelimit-policy"]
        # another user has a bucket of their own
        assert (await c.request("GET", "/api/v1/orders", headers=bearer(rig.token(sub="bob")))).status == 200
    finally:
        c.close()
    # from a network the gateway's policy refuses
    r = await request(rig, "GET", "/api/v1/orders", bearer(rig.token(sub="carol")),
                      src=f"{rig.mesh.prefix}.{DENY_NETWORK + 1}")
    assert (r.status, r.body) == (403, b"RBAC: access denied")
    # each request: one access-log line with the client, the JWT's subject and what decided
    log = rig.access_log()
    assert len([e for e in log if e["client_ip"] == src]) == 8
    ok_line = next(e for e in log if e["client_ip"] == src and e["status"] == 200)
    assert ok_line["reporter"] == "gateway" and ok_line["subject"] == "alice"
    assert (ok_line["policy"], ok_line["rule"], ok_line["route"], ok_line["route_rule"]) == (
        "edge/scopes", 2, "store/store", 0)
    assert ok_line["dst_identity"] == "spiffe://cluster.local/ns/store/sa/store" and ok_line["hop"]
    limited = next(e for e in log if e["status"] == 429)
    assert limited["rejection"] == "rate_limited" and limited["rate_limit"] == "store/per-user limit per-user"
    assert next(e for e in log if e["client_ip"].endswith(f".{DENY_NETWORK + 1}"))["policy"] == "edge/networks"


async def test_metrics_count_requests_and_rejections_by_reason(rig: GatewayMesh) -> None:
    assert (await request(rig, "GET", "/api/v1/orders", bearer(rig.token()))).status == 200
    assert (await request(rig, "GET", "/api/v1/orders")).status == 403
    assert (await request(rig, "GET", "/nothing/here", host="nowhere.test")).status == 403
    host, port = rig.gw.addresses["metrics"]
    r, w = await asyncio.open_connection(host, port)
    w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await r.read()).decode()
    w.close()
    requests = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    assert all('reporter="gateway"' in ln for ln in requests) and len(requests) >= 2
    assert any('response_code="200"' in ln and 'destination_service="v1.store.svc.cluster.local"' in ln
               for ln in requests), requests
    rejected = [ln for ln in text.splitlines() if ln.startswith("ambit_gateway_rejections_total{")]
    assert any('reason="denied"' in ln and 'response_code="403"' in ln for ln in rejected), rejected
    # the numbered records the node's agent takes once each (as from a waypoint): on the admin
    # listener (the pod's loopback), not on the metrics one other pods reach
    assert (await get_json(host, port, "/requests?after=1"))[0] == 404
    admin_host, admin_port = rig.gw.addresses["admin"]
    status, report = await get_json(admin_host, admin_port, "/requests?after=1")
    assert status == 200, report
    assert report["last"] == 3 and [x["seq"] for x in report["items"]] == [2, 3]
    assert all(x["gateway"] == "edge/ingress" for x in report["items"])


async def test_https_serves_the_certificate_of_each_hostname(rig: GatewayMesh) -> None:
    for host in ("shop.example.com", "api.example.com"):
        c = await client(rig, host=host, tls=True)
        try:
            der = c.w.get_extra_info("ssl_object").getpeercert(binary_form=True)
            cn = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            assert cn == host
            r = await c.request("GET", "/public/hello")
            assert r.status == 200 and r.json()["headers"]["x-forwarded-proto"] == "https"
        finally:
            c.close()
    # a Host of another listener than the one SNI chose: 421 Misdirected Request
    r = await request(rig, "GET", "/public/x", host="api.example.com", tls=True, sni="shop.example.com")
    assert r.status == 421
    # a name no listener serves: the handshake is refused
    with pytest.raises((ssl.SSLError, ConnectionResetError)):  # TLS 1.3: the alert may arrive as a reset
        await request(rig, "GET", "/", host="unknown.example.com", tls=True)


@pytest.mark.parametrize("raw", [
    b"POST /public/a HTTP/1.1\r\nHost: shop.example.com\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: shop.example.com\r\n\r\n",
    b"GET /public/a HTTP/1.1\r\nHost: shop.example.com\r\nX-A: 1\r\n folded\r\n\r\n",
    b"GET /public/a HTTP/1.1\nHost: shop.example.com\n\n",
    b"GET /public/a HTTP/1.1\r\nHost: shop.example.com\r\nX-A: \x00\r\n\r\n",
], ids=["cl-te", "obs-fold", "bare-lf", "nul"])
async def test_a_smuggling_attempt_is_refused_and_the_connection_closed(rig: GatewayMesh, raw: bytes) -> None:
    r, w = await asyncio.open_connection(*rig.http, local_addr=(rig.client_ip(), 0))
    try:
        w.write(raw)
        got = await asyncio.wait_for(r.read(), 10)  # read() returns at EOF: the gateway closed
        assert got.startswith(b"HTTP/1.1 400 "), got
        assert got.count(b"HTTP/1.1") == 1, "nothing after the 400 was served"
    finally:
        w.close()


async def test_header_filters_as_gateway_api_specifies(rig: GatewayMesh) -> None:
    r = await request(rig, "GET", "/public/p", [("x-secret", "s"), ("x-route", "client"), ("x-added", "0")])
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-route"] == "public", "set replaces the client's value"
    assert "x-secret" not in seen, "remove drops it"
    assert seen.get("x-added") == "0, 1" or seen.get("x-added") == "1"  # add appends (h11 joins repeats)
    assert r.headers["x-app"] == "gateway", "set replaces the backend's value"
    assert r.headers["x-edge"] == "ambit" and "x-internal" not in r.headers


async def test_weighted_backends_hold_their_weights_over_1000_requests(rig: GatewayMesh) -> None:
    c = await client(rig)
    counts = {"v1": 0, "v2": 0}
    try:
        for _ in range(1000):
            r = await c.request("GET", "/weights")
            assert r.status == 200
            counts[r.json()["server"]] += 1
    finally:
        c.close()
    assert 720 <= counts["v1"] <= 880 and counts["v1"] + counts["v2"] == 1000, counts


async def test_cors_preflight_per_the_routes_policy(rig: GatewayMesh) -> None:
    ok = await request(rig, "OPTIONS", "/public/items", [("origin", "https://shop.example.com"),
                                                         ("access-control-request-method", "POST"),
                                                         ("access-control-request-headers", "content-type")])
    assert ok.status == 204 and ok.headers["access-control-allow-origin"] == "https://shop.example.com"
    no = await request(rig, "OPTIONS", "/public/items", [("origin", "https://evil.example"),
                                                         ("access-control-request-method", "POST")])
    assert no.status == 403 and "access-control-allow-origin" not in no.headers
    real = await request(rig, "GET", "/public/items", [("origin", "https://shop.example.com")])
    assert real.status == 200 and real.headers["access-control-allow-origin"] == "https://shop.example.com"


async def test_redirects_timeouts_and_no_route(rig: GatewayMesh) -> None:
    r = await request(rig, "GET", "/any/path?q=1", host="old.example.com")
    assert (r.status, r.headers["location"]) == (301, "https://shop.example.com/any/path?q=1")
    started = time.monotonic()
    r = await request(rig, "GET", "/slow")
    assert r.status == 504 and time.monotonic() - started < 1.8
    r = await request(rig, "GET", "/public-not/x")
    assert r.status == 403, "the scopes policy judges before routing (its /public/* rule does not match)"


async def test_the_backend_admits_only_the_gateway(rig: GatewayMesh) -> None:
    # through the gateway (its identity, ns/edge/sa/ingress): allowed by the store's policy
    assert (await request(rig, "GET", "/public/x")).status == 200
    # a mesh client straight to the same Service: denied by the backend's ztunnel
    vip = f"{rig.mesh.prefix}.211"
    with pytest.raises(ConnectionRefusedError, match="SOCKS5 reply 2"):
        await rig.mesh.socks5_connect("node-a", rig.mesh.pods["shop/client"], vip, 80)
