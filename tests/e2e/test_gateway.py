"""The ingress gateway on a real two-node local cluster (root): examples/50-ingress.yaml, the demo's
edge act, one test per act, plus HTTPS by SNI and the mesh side.

  node-a: edge/ingress-gateway (the gateway's pod), internet/partner (outside the mesh)
  node-b: orders/orders (an HTTP/1.1 app in the mesh), internet/stranger (outside the mesh)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from tests.e2e.mesh import Cluster, ambit, poll, write_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = ECKey.import_key((EXAMPLES / "demo-issuer-key.pem").read_bytes())

# Requests on one keep-alive connection; prints [[status, headers, body], ...]. Arguments: host, port,
# then "METHOD PATH TOKEN|-" specs; env HOST sets the Host header.
REQUESTS = r"""
import http.client, json, os, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
c = http.client.HTTPConnection(host, port, timeout=5)
for spec in sys.argv[3:]:
    method, path, token = spec.split(" ", 2)
    headers = {"Host": os.environ.get("HOST", "shop.example.com"), "Content-Type": "application/json"}
    if token != "-":
        headers["Authorization"] = "Bearer " + token
    try:
        c.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        r = c.getresponse()
        out.append([r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read().decode(errors="replace")])
    except Exception as e:
        out.append([0, {}, repr(e)])
        c = http.client.HTTPConnection(host, port, timeout=5)
print(json.dumps(out))
"""

# One TLS handshake with SNI: prints the certificate's subject CN and the answer to GET /.
TLS = r"""
import json, socket, ssl, sys
ip, sni = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection((ip, 443), timeout=5)
t = ctx.wrap_socket(s, server_hostname=sni)
der = t.getpeercert(binary_form=True)
t.sendall(b"GET /api/v1/orders HTTP/1.1\r\nHost: " + sni.encode() + b"\r\nConnection: close\r\n\r\n")
data = b""
while True:
    d = t.recv(65536)
    if not d:
        break
    data += d
