"""The CA with `--node-auth tokenreview`: a pod's own ServiceAccount token obtains its own identity.

A waypoint on Kubernetes runs as the ServiceAccount named after its Gateway
and asks the CA for that identity with its pod's projected token (Istio's rule
for istiod's CSRs). The token counts only while it is bound to a Running pod
of that ServiceAccount, and it obtains exactly
`spiffe://<td>/ns/<ns>/sa/<sa>`, nothing else. Same setup as
test_ca_tokenreview.py: the real CA and CaClient over gRPC/TLS on 127.0.0.1,
the Kubernetes API server a double (no API server runs on these machines).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from ambit.sources.kube import KubernetesSource, api_client_from_spec
from ambit.spiffe import SpiffeId
from ambit.svid import verify_svid
from controlplane.cli import CA_KUBE_RESOURCES
from controlplane.pki import CaMaterial, cert_pem
from controlplane.server import AuditLog, CaServer
from controlplane.tokenreview import (
    EXTRA_NODE_NAME,
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    TokenReviewAuthenticator,
)
from tests.integration.ca_process import ca_process
from tests.integration.kubeapi_double import KubeApiDouble, TokenInfo, pod, recorded
from tests.integration.test_ca_tokenreview import API_TOKEN, NODE_SA, WEB, csr, write_kubeconfig
from ztunnel.identity.caclient import CaClient, CaError

WAYPOINT = SpiffeId("cluster.local", "shop", "waypoint")
WAYPOINT_SA = "system:serviceaccount:shop:waypoint"


def bound(pod_name: str, uid: str, node: str | None = "node-a") -> dict[str, list[str]]:
    extra = {EXTRA_POD_NAME: [pod_name], EXTRA_POD_UID: [uid]}
    if node:
        extra[EXTRA_NODE_NAME] = [node]
    return extra


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    objs = recorded()
    pods = objs["/api/v1/pods"]
    pods.append(pod("shop", "waypoint-7d9", "node-a", "10.244.1.9", sa="waypoint",
                    labels={"gateway.networking.k8s.io/gateway-name": "waypoint"}))
    pending = pod("shop", "waypoint-new", "node-b", "10.244.2.9", sa="waypoint")
    pending["status"]["phase"] = "Pending"
    pods.append(pending)
    pods.append(pod("shop", "web-impostor", "node-a", "10.244.1.10", sa="web"))
    d = KubeApiDouble(objs, token=API_TOKEN)

    def uid(name: str) -> str:
        return str(d.get("/api/v1/pods", "shop", name)["metadata"]["uid"])

    d.tokens = {
        # Kubernetes >= 1.30 puts the node in too; older ones only the pod
        "tok-waypoint": TokenInfo(WAYPOINT_SA, bound("waypoint-7d9", uid("waypoint-7d9")), ["ambit-ca"]),
        "tok-waypoint-old-k8s": TokenInfo(WAYPOINT_SA, bound("waypoint-7d9", uid("waypoint-7d9"), None),
                                          ["ambit-ca"]),
        # the pod was replaced by one of the same name
        "tok-waypoint-stale": TokenInfo(WAYPOINT_SA, bound("waypoint-7d9", "uid-of-its-predecessor"),
                                        ["ambit-ca"]),
        "tok-waypoint-gone": TokenInfo(WAYPOINT_SA, bound("waypoint-0ld", "x"), ["ambit-ca"]),
        "tok-waypoint-pending": TokenInfo(WAYPOINT_SA, bound("waypoint-new", uid("waypoint-new")), ["ambit-ca"]),
        # a token of shop/waypoint naming a pod that runs as shop/web
        "tok-waypoint-wrong-pod": TokenInfo(WAYPOINT_SA, bound("web-impostor", uid("web-impostor")),
                                            ["ambit-ca"]),
        # not bound to a pod (a legacy Secret token, or a TokenRequest without a bound object)
        "tok-waypoint-unbound": TokenInfo(WAYPOINT_SA, {EXTRA_NODE_NAME: ["node-a"]}, ["ambit-ca"]),
        "tok-waypoint-api-aud": TokenInfo(WAYPOINT_SA, bound("waypoint-7d9", uid("waypoint-7d9")),
                                          ["https://kubernetes.default.svc"]),
        "tok-node-a": TokenInfo(NODE_SA, {EXTRA_NODE_NAME: ["node-a"], EXTRA_POD_NAME: ["ambit-node-z9"]},
                                ["ambit-ca"]),
    }
    d.start()
    try:
        yield d
    finally:
        d.stop()


class Env:
    def __init__(self, tmp: Path, server: CaServer, audit: io.StringIO) -> None:
        self.server, self.audit = server, audit
        self.cred = tmp / "secrets"
        self.cred.mkdir()
        (self.cred / "ca.crt").write_bytes(cert_pem(server.material.root))

    def client(self, token: str) -> CaClient:
        (self.cred / "token").write_text(token)
        return CaClient(f"127.0.0.1:{self.server.port}", self.cred, token_file=self.cred / "token", timeout=10)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines()]


@contextlib.asynccontextmanager
async def _env(tmp_path: Path, double: KubeApiDouble, **auth_kw: Any) -> AsyncIterator[Env]:
    spec = f"kubernetes:{write_kubeconfig(tmp_path / 'kubeconfig', double.url)}"
    # the CA's own source: pods alone (all its RBAC allows)
    source = KubernetesSource(api_client_from_spec(spec), sync_timeout=5.0, backoff_base=0.05,
                              backoff_max=0.2, resources=CA_KUBE_RESOURCES)
    try:
        auth = TokenReviewAuthenticator(api_client_from_spec(spec), request_timeout=2.0, **auth_kw)
        audit = io.StringIO()
        server = CaServer(CaMaterial.generate(), source, port=0, audit=AuditLog(audit), token_auth=auth)
        await server.start()
        try:
            yield Env(tmp_path, server, audit)
        finally:
            await server.stop(0)
    finally:
        source.close()


@pytest.fixture
async def env(tmp_path: Path, double: KubeApiDouble) -> AsyncIterator[Env]:
    async with _env(tmp_path, double) as e:
        yield e


async def issue(env: Env, token: str, ident: SpiffeId) -> list[x509.Certificate]:
    client = env.client(token)
    try:
        pems = await client.create_certificate(csr(ident), 600)
    finally:
        await client.close()
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


async def refused(env: Env, token: str, ident: SpiffeId) -> CaError:
    with pytest.raises(CaError) as e:
        await issue(env, token, ident)
    return e.value


@pytest.mark.parametrize("token", ["tok-waypoint", "tok-waypoint-old-k8s"])
async def test_a_pods_token_obtains_its_own_identity(env: Env, token: str) -> None:
    chain = await issue(env, token, WAYPOINT)
    assert verify_svid(chain[:-1], env.server.material.bundle) == WAYPOINT
    line = env.audit_lines()[-1]
    assert (line["event"], line["auth"], line["identity"]) == ("issued", "tokenreview", WAYPOINT.uri)
    assert line["workload"] == "shop/waypoint" and line["pod"] == "shop/waypoint-7d9"
    assert line["node"] == "node-a"  # where its pod runs, read from the token or the pod


async def test_a_pods_token_obtains_nothing_else(env: Env) -> None:
    # shop/web runs on node-a, where the waypoint's pod runs too: a node's rule would allow it,
    # a workload's token does not
    err = await refused(env, "tok-waypoint", WEB)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert "may obtain only its own identity spiffe://cluster.local/ns/shop/sa/waypoint" in str(err)
    assert str(WEB) in str(err)
    pay_waypoint = SpiffeId("cluster.local", "pay", "waypoint")
    err = await refused(env, "tok-waypoint", pay_waypoint)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    line = env.audit_lines()[-1]
    assert (line["event"], line["code"], line["workload"]) == ("refused", "PERMISSION_DENIED", "shop/waypoint")


@pytest.mark.parametrize(
    ("token", "why"),
    [("tok-waypoint-stale", "its pod was replaced"), ("tok-waypoint-gone", "its pod no longer exists"),
     ("tok-waypoint-pending", "its pod is not Running"),
     ("tok-waypoint-wrong-pod", "its pod runs as another ServiceAccount"),
     ("tok-waypoint-unbound", "not bound to a pod"), ("tok-waypoint-api-aud", "wrong audience")],
)
async def test_a_token_not_bound_to_a_running_pod_of_its_account_is_unauthenticated(
        env: Env, token: str, why: str) -> None:
    err = await refused(env, token, WAYPOINT)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, why
    assert "Running pod's own ServiceAccount" in str(err) and "ambit-system/ambit" in str(err)
    line = env.audit_lines()[-1]
    assert line["code"] == "UNAUTHENTICATED" and "workload" not in line


async def test_node_tokens_keep_the_node_rule(env: Env) -> None:
    chain = await issue(env, "tok-node-a", WEB)  # node-a hosts shop/web
    assert verify_svid(chain[:-1], env.server.material.bundle) == WEB
    line = env.audit_lines()[-1]
    assert line["node"] == "node-a" and "workload" not in line


async def test_workload_tokens_can_be_turned_off(tmp_path: Path, double: KubeApiDouble) -> None:
    async with _env(tmp_path, double, workloads=False) as env:
        err = await refused(env, "tok-waypoint", WAYPOINT)
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert "Running pod's own ServiceAccount" not in str(err)


async def test_ca_run_reads_only_pods_and_serves_a_waypoint(tmp_path: Path, double: KubeApiDouble) -> None:
    """`ambit ca run --cluster kubernetes`: the CA lists and watches pods and nothing else
    (its RBAC in daemonset/rbac.yaml allows nothing else), and a waypoint gets its identity."""
    CaMaterial.generate().write(tmp_path / "ca")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", double.url)
    audit = tmp_path / "audit.jsonl"
    with ca_process("--dir", str(tmp_path / "ca"), "--cluster", f"kubernetes:{kubeconfig}",
                    "--node-auth", "tokenreview", "--audit-log", str(audit)) as (_, port):
        cred = tmp_path / "secrets"
        cred.mkdir()
        (cred / "ca.crt").write_bytes((tmp_path / "ca" / "root-cert.pem").read_bytes())
        (cred / "token").write_text("tok-waypoint")
        client = CaClient(f"127.0.0.1:{port}", cred, token_file=cred / "token")
        try:
            await client.create_certificate(csr(WAYPOINT), 600)
        finally:
            await client.close()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(a["event"], a.get("workload")) for a in lines] == [("issued", "shop/waypoint")]
    assert double.count("GET", "/api/v1/pods") >= 1
    for other in ("/api/v1/namespaces?", "/api/v1/nodes", "/api/v1/services", "/apis/discovery.k8s.io",
                  "/apis/security.istio.io", "/apis/gateway.networking.k8s.io"):
        assert double.count("GET", other) == 0, other
