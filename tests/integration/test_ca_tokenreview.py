"""The CA with `--node-auth tokenreview`: ztunnels prove their node with a ServiceAccount token.

The real CA (`CaServer`, in-process and as `ambit ca run`) and the real
`CaClient` talk gRPC/TLS on 127.0.0.1. The Kubernetes API server is
`kubeapi_double.KubeApiDouble`, a double, because no API server can run on
these machines: it serves the cluster the CA reads pods from (through the real
`KubernetesSource`) and answers the TokenReviews, both over real HTTP and
behind a bearer token of its own, as the CA's in-cluster API access would be.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.sources.kube import KubernetesSource, api_client_from_spec
from ambit.spiffe import SpiffeId
from ambit.svid import verify_svid
from ambit.wire import ca as caproto
from controlplane.pki import CA_SERVER_NAME, CaMaterial, cert_pem, key_pem, write_node_credential
from controlplane.server import AuditLog, CaServer
from controlplane.tokenreview import (
    EXTRA_NODE_NAME,
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    TokenReviewAuthenticator,
)
from tests.integration.ca_process import ca_process
from tests.integration.kubeapi_double import KubeApiDouble, TokenInfo, pod, recorded
from ztunnel.cli import config_from_args
from ztunnel.config import ConfigError, ZtunnelConfig
from ztunnel.identity.caclient import CaClient, CaError
from ztunnel.identity.manager import CertManager, make_csr

API_TOKEN = "ca-api-s3cret"  # what the CA itself shows the API server
NODE_SA = "system:serviceaccount:ambit-system:ambit"
WEB = SpiffeId("cluster.local", "shop", "web")  # shop/web-0 runs on node-a
DB = SpiffeId("cluster.local", "shop", "db")  # shop/db-0 runs on node-b


def write_kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": url}}],
        "users": [{"name": "ambit-ca", "user": {"token": API_TOKEN}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "ambit-ca"}}],
    }))
    return path


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    objs = recorded()
    objs["/api/v1/pods"].append(pod("ambit-system", "ambit-node-x1", "node-b", "172.18.0.3", sa="ambit"))
    d = KubeApiDouble(objs, token=API_TOKEN)
    uid = d.get("/api/v1/pods", "ambit-system", "ambit-node-x1")["metadata"]["uid"]
    d.tokens = {
        # Kubernetes >= 1.30: the node is named in the token
        "tok-node-a": TokenInfo(NODE_SA, {EXTRA_NODE_NAME: ["node-a"], EXTRA_POD_NAME: ["ambit-node-z9"]},
                                ["ambit-ca"]),
        # older: the node of the pod the token is bound to
        "tok-node-b": TokenInfo(NODE_SA, {EXTRA_POD_NAME: ["ambit-node-x1"], EXTRA_POD_UID: [uid]}, ["ambit-ca"]),
        "tok-web-sa": TokenInfo("system:serviceaccount:shop:web", {EXTRA_NODE_NAME: ["node-a"]}, ["ambit-ca"]),
        "tok-api-aud": TokenInfo(NODE_SA, {EXTRA_NODE_NAME: ["node-a"]}, ["https://kubernetes.default.svc"]),
    }
    d.start()
    try:
        yield d
    finally:
        d.stop()


class Env:
    def __init__(self, tmp: Path, server: CaServer, audit: io.StringIO, double: KubeApiDouble) -> None:
        self.tmp, self.server, self.audit, self.double = tmp, server, audit, double
        self.material = server.material
        # What the DaemonSet mounts: ca.crt and the projected token, nothing else.
        self.cred = tmp / "secrets"
        self.cred.mkdir()
        (self.cred / "ca.crt").write_bytes(cert_pem(self.material.root))
        self.token_file = self.cred / "token"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self, token: str) -> CaClient:
        self.token_file.write_text(token + "\n")
        return CaClient(self.address, self.cred, token_file=self.token_file, timeout=10)

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines()]


@pytest.fixture
async def env(tmp_path: Path, double: KubeApiDouble) -> AsyncIterator[Env]:
    spec = f"kubernetes:{write_kubeconfig(tmp_path / 'kubeconfig', double.url)}"
    # The CA's node check and its TokenReviews go to the same API server.
    source = KubernetesSource(api_client_from_spec(spec), sync_timeout=5.0, backoff_base=0.05, backoff_max=0.2)
    try:
        auth = TokenReviewAuthenticator(api_client_from_spec(spec), request_timeout=2.0)
        audit = io.StringIO()
        server = CaServer(CaMaterial.generate(), source, port=0, audit=AuditLog(audit), token_auth=auth)
        await server.start()
        try:
            yield Env(tmp_path, server, audit, double)
        finally:
            await server.stop(0)
    finally:
        source.close()


def csr(ident: SpiffeId) -> str:
    return make_csr(ident, ec.generate_private_key(ec.SECP256R1()))


async def refused(client: CaClient, ident: SpiffeId) -> CaError:
    try:
        with pytest.raises(CaError) as e:
            await client.create_certificate(csr(ident), 600)
        return e.value
    finally:
        await client.close()


async def test_token_of_a_node_gets_a_chain_for_an_identity_it_hosts(env: Env) -> None:
    client = env.client("tok-node-a")
    try:
        pems = await client.create_certificate(csr(WEB), 600)
    finally:
        await client.close()
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    assert chain[-1] == env.material.root
    assert verify_svid(chain[:-1], env.material.bundle) == WEB
    issued = env.audit_lines()[-1]
    assert issued["event"] == "issued" and issued["auth"] == "tokenreview"
    assert issued["node"] == "node-a" and issued["identity"] == WEB.uri
    # The CA asked for the ztunnel's audience, with its own API credentials.
    assert env.double.token_reviews[-1]["spec"] == {"token": "tok-node-a", "audiences": ["ambit-ca"]}


async def test_pod_bound_token_is_mapped_through_its_pod_and_rereads_the_file(env: Env) -> None:
    client = env.client("tok-node-b")
    try:
        await client.create_certificate(csr(DB), 600)  # node-b hosts shop/db-0
        # The kubelet rotated the token: the next call sends the new one.
        env.token_file.write_text("tok-node-a")
        await client.create_certificate(csr(WEB), 600)
    finally:
        await client.close()
    nodes = [(a["node"], a["identity"]) for a in env.audit_lines() if a["event"] == "issued"]
    assert nodes == [("node-b", DB.uri), ("node-a", WEB.uri)]


async def test_token_of_a_pod_on_another_node_is_permission_denied(env: Env) -> None:
    err = await refused(env.client("tok-node-b"), WEB)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert "node node-b may not obtain" in str(err) and "scheduled on: node-a" in str(err)
    line = env.audit_lines()[-1]
    assert (line["event"], line["auth"], line["node"], line["code"]) == (
        "refused", "tokenreview", "node-b", "PERMISSION_DENIED")


@pytest.mark.parametrize(
    ("token", "why"),
    [("nonsense", "invalid"), ("tok-web-sa", "another ServiceAccount"), ("tok-api-aud", "wrong audience")],
)
async def test_bad_tokens_are_unauthenticated(env: Env, token: str, why: str) -> None:
    err = await refused(env.client(token), WEB)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, why
    assert "bearer token rejected" in str(err) and "ambit-system/ambit" in str(err) and "ambit-ca" in str(err)
    assert str(env.token_file) in str(err)  # the client's hint names the file it sent
    line = env.audit_lines()[-1]
    assert line["code"] == "UNAUTHENTICATED" and line["node"] is None and line["auth"] == "tokenreview"


async def _raw_call(env: Env, metadata: tuple[tuple[str, str], ...] | None,
                    key_chain: tuple[bytes, bytes] | None = None) -> tuple[grpc.StatusCode, str]:
    creds = grpc.ssl_channel_credentials(cert_pem(env.material.root), *(key_chain or (None, None)))
    ch = grpc.aio.secure_channel(env.address, creds, options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)])
    try:
        call = ch.unary_unary(caproto.METHOD, request_serializer=None, response_deserializer=caproto.decode_response)
        await call(caproto.encode_request(csr(WEB), 600, {}), timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    finally:
        await ch.close(None)
    raise AssertionError("the CA issued a certificate without a valid token")


async def test_no_token_or_not_bearer_is_unauthenticated(env: Env) -> None:
    code, details = await _raw_call(env, None)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no bearer token" in details
    code, details = await _raw_call(env, (("authorization", "Basic dXNlcjpwdw=="),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not 'Bearer <token>'" in details
    assert not env.double.token_reviews  # refused before asking the API server


async def test_node_credential_does_not_count_in_token_mode(env: Env) -> None:
    # A valid node credential but no token: the CA asks for no client
    # certificate in this mode, so the caller is unauthenticated, not node-a.
    write_node_credential(env.material, "node-a", env.tmp / "node-a")
    client = CaClient(env.address, env.tmp / "node-a")
    err = await refused(client, WEB)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED and "no bearer token" in str(err)


async def test_api_server_down_is_unavailable_not_a_rejection(env: Env) -> None:
    env.double.stop()  # the CA keeps its last cluster state; TokenReviews now fail
    err = await refused(env.client("tok-node-a"), WEB)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot check the node token now" in str(err) and "Kubernetes API server" in str(err)
    line = env.audit_lines()[-1]
    assert line["event"] == "refused" and line["code"] == "UNAVAILABLE"


async def test_certmanager_with_a_token_client(env: Env) -> None:
    client = env.client("tok-node-a")
    manager = CertManager(client, bundle=env.material.bundle, ttl_seconds=600)
    try:
        cert = await manager.get(WEB, timeout=10)
        assert cert.identity == WEB and manager.status()[0]["state"] == "valid"
    finally:
        await manager.close()
        await client.close()


def test_caclient_token_mode_files(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(cert_pem(CaMaterial.generate().root))
    with pytest.raises(CaError, match=r"CA token file .*token.*projected ServiceAccount token"):
        CaClient("127.0.0.1:1", tmp_path, token_file=tmp_path / "token")
    (tmp_path / "token").write_text("two words")
    with pytest.raises(CaError, match="more than one word"):
        CaClient("127.0.0.1:1", tmp_path, token_file=tmp_path / "token")
    (tmp_path / "token").write_text("tok")
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(CaError, match=r"CA root bundle .*ca\.crt"):
        CaClient("127.0.0.1:1", tmp_path, token_file=tmp_path / "token")


def test_ztunnel_flags_token_mode(tmp_path: Path) -> None:
    from agent.cli import build_parser

    argv = ["ztunnel", "run", "--node", "node-a", "--cluster", "kubernetes", "--ca", "127.0.0.1:15012",
            "--credential-dir", str(tmp_path), "--ca-token-file", str(tmp_path / "token")]
    cfg = config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.ca_token_file == tmp_path / "token"
    (tmp_path / "ca.crt").write_text("root")
    with pytest.raises(ConfigError, match=r"--ca-token-file: .* is missing"):
        cfg.check()
    (tmp_path / "token").write_text("tok")
    cfg.check()  # ca.crt and the token suffice: no tls.crt / tls.key
    # without the token file the node credential is still required (backwards compatible)
    plain = ZtunnelConfig(node="node-a", cluster="kubernetes", ca_address="127.0.0.1:15012", credential_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tls\.crt is missing.*--ca-token-file"):
        plain.check()


# -- `ambit ca run --node-auth tokenreview` as a process


def _ambit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60)


async def test_ca_run_tokenreview_process(tmp_path: Path, double: KubeApiDouble) -> None:
    CaMaterial.generate().write(tmp_path / "ca")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", double.url)
    audit = tmp_path / "audit.jsonl"
    with ca_process("--dir", str(tmp_path / "ca"), "--cluster", f"kubernetes:{kubeconfig}",
                    "--node-auth", "tokenreview", "--audit-log", str(audit)) as (_, port):
        cred = tmp_path / "secrets"
        cred.mkdir()
        (cred / "ca.crt").write_bytes((tmp_path / "ca" / "root-cert.pem").read_bytes())
        (cred / "token").write_text("tok-node-a")
        client = CaClient(f"127.0.0.1:{port}", cred, token_file=cred / "token")
        try:
            await client.create_certificate(csr(WEB), 600)
            (cred / "token").write_text("tok-node-b")
            with pytest.raises(CaError) as e:
                await client.create_certificate(csr(WEB), 600)
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await client.close()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(a["event"], a["auth"], a["node"]) for a in lines] == [
        ("issued", "tokenreview", "node-a"), ("refused", "tokenreview", "node-b")]


def test_ca_run_flag_errors(tmp_path: Path) -> None:
    CaMaterial.generate().write(tmp_path / "ca")
    base = ["ca", "run", "--dir", str(tmp_path / "ca"), "--cluster", f"local:{tmp_path}"]
    r = _ambit(*base, "--node-auth", "tokenreview")
    assert r.returncode == 1 and "needs a Kubernetes API server" in r.stderr and "--token-review-api" in r.stderr
    r = _ambit(*base, "--token-audience", "x")
    assert r.returncode == 1 and "only apply with --node-auth tokenreview" in r.stderr
    r = _ambit(*base, "--node-auth", "tokenreview", "--token-review-api", f"kubernetes:{tmp_path}/none",
               "--token-service-account", "ambit")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = _ambit(*base, "--node-auth", "magic")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_parser_defaults_stay_credential() -> None:
    from agent.cli import build_parser

    argv = ["ca", "run", "--dir", "/x", "--cluster", "local:/y"]
    args: argparse.Namespace = build_parser(argv).parse_args(argv)
    assert args.node_auth == "credential" and args.token_review_api is None


async def test_grpcio_does_not_request_an_optional_client_certificate(tmp_path: Path) -> None:
    """Why credential mode still refuses a missing certificate in the handshake (UNAVAILABLE).

    With require_client_auth=False grpcio never asks for a client certificate,
    so a handler could not check one "if sent" through auth_context(). If this
    starts failing, grpcio gained that mode and credential mode can answer
    UNAUTHENTICATED from the handler instead.
    """
    m = CaMaterial.generate()
    write_node_credential(m, "node-a", tmp_path)
    key, chain = m.server_credential(["127.0.0.1"])
    creds = grpc.ssl_server_credentials([(key_pem(key), b"".join(cert_pem(c) for c in chain[:-1]))],
                                        root_certificates=cert_pem(m.root), require_client_auth=False)
    seen: list[dict[str, Any]] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append(dict(context.auth_context()))
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "probe.P", {"M": grpc.unary_unary_rpc_method_handler(handler)}),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        ch = grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(cert_pem(m.root), (tmp_path / "tls.key").read_bytes(),
                                         (tmp_path / "tls.crt").read_bytes()),
            options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)])
        try:
            await ch.unary_unary("/probe.P/M", request_serializer=None, response_deserializer=None)(b"", timeout=10)
        finally:
            await ch.close(None)
    finally:
        await server.stop(0)
    assert seen and seen[0].get("transport_security_type") == [b"ssl"]
    assert "x509_pem_cert" not in seen[0]  # the node credential was never asked for
