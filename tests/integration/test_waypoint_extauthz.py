"""CUSTOM policies at a waypoint: an HTTP and a gRPC external authorizer, a provider that is not
configured, one that does not answer; and dry-run policies, decided per request and never enforced.

  node-a: pay/orders (client), pay/wp-waypoint, pay/authz (the HTTP authorizer, Service authz:9000)
  node-b: pay/charges (the app), Service charges:80

The gRPC authorizer's messages are compiled here from a subset of Envoy's protos
(envoy/service/auth/v3, same field numbers), so the waypoint's hand-written encoding is
checked against the real protobuf runtime.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h11
import pytest

from tests.integration.http_apps import H1Client, http_app
from tests.integration.test_waypoint import CHARGES_L4, cluster_yaml
from tests.integration.ztunnel_harness import Mesh, loopback_mesh, pod_yaml, service_yaml
from waypoint.extauthz import GRPC_METHOD, parse_mesh_config
from waypoint.server import Waypoint, WaypointConfig
from ztunnel.config import Listen, Timeouts

# A subset of envoy/service/auth/v3 (external_auth.proto, attribute_context.proto) and the
# messages they use, with Envoy's field numbers.
AUTH_PROTO = """
syntax = "proto3";
package ambit.test.auth;
message SocketAddress { string address = 2; uint32 port_value = 3; }
message Address { SocketAddress socket_address = 1; }
message Peer { Address address = 1; string principal = 4; }
message Timestamp { int64 seconds = 1; int32 nanos = 2; }
message HttpRequest {
  string method = 2; map<string, string> headers = 3; string path = 4; string host = 5;
  string scheme = 6; int64 size = 9; string protocol = 10;
}
message Request { Timestamp time = 1; HttpRequest http = 2; }
message AttributeContext { Peer source = 1; Peer destination = 2; Request request = 4; }
message CheckRequest { AttributeContext attributes = 1; }
message Status { int32 code = 1; string message = 2; }
message HttpStatus { int32 code = 1; }
message HeaderValue { string key = 1; string value = 2; }
message HeaderValueOption { HeaderValue header = 1; }
message DeniedHttpResponse { HttpStatus status = 1; repeated HeaderValueOption headers = 2; string body = 3; }
message OkHttpResponse { repeated HeaderValueOption headers = 2; repeated string headers_to_remove = 5; }
message CheckResponse { Status status = 1; DeniedHttpResponse denied_response = 2; OkHttpResponse ok_response = 3; }
"""


def compile_auth_proto(tmp: Path) -> Any:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    (tmp / "ambit_test_auth.proto").write_text(AUTH_PROTO)
    assert protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", str(tmp / "ambit_test_auth.proto")]) == 0
    sys.path.insert(0, str(tmp))
    try:
        return importlib.import_module("ambit_test_auth_pb2")
    finally:
        sys.path.remove(str(tmp))


POLICIES = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: CUSTOM
  provider: {name: http-authz}
  rules: [{to: [{operation: {paths: ["/ext/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: CUSTOM
  provider: {name: grpc-authz}
  rules: [{to: [{operation: {paths: ["/grpc/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: unknown, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: CUSTOM
  provider: {name: not-configured}
  rules: [{to: [{operation: {paths: ["/none/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: strict, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: CUSTOM
  provider: {name: http-authz-open}
  rules: [{to: [{operation: {paths: ["/strict/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: silent, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: CUSTOM
  provider: {name: down}
  rules: [{to: [{operation: {paths: ["/down/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lenient, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: CUSTOM
  provider: {name: down-open}
  rules: [{to: [{operation: {paths: ["/open/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry, namespace: pay, annotations: {istio.io/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: charges}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/dry/*"]}}]}]
"""