print(json.dumps({"der": der.hex(), "status": data.split(b" ", 2)[1].decode()}))
"""


def token(sub: str, scope: str) -> str:
    now = int(time.time())
    return str(jwt.encode({"alg": "ES256", "kid": "demo-1"}, {
        "iss": "https://issuer.demo.ambit.dev", "sub": sub, "aud": "orders", "scope": scope, "iat": now,
        "exp": now + 600}, KEY))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import require_root

    require_root()
    tmp = tmp_path_factory.mktemp("ambit-gateway")
    c = Cluster(state=tmp / "state", tmp=tmp)
    try:
        c.local("up", timeout=120)
        c.local("apply", "-f", str(EXAMPLES / "50-ingress.yaml"))
        poll(lambda: all(x["status"].get("phase") == "Running" for x in c.pods().values()), 30, "every pod Running")
        poll(lambda: call(c, "internet/partner", "GET /api/v1/orders -")[0][0] == 403, 60,
             "the gateway answering", interval=0.5)
        # and the way into the mesh: node-b's ztunnel listens once its agent serves the feed, which
        # on a loaded machine comes seconds after `local up` (a subject of its own: its own bucket)
        poll(lambda: call(c, "internet/partner", f"GET /api/v1/orders {token('warm-up', 'read:orders')}")[0][0] == 200,
             60, "the gateway reaching orders", interval=0.5)
        yield c
    finally:
        ambit("local", "down", "--state-dir", str(c.state), check=False, timeout=120)


def call(c: Cluster, pod: str, *specs: str, host: str = "shop.example.com") -> list[tuple[int, dict[str, str], str]]:
    r = c.exec(pod, "env", f"HOST={host}", "python3", "-c", REQUESTS, c.ip("edge/ingress-gateway"), "80", *specs,
               timeout=60)
    assert r.returncode == 0, r.stderr
    return [(int(s), h, b) for s, h, b in json.loads(r.stdout.strip().splitlines()[-1])]


def test_without_a_token_the_policy_denies(cluster: Cluster) -> None:
    (got,) = call(cluster, "internet/partner", "GET /api/v1/orders -")
    assert got[0] == 403 and got[2] == "RBAC: access denied"


def test_a_token_lacking_the_scope_is_denied(cluster: Cluster) -> None:
    got = call(cluster, "internet/partner", f"GET /api/v1/orders {token('ann', 'profile')}",
               f"POST /api/v1/orders {token('ann', 'read:orders')}")
    assert [s for s, _, _ in got] == [403, 403], got
    (bad,) = call(cluster, "internet/partner", f"GET /api/v1/orders {token('ann', 'read:orders')[:-3]}xyz")
    assert bad[0] == 401 and "www-authenticate" in bad[1]


def test_the_right_token_reaches_the_backend_with_the_gateways_identity(cluster: Cluster) -> None:
    c = cluster
    (ok,) = call(c, "internet/partner", f"GET /api/v1/orders/7 {token('ben', 'read:orders')}")
    assert ok[0] == 200, ok
    seen = json.loads(ok[2])
    assert seen["path"] == "/api/v1/orders/7" and seen["x-edge"] == "ingress" and seen["authorization"] is None
    assert seen["x-forwarded-for"] == c.ip("internet/partner")
    assert ok[1]["x-served-by"] == "ambit-gateway" and ok[1]["ratelimit-limit"] == "5"
    # the mesh hop: node-b's ztunnel admitted the gateway's identity by the orders policy
    recs = poll(lambda: [r for r in c.access_log("node-b") if r.get("dst_workload") == "orders/orders"
                         and r.get("decision") == "allow"], 10, "node-b's record of the gateway's connection")
    assert recs[-1]["src_identity"] == "spiffe://cluster.local/ns/edge/sa/ingress"
    assert "orders/orders-from-the-gateway" in json.dumps(recs[-1])


def test_over_the_rate_limit_is_429(cluster: Cluster) -> None:
    t = token("cat", "read:orders")
    got = call(cluster, "internet/partner", *[f"GET /api/v1/orders {t}"] * 6)
    assert [s for s, _, _ in got] == [200] * 5 + [429], [s for s, _, _ in got]
    h = got[-1][1]
    assert int(h["retry-after"]) > 0 and h["ratelimit-remaining"] == "0" and 'name="per-user"' in h["ratelimit-policy"]


def test_cors_preflight_per_the_routes_policy(cluster: Cluster) -> None:
    c = cluster
    script = r"""
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
out = []
for origin in sys.argv[2:]:
    c.request("OPTIONS", "/api/v1/orders", headers={"Host": "shop.example.com", "Origin": origin,
              "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    r = c.getresponse(); r.read()
    out.append([r.status, r.getheader("access-control-allow-origin")])
print(json.dumps(out))
"""
    r = c.exec("internet/partner", "python3", "-c", script, c.ip("edge/ingress-gateway"),
               "https://shop.example.com", "https://evil.example")
    assert json.loads(r.stdout) == [[204, "https://shop.example.com"], [403, None]], r.stdout + r.stderr


def test_the_backend_refuses_other_mesh_clients(cluster: Cluster) -> None:
    c = cluster
    from tests.e2e.mesh import SLEEP, pod

    c.apply([pod("orders", "peer", "node-a", SLEEP, sa="peer")], name="peer.yaml")
    poll(lambda: c.pods().get("orders/peer", {}).get("status", {}).get("phase") == "Running", 30, "orders/peer")
    poll(lambda: (c.pods()["orders/peer"]["metadata"].get("annotations") or {}).get("ambit.dev/redirection")
         == "enabled", 30, "orders/peer enrolled")
    r = c.exec("orders/peer", "python3", "-c", REQUESTS, "orders.orders.svc.cluster.local",
               "80", "GET /api/v1/orders -")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got[0][0] == 0, f"a mesh client other than the gateway reached orders: {got}"


def test_https_serves_each_hostnames_certificate(cluster: Cluster) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from tests.integration.gateway_rig import test_ca, tls_secret

    c = cluster
    ca = test_ca()
    secrets = [tls_secret("edge", f"{h.split('.')[0]}-tls", h, ca) for h in ("shop.example.com", "api.example.com")]
    gw = next(o for o in _docs(EXAMPLES / "50-ingress.yaml") if o["kind"] == "Gateway")
    gw["spec"]["listeners"] += [
        {"name": name, "port": 443, "protocol": "HTTPS", "hostname": host,
         "tls": {"certificateRefs": [{"name": f"{name}-tls"}]}, "allowedRoutes": {"namespaces": {"from": "All"}}}
        for name, host in (("shop", "shop.example.com"), ("api", "api.example.com"))]
    import yaml

    path = c.tmp / "https.yaml"
    path.write_text("".join(text for text, _ in secrets) + "---\n" + yaml.safe_dump(gw))
    c.local("apply", "-f", str(path))

    def handshake(sni: str) -> dict[str, str]:
        r = c.exec("internet/partner", "python3", "-c", TLS, c.ip("edge/ingress-gateway"), sni)
        out: dict[str, str] = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}
        return out

    for host in ("shop.example.com", "api.example.com"):
        got = poll(lambda host=host: handshake(host), 30, f"an HTTPS answer for {host}",  # type: ignore[misc]
                   interval=0.5)
        cert = x509.load_der_x509_certificate(bytes.fromhex(got["der"]))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == host
        assert got["status"] == "403"  # no token: the same policies hold on HTTPS


def test_from_a_disallowed_network_is_403(cluster: Cluster) -> None:
    c = cluster
    partner_net = next(n["spec"]["podCIDR"] for n in json.loads(c.local("get", "nodes", "-o", "json").stdout)["items"]
                       if n["metadata"]["name"] == "node-a")
    policy = next(o for o in _docs(EXAMPLES / "50-ingress.yaml") if o["metadata"]["name"] == "edge-networks")
    policy["spec"]["rules"][0]["from"][0]["source"]["notRemoteIpBlocks"] = [partner_net]
    c.local("apply", "-f", str(write_manifest(c.tmp / "networks.yaml", [policy])))
    t = token("dan", "read:orders")
    poll(lambda: call(c, "internet/stranger", f"GET /api/v1/orders {t}")[0][0] == 403, 20,
         "the stranger refused", interval=0.5)
    assert call(c, "internet/partner", f"GET /api/v1/orders {t}")[0][0] == 200
    # the CLI shows the edge hop: the requests the gateway decided, with the deciding policy
    flows = c.cli_json("flows", "--node", "node-a")
    edge = [r for r in flows["requests"] if r.get("gateway") == "edge/ingress"]
    denied = [r for r in edge if r["client_ip"] == c.ip("internet/stranger") and r["status"] == 403]
    assert denied and denied[-1]["policy"] == "edge/edge-networks", edge[-3:]
    out = c.cli("flows", "--node", "node-a").stdout
    assert "gateway edge/ingress" in out
    # and the node's flow history keeps them: the agent collects the gateway pod's /requests too
    def in_history() -> bool:
        rows = c.cli_json("flows", "--node", "node-a", "--since", "10m", "--verdict", "deny").get("items") or []
        return any(r.get("route") == "gateway" and r.get("src_ip") == c.ip("internet/stranger") for r in rows)

    poll(in_history, 20, "the gateway's denial in node-a's flow history", interval=1)
    hist = c.cli("flows", "--node", "node-a", "--since", "10m").stdout
    assert "gateway edge/ingress" in hist


def _docs(path: Path) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d]
