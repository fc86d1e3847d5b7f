"""An ingress gateway in front of a loopback mesh (tests, and the benchmark): a real CA, two ztunnels
as two nodes, backends in the mesh, and the gateway in-process with its own identity.

  node-a: edge/ingress-gateway (the gateway, 127.A.B.70), shop/client (a mesh client)
  node-b: store/v1 and store/v2 (HTTP apps that say who they are), service store/v1, store/v2
  outside the mesh: clients bind 127.A.B.150+ and dial the gateway's listeners

`gateway_mesh(tmp)` yields a `GatewayMesh`: its `http`/`https` addresses, the CA material to
make certificates with, `write()` to change the cluster, and `token()` for JWTs the
gateway trusts. The benchmark can drive it as it is (see docs/gateway.md, "Benchmarking").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.server import GatewayConfig, IngressGateway
from tests.integration.ztunnel_harness import Mesh, loopback_mesh, pod_yaml, service_yaml, serving
from ztunnel.config import Listen, Timeouts

ISSUER = "https://issuer.test"
GATEWAY_IP = 70  # the gateway pod's host part
HOSTS = ("shop.example.com", "api.example.com")


def tls_secret(ns: str, name: str, hostname: str, ca: tuple[Any, Any]) -> tuple[str, bytes]:
    """A kubernetes.io/tls Secret for `hostname`, issued by `ca`; (YAML, the cert PEM)."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    b64 = base64.b64encode
    text = (f"---\napiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\n"
            f"data: {{tls.crt: {b64(cert_pem).decode()}, tls.key: {b64(key_pem).decode()}}}\n")
    return text, cert_pem


def test_ca() -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def cluster_yaml(prefix: str, jwks: str, secrets: str, *, extra: str = "", weights: tuple[int, int] = (80, 20),
                 gateway_annotations: str = "") -> str:
    return f"""
---
apiVersion: v1
kind: Namespace
metadata: {{name: edge}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: store, labels: {{ambit.dev/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: edge, annotations: {{{gateway_annotations}}}}}
spec:
  gatewayClassName: ambit-ingress
  listeners:
  - {{name: http, port: 80, protocol: HTTP, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: shop, port: 443, protocol: HTTPS, hostname: shop.example.com,
     tls: {{certificateRefs: [{{name: shop-tls}}]}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - {{name: api, port: 443, protocol: HTTPS, hostname: api.example.com,
     tls: {{certificateRefs: [{{name: api-tls}}]}}, allowedRoutes: {{namespaces: {{from: All}}}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: issuer, namespace: edge}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: ingress}}]
  jwtRules: [{{issuer: "{ISSUER}", jwks: '{jwks}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: scopes, namespace: edge}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: ingress}}]
  action: ALLOW
  rules:
  - to: [{{operation: {{paths: [/public/*, /weights, /slow]}}}}]
  - to: [{{operation: {{hosts: [old.example.com]}}}}]
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    to: [{{operation: {{methods: [GET], paths: [/api/v1/orders*]}}}}]
    when: [{{key: "request.auth.claims[scope]", values: [read:orders]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: store, namespace: store}}
spec:
  parentRefs: [{{name: ingress, namespace: edge}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api/v1/orders}}}}]
    backendRefs: [{{name: v1, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: public, namespace: store}}
spec:
  parentRefs: [{{name: ingress, namespace: edge}}]
  rules:
  - matches: [{{path: {{type: Exact, value: /weights}}}}]
    backendRefs: [{{name: v1, port: 80, weight: {weights[0]}}}, {{name: v2, port: 80, weight: {weights[1]}}}]
  - matches: [{{path: {{type: PathPrefix, value: /public}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: x-route, value: public}}]
        add: [{{name: x-added, value: "1"}}]
        remove: [x-secret]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: x-app, value: gateway}}]
        add: [{{name: x-edge, value: ambit}}]
        remove: [x-internal]
    - type: CORS
      cors: {{allowOrigins: ["https://shop.example.com"], allowMethods: [GET, POST], allowHeaders: [content-type]}}
    backendRefs: [{{name: v2, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /slow}}}}]
    backendRefs: [{{name: v1, port: 80}}]
    timeouts: {{request: 500ms}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: redirects, namespace: edge}}
spec:
  parentRefs: [{{name: ingress, sectionName: http}}]
  hostnames: [old.example.com]
  rules:
  - filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https, hostname: shop.example.com, statusCode: 301}}}}]
---
apiVersion: ambit.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: per-user, namespace: store}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: store}}]
  limits: [{{name: per-user, requests: 3, period: 60s, key: {{type: Claim, claim: sub}}}}]
---
# the mesh side: the store admits only the gateway's identity
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-the-gateway, namespace: store}}
spec:
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/edge/sa/ingress]}}}}]}}]
""" + secrets + pod_yaml("edge", "ingress-gateway", "node-a", "ingress", f"{prefix}.{GATEWAY_IP}",
                         {"gateway.networking.k8s.io/gateway-name": "ingress", "ambit.dev/dataplane-mode": "none"}) \
        + pod_yaml("store", "v1", "node-b", "store", f"{prefix}.60", {"app": "v1"}) \
        + pod_yaml("store", "v2", "node-b", "store", f"{prefix}.61", {"app": "v2"}) \
        + service_yaml("store", "v1", f"{prefix}.210", {"app": "v1"}, 80, 8080) \
        + service_yaml("store", "v2", f"{prefix}.211", {"app": "v2"}, 80, 8080) + extra