def mesh_config(grpc_port: int, closed_port: int) -> str:
    return f"""
extensionProviders:
- name: http-authz
  envoyExtAuthzHttp:
    service: authz.pay.svc.cluster.local
    port: "9000"
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-allow]
    headersToUpstreamOnAllow: [x-authz-user]
    headersToDownstreamOnDeny: [x-why]
    timeout: 2s
- name: http-authz-open
  envoyExtAuthzHttp:
    service: authz.pay.svc.cluster.local
    port: "9000"
    pathPrefix: /check
    failOpen: true
    timeout: 2s
- name: grpc-authz
  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: {grpc_port}, timeout: 2s}}
- name: down
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {closed_port}, statusOnError: "503", timeout: 1s}}
- name: down-open
  envoyExtAuthzHttp: {{service: 127.0.0.1, port: {closed_port}, failOpen: true, timeout: 1s,
                      headersToUpstreamOnAllow: [x-authz-user]}}
- name: tracing
  zipkin: {{service: zipkin.istio-system.svc.cluster.local, port: 9411}}
"""


@dataclass
class Authorizers:
    """What the two authorizers were asked."""

    http: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, target, headers
    grpc: list[Any] = field(default_factory=list)  # CheckRequests


async def http_authorizer(host: str, port: int, seen: Authorizers) -> asyncio.Server:
    """200 (with x-authz-user) when the request carries x-allow: yes, else 403 with x-why."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await r.read(65536))
                continue
            if isinstance(ev, h11.Request):
                headers = {k.decode().lower(): v.decode() for k, v in ev.headers}
                seen.http.append((ev.method.decode(), ev.target.decode(), headers))
                if headers.get("x-allow") == "yes":
                    resp = h11.Response(status_code=200, headers=[("x-authz-user", "alice"), ("content-length", "0")])
                    body = b""
                else:
                    body = b"nope"
                    resp = h11.Response(status_code=403, headers=[("x-why", "no x-allow"), ("x-other", "hidden"),
                                                                  ("content-length", "4")])
                w.write(conn.send(resp) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                await w.drain()
                w.close()
                return
            if isinstance(ev, h11.ConnectionClosed):
                return

    return await asyncio.start_server(handle, host, port)


async def grpc_authorizer(pb: Any, seen: Authorizers) -> tuple[grpc.aio.Server, int]:
    """OK (with x-authz-user) when the request has x-allow: yes, else PERMISSION_DENIED with 401."""

    async def check(request: bytes, context: Any) -> bytes:
        req = pb.CheckRequest.FromString(request)
        seen.grpc.append(req)
        resp = pb.CheckResponse()
        if req.attributes.request.http.headers.get("x-allow") == "yes":
            resp.status.code = 0
            opt = resp.ok_response.headers.add()
            opt.header.key, opt.header.value = "x-authz-user", "bob"
        else:
            resp.status.code = 7
            resp.denied_response.status.code = 401
            resp.denied_response.body = "grpc says no"
            opt = resp.denied_response.headers.add()
            opt.header.key, opt.header.value = "x-why", "grpc"
        return bytes(resp.SerializeToString())

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=None, response_serializer=None)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    assert GRPC_METHOD == "/envoy.service.auth.v3.Authorization/Check"
    return server, port


@dataclass
class Rig:
    mesh: Mesh
    wp: Waypoint
    asked: Authorizers
    tmp: Path

    async def client(self, src: str | None = None) -> H1Client:
        r, w = await self.mesh.socks5_connect("node-a", src or f"{self.mesh.prefix}.61", f"{self.mesh.prefix}.210", 80)
        return H1Client(r, w, "charges.pay.svc.cluster.local")

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in (self.tmp / "waypoint.log").read_text().splitlines() if ln.startswith("{")]

    async def logged(self, *paths: str) -> dict[str, dict[str, Any]]:
        """The last access-log line of each path, once all are there (a line follows its response)."""
        for _ in range(100):
            log = {e["path"]: e for e in self.access_log()}
            if all(p in log for p in paths):
                return log
            await asyncio.sleep(0.02)
        raise AssertionError(f"no access-log line for {paths}")

    async def metrics(self) -> str:
        host, port = self.wp.addresses["metrics"]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = (await reader.read()).decode()
        writer.close()
        return text


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pb = compile_auth_proto(tmp_path)
    asked = Authorizers()
    grpc_server, grpc_port = await grpc_authorizer(pb, asked)
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    try:
        async with loopback_mesh(tmp_path) as mesh:
            p = mesh.prefix
            mesh.write("pay", cluster_yaml(p, '{"keys": []}', CHARGES_L4).replace(
                "jwks: '{\"keys\": []}'", "jwksUri: https://issuer.example/jwks") + POLICIES
                + pod_yaml("pay", "authz", "node-a", "authz", f"{p}.62", {"app": "authz"})
                + service_yaml("pay", "authz", f"{p}.211", {"app": "authz"}, 9000, 8000))
            for node in ("node-a", "node-b"):
                for _ in range(200):
                    if mesh.ztunnels[node].store.current.waypoint("pay", "wp") is not None:
                        break
                    await asyncio.sleep(0.05)
            cfg = WaypointConfig(
                namespace="pay", gateway="wp", node="node-a", cluster=f"local:{mesh.cluster_dir}",
                ca_address=f"127.0.0.1:{mesh.ca.port}", credential_dir=mesh.credential_dir("node-a"),
                hbone=Listen(f"{p}.50", 15008), metrics=Listen(f"{p}.50", 0), readiness=None,
                admin=Listen("127.0.0.1", 0), access_log=str(tmp_path / "waypoint.log"),
                timeouts=Timeouts(connect=2.0, cert=5.0, pool_idle=30.0, drain=2.0),
                peer_hbone_ports={mesh.nodes["node-b"]: 15008},
                extension_providers=tuple(parse_mesh_config(mesh_config(grpc_port, closed_port))),
            )
            wp = Waypoint(cfg)
            await wp.start()
            authz = await http_authorizer(f"{p}.62", 8000, asked)
            try:
                for _ in range(200):
                    if wp.readiness()[0]:
                        break
                    await asyncio.sleep(0.05)
                assert wp.readiness()[0], wp.readiness()
                await mesh.wait_ready("node-a")
                await mesh.wait_ready("node-b")
                async with http_app(f"{p}.60", 8080):
                    yield Rig(mesh, wp, asked, tmp_path)
            finally:
                authz.close()
                await wp.stop()
    finally:
        await grpc_server.stop(0)


async def test_http_authorizer_allows_and_denies(rig: Rig) -> None:
    c = await rig.client()
    try:
        ok = await c.request("GET", "/ext/pay?x=1", headers=[("x-allow", "yes"), ("authorization", "Basic x"),
                                                              ("x-secret", "not sent")])
        assert ok.status == 200, ok
        assert ok.json()["x-authz-user"] == "alice"  # headersToUpstreamOnAllow
        method, target, headers = rig.asked.http[-1]
        assert (method, target) == ("GET", "/check/ext/pay?x=1")
        assert headers["x-allow"] == "yes" and headers["authorization"] == "Basic x" and "x-secret" not in headers
        assert headers["host"] == "charges.pay.svc.cluster.local"
        no = await c.request("POST", "/ext/pay", b"body")
        assert (no.status, no.body, no.headers.get("x-why")) == (403, b"nope", "no x-allow")
        assert "x-other" not in no.headers  # only headersToDownstreamOnDeny
        assert (await c.request("GET", "/other")).status == 200  # no CUSTOM rule matches: not asked
        assert len(rig.asked.http) == 2
    finally:
        c.close()
    await rig.logged("/other")
    denied = [e for e in rig.access_log() if e["path"] == "/ext/pay" and e["decision"] == "deny"]
    assert denied and denied[0]["policy"] == "pay/ext" and denied[0]["rule"] == 0
    assert "provider http-authz denied (HTTP 403)" in denied[0]["reason"]
    assert denied[0]["ext_authz"][0]["provider"] == "http-authz"
    text = await rig.metrics()
    assert 'ambit_waypoint_ext_authz_checks_total{provider="http-authz",result="deny"} 1.0' in text
    assert 'ambit_waypoint_ext_authz_checks_total{provider="http-authz",result="allow"} 1.0' in text


async def test_the_provider_judges_what_the_app_gets(rig: Rig) -> None:
    """Review 14: the provider was asked about the raw target (`/ext/public/../x`), a client's
    obs-text header turned a reachable failOpen provider into "down", and a client could send
    the headers only the provider is meant to set."""
    c = await rig.client()
    try:
        ok = await c.request("GET", "/ext/public/../pay", headers=[("x-allow", "yes")])
        assert ok.status == 200 and ok.json()["path"] == "/ext/pay"
        assert rig.asked.http[-1][1] == "/check/ext/pay"  # what the app got, not the raw target
        asked = len(rig.asked.http)
        no = await c.request("GET", "/strict/x", headers=[("authorization", "Basic \u00e9".encode())])  # type: ignore[list-item]
        assert no.status == 403 and len(rig.asked.http) == asked + 1  # asked, and it said no
        assert rig.asked.http[-1][2]["authorization"] == "Basic \u00e9"  # the bytes as sent
        # failOpen (the provider is down) lets it through, without the client's x-authz-user
        fo = await c.request("GET", "/open/x", headers=[("x-authz-user", "admin")])
        assert fo.status == 200 and fo.json().get("x-authz-user") is None
    finally:
        c.close()


async def test_grpc_authorizer(rig: Rig) -> None:
    c = await rig.client()
    try:
        ok = await c.request("POST", "/grpc/x", b"12345", headers=[("x-allow", "yes")])
        assert ok.status == 200 and ok.json()["x-authz-user"] == "bob", ok
        req = rig.asked.grpc[-1]
        http = req.attributes.request.http
        assert (http.method, http.path, http.host, http.protocol) == ("POST", "/grpc/x", "charges.pay.svc.cluster.local",
                                                                     "HTTP/1.1")
        assert http.headers["x-allow"] == "yes" and http.headers[":method"] == "POST" and http.size == -1
        assert req.attributes.source.principal == "spiffe://cluster.local/ns/pay/sa/orders"
        assert req.attributes.source.address.socket_address.address == f"{rig.mesh.prefix}.61"
        assert req.attributes.destination.address.socket_address.port_value == 8080
        assert req.attributes.request.time.seconds > 0
        no = await c.request("GET", "/grpc/x")
        assert (no.status, no.body, no.headers.get("x-why")) == (401, b"grpc says no", "grpc")
    finally:
        c.close()


async def test_unconfigured_and_unreachable_providers_fail_closed(rig: Rig) -> None:
    c = await rig.client()
    try:
        assert (await c.request("GET", "/none/x")).status == 403  # as Istio: its rules deny
        assert (await c.request("GET", "/down/x")).status == 503  # statusOnError
        assert (await c.request("GET", "/open/x")).status == 200  # failOpen, as configured
    finally:
        c.close()
    log = await rig.logged("/none/x", "/down/x", "/open/x")
    assert "'not-configured' is not configured at this waypoint" in log["/none/x"]["reason"]
    assert "provider down failed" in log["/down/x"]["reason"]
    assert "failOpen" in log["/open/x"]["reason"]
    # a request the ALLOW policy denies never reaches a provider
    other = await rig.client(rig.mesh.pods["shop/client"])
    try:
        assert (await other.request("GET", "/ext/x", headers=[("x-allow", "yes")])).status == 403
    finally:
        other.close()
    assert rig.asked.http == []


async def test_dry_run_decides_nothing_and_is_logged_and_counted(rig: Rig) -> None:
    c = await rig.client()
    try:
        assert (await c.request("GET", "/dry/x")).status == 200
        assert (await c.request("GET", "/plain")).status == 200
    finally:
        c.close()
    log = await rig.logged("/dry/x", "/plain")
    assert log["/dry/x"]["decision"] == "allow"
    assert [{k: d[k] for k in ("policy", "rule", "decision")} for d in log["/dry/x"]["dry_run"]] == [
        {"policy": "pay/dry", "rule": 0, "decision": "deny"}]
    assert log["/plain"]["dry_run"][0]["decision"] == "allow"
    text = await rig.metrics()
    assert 'ambit_policy_dry_run_decisions_total{decision="deny",policy="pay/dry"} 1.0' in text
    recent = [r for r in rig.wp.recent if r["path"] == "/dry/x"]
    assert recent and recent[0]["dry_run"][0]["decision"] == "deny"  # what `ambit flows` shows