@contextlib.asynccontextmanager
async def store_app(host: str, name: str, port: int = 8080) -> AsyncIterator[asyncio.Server]:
    """An HTTP/1.1 app: `{"server": name, "method", "path", "headers": {...}}`; /slow answers after 2 s."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await r.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return
                    continue
                if isinstance(ev, h11.Request):
                    req = ev
                elif isinstance(ev, h11.EndOfMessage):
                    if req.target == b"/slow":
                        await asyncio.sleep(2)
                    body = json.dumps({"server": name, "method": req.method.decode(), "path": req.target.decode(),
                                       "headers": {k.decode(): v.decode() for k, v in req.headers}}).encode()
                    w.write(conn.send(h11.Response(status_code=200, headers=[
                        ("content-type", "application/json"), ("content-length", str(len(body))),
                        ("x-internal", "yes"), ("x-app", name)])) or b"")
                    w.write(conn.send(h11.Data(data=body)) or b"")
                    w.write(conn.send(h11.EndOfMessage()) or b"")
                    await w.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                elif isinstance(ev, h11.ConnectionClosed):
                    return
        except (ConnectionError, OSError, h11.ProtocolError):
            pass
        finally:
            w.close()

    async with serving(handle, host, port) as srv:
        yield srv


@dataclass
class GatewayMesh:
    mesh: Mesh
    gw: IngressGateway
    key: RSAKey
    ca: tuple[Any, Any]
    tmp: Path
    jwks: str
    secrets: str
    certs: dict[str, bytes] = field(default_factory=dict)
    clients: int = 150

    @property
    def http(self) -> tuple[str, int]:
        return self.gw.addresses["http 80"]

    @property
    def https(self) -> tuple[str, int]:
        return self.gw.addresses["https 443"]

    def client_ip(self) -> str:
        """A fresh address outside the mesh (so each test has its own rate-limit bucket by IP)."""
        self.clients += 1
        return f"{self.mesh.prefix}.{self.clients}"

    def token(self, scope: str = "read:orders", sub: str = "alice", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "sub": sub, "scope": scope, "iat": now, "exp": now + 300, **claims}
        return str(jwt.encode({"alg": "RS256", "kid": "k1"}, body, self.key))

    def write(self, **kw: Any) -> None:
        self.mesh.write("edge", cluster_yaml(self.mesh.prefix, self.jwks, self.secrets, **kw))

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.tmp / "gateway.log").read_text().splitlines()
                if line.startswith("{")]

    async def wait(self, check: Any, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not check():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting ({self.gw.readiness()[1]})")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def gateway_mesh(tmp: Path, *, apps: Sequence[str] = ("v1", "v2"), **yaml_kw: Any) -> AsyncIterator[GatewayMesh]:
    """The rig (see the module docstring), ready: the gateway has its certificate and listeners."""
    key = RSAKey.import_key(rsa.generate_private_key(public_exponent=65537, key_size=2048), {"kid": "k1"})
    jwks = json.dumps({"keys": [key.as_dict(private=False) | {"kid": "k1", "alg": "RS256"}]})
    ca = test_ca()
    async with loopback_mesh(tmp) as mesh:
        prefix = mesh.prefix
        secrets, certs = "", {}
        for name, host in (("shop-tls", HOSTS[0]), ("api-tls", HOSTS[1])):
            text, pem = tls_secret("edge", name, host, ca)
            secrets += text
            certs[host] = pem
        mesh.write("edge", cluster_yaml(prefix, jwks, secrets, **yaml_kw))
        for node in ("node-a", "node-b"):
            zt = mesh.ztunnels[node]
            for _ in range(200):
                if zt.store.current.workload_by_ip(f"{prefix}.61") is not None:
                    break
                await asyncio.sleep(0.05)
        addr = f"{prefix}.{GATEWAY_IP}"
        cfg = GatewayConfig(
            namespace="edge", gateway="ingress", node="node-a", cluster=f"local:{mesh.cluster_dir}",
            ca_address=f"127.0.0.1:{mesh.ca.port}", credential_dir=mesh.credential_dir("node-a"), bind=addr,
            port_map={80: 0, 443: 0}, metrics=Listen(addr, 0), readiness=None, admin=Listen("127.0.0.1", 0),
            access_log=str(tmp / "gateway.log"), state_dir=tmp / "gw-state",
            timeouts=Timeouts(connect=2.0, cert=5.0, pool_idle=30.0, drain=2.0),
            peer_hbone_ports={mesh.nodes["node-a"]: 15008, mesh.nodes["node-b"]: 15008},
        )
        gw = IngressGateway(cfg)
        await gw.start()
        rig = GatewayMesh(mesh, gw, key, ca, tmp, jwks, secrets, certs)
        try:
            await rig.wait(lambda: gw.readiness()[0])
            await mesh.wait_ready("node-a")
            await mesh.wait_ready("node-b")
            async with contextlib.AsyncExitStack() as stack:
                for i, name in enumerate(apps):
                    await stack.enter_async_context(store_app(f"{prefix}.{60 + i}", name))
                yield rig
        finally:
            await gw.stop()
