"""`ambit ca run` as a subprocess on loopback: issues to the right node, refuses the others with the right codes."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from ambit.spiffe import SpiffeId
from ambit.svid import verify_svid
from controlplane.pki import CA_SERVER_NAME, CaMaterial, cert_pem, key_pem, write_node_credential
from tests.integration.ca_process import ca_process
from ztunnel.identity.caclient import CaClient, CaError
from ztunnel.identity.manager import CertManager, make_csr

FRONTEND = SpiffeId("cluster.local", "shop", "frontend")
CLUSTER = textwrap.dedent("""
    apiVersion: v1
    kind: Namespace
    metadata: {name: shop}
    ---
    apiVersion: v1
    kind: Pod
    metadata: {name: frontend-0, namespace: shop}
    spec: {nodeName: node-a, serviceAccountName: frontend}
    """)
METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


class Ca:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen[str], audit: Path) -> None:
        self.root, self.port, self.proc, self.audit = root, port, proc, audit
        self.material = CaMaterial.load(root / "ca")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def audit_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]


def _ambit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ca]:
    root = tmp_path_factory.mktemp("ca")
    (root / "cluster").mkdir()
    (root / "cluster" / "shop.yaml").write_text(CLUSTER)
    r = _ambit("ca", "init", "--dir", str(root / "ca"))
    assert r.returncode == 0, r.stderr
    for node in ("node-a", "node-b"):
        r = _ambit("ca", "node-credential", "--dir", str(root / "ca"), "--node", node, "--out", str(root / node))
        assert r.returncode == 0, r.stderr
    audit = root / "audit.jsonl"
    with ca_process("--dir", str(root / "ca"), "--cluster", f"local:{root / 'cluster'}",
                    "--max-ttl", "2h", "--audit-log", str(audit)) as (proc, port):
        yield Ca(root, port, proc, audit)


def _channel(ca: Ca, cred: Path | None = None, key_chain: tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
    root = (ca.root / "node-a" / "ca.crt").read_bytes()
    if cred is not None:
        key_chain = ((cred / "tls.key").read_bytes(), (cred / "tls.crt").read_bytes())
    creds = grpc.ssl_channel_credentials(root, *(key_chain or (None, None)))
    return grpc.aio.secure_channel(ca.address, creds, options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)])


def _wire_messages() -> tuple[Any, Any]:
    """The request/response types built only from the wire description of istiod's ca.proto."""
    f = descriptor_pb2.FileDescriptorProto(name="test/ca.proto", package="istio.v1.auth", syntax="proto3",
                                           dependency=["google/protobuf/struct.proto"])
    fd = descriptor_pb2.FieldDescriptorProto
    req = f.message_type.add(name="IstioCertificateRequest")
    req.field.add(name="csr", number=1, type=fd.TYPE_STRING, label=fd.LABEL_OPTIONAL)
    req.field.add(name="validity_duration", number=2, type=fd.TYPE_INT64, label=fd.LABEL_OPTIONAL)
    req.field.add(name="metadata", number=3, type=fd.TYPE_MESSAGE, label=fd.LABEL_OPTIONAL,
                  type_name=".google.protobuf.Struct")
    resp = f.message_type.add(name="IstioCertificateResponse")
    resp.field.add(name="cert_chain", number=1, type=fd.TYPE_STRING, label=fd.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    s = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(s)
    pool.Add(s)
    pool.Add(f)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse")))


async def _wire_call(ch: grpc.aio.Channel, csr: str, ttl: int = 3600) -> list[str]:
    req_t, resp_t = _wire_messages()
    req = req_t(csr=csr, validity_duration=ttl)
    req.metadata.fields["ClusterID"].string_value = "Kubernetes"
    call = ch.unary_unary(METHOD, request_serializer=lambda m: m.SerializeToString(),
                          response_deserializer=resp_t.FromString)
    resp = await call(req, timeout=10)
    return list(resp.cert_chain)


async def test_wire_client_gets_a_chain_for_its_node(ca: Ca) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ch = _channel(ca, ca.root / "node-a")
    try:
        pems = await _wire_call(ch, make_csr(FRONTEND, key), ttl=999_999)
    finally:
        await ch.close(None)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    assert chain[-1] == ca.material.root
    assert verify_svid(chain[:-1], ca.material.bundle) == FRONTEND
    leaf = chain[0]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(hours=2, minutes=6)  # --max-ttl 2h (+5 min backdate)
    issued = [a for a in ca.audit_lines() if a["event"] == "issued" and a["serial"] == f"{leaf.serial_number:x}"]
    assert issued and issued[0]["node"] == "node-a" and issued[0]["identity"] == FRONTEND.uri
    assert issued[0]["granted_ttl"] == 7200


async def _code(ca: Ca, ch: grpc.aio.Channel, csr: str) -> tuple[grpc.StatusCode, str]:
    try:
        await _wire_call(ch, csr)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    finally:
        await ch.close(None)
    raise AssertionError("the CA issued a certificate it should have refused")


async def test_other_node_is_denied(ca: Ca) -> None:
    csr = make_csr(FRONTEND, ec.generate_private_key(ec.SECP256R1()))
    code, details = await _code(ca, _channel(ca, ca.root / "node-b"), csr)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "node node-b" in details and "scheduled on: node-a" in details
    refused = [a for a in ca.audit_lines() if a["event"] == "refused" and a["node"] == "node-b"]
    assert refused and refused[-1]["code"] == "PERMISSION_DENIED"


async def test_invalid_csrs(ca: Ca) -> None:
    cases = [
        ("garbage", "not a PEM PKCS#10"),
        (make_csr(SpiffeId("evil.org", "shop", "frontend"), ec.generate_private_key(ec.SECP256R1())), "evil.org"),
    ]
    for csr, why in cases:
        code, details = await _code(ca, _channel(ca, ca.root / "node-a"), csr)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert why in details


async def test_workload_certificate_is_not_a_node_credential(ca: Ca) -> None:
    # Chains to the CA's root, but is a workload SVID: UNAUTHENTICATED.
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.material.sign_leaf(key.public_key(), FRONTEND, dt.timedelta(hours=1))
    pem_chain = b"".join(cert_pem(c) for c in chain[:-1])
    csr = make_csr(FRONTEND, ec.generate_private_key(ec.SECP256R1()))
    code, details = await _code(ca, _channel(ca, key_chain=(key_pem(key), pem_chain)), csr)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "not a node credential" in details


async def test_missing_or_foreign_credential_fails_in_the_handshake(ca: Ca, tmp_path: Path) -> None:
    csr = make_csr(FRONTEND, ec.generate_private_key(ec.SECP256R1()))
    code, _ = await _code(ca, _channel(ca), csr)
    assert code == grpc.StatusCode.UNAVAILABLE
    write_node_credential(CaMaterial.generate(), "node-a", tmp_path)
    code, _ = await _code(ca, _channel(ca, tmp_path), csr)
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_caclient_and_certmanager_against_the_real_ca(ca: Ca) -> None:
    client = CaClient(ca.address, ca.root / "node-a")
    manager = CertManager(client, bundle=ca.material.bundle, ttl_seconds=3600)
    try:
        cert = await manager.get(FRONTEND, timeout=10)
        assert cert.identity == FRONTEND
        assert verify_svid(list(cert.chain), ca.material.bundle) == FRONTEND
        row = manager.status()[0]
        assert row["state"] == "valid" and row["serial"] == f"{cert.serial:x}"
    finally:
        await manager.close()
        await client.close()
    denied = CaClient(ca.address, ca.root / "node-b")
    try:
        with pytest.raises(CaError) as e:
            await denied.create_certificate(make_csr(FRONTEND, ec.generate_private_key(ec.SECP256R1())), 60)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await denied.close()


def test_caclient_names_missing_credentials(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=r"tls\.crt.*ambit ca node-credential"):
        CaClient("127.0.0.1:1", tmp_path)


async def test_follows_cluster_changes(ca: Ca) -> None:
    # Scheduling a backend pod on node-b makes backend issuable there, with no CA restart.
    backend = SpiffeId("cluster.local", "shop", "backend")
    pod = ca.root / "cluster" / "backend.yaml"
    pod.write_text("kind: Pod\nmetadata: {name: backend-0, namespace: shop}\n"
                   "spec: {nodeName: node-b, serviceAccountName: backend}\n")
    client = CaClient(ca.address, ca.root / "node-b")
    try:
        pems = await client.create_certificate(make_csr(backend, ec.generate_private_key(ec.SECP256R1())), 60)
        assert verify_svid([x509.load_pem_x509_certificate(p.encode()) for p in pems[:-1]], ca.material.bundle) == backend
    finally:
        await client.close()
        pod.unlink()


def test_cli_errors(ca: Ca, tmp_path: Path) -> None:
    r = _ambit("ca", "init", "--dir", str(ca.root / "ca"))
    assert r.returncode == 1 and "already holds a CA" in r.stderr and "--force" in r.stderr
    r = _ambit("ca", "run", "--dir", str(tmp_path / "none"), "--cluster", f"local:{tmp_path}")
    assert r.returncode == 1 and "missing root-cert.pem" in r.stderr
    r = _ambit("ca", "run", "--dir", str(ca.root / "ca"), "--cluster", f"local:{tmp_path}", "--listen", "nope")
    assert r.returncode == 1 and "HOST:PORT" in r.stderr
    r = _ambit("ca", "node-credential", "--dir", str(ca.root / "ca"), "--node", "Bad_Node", "--out", str(tmp_path))
    assert r.returncode == 1 and "not a DNS subdomain" in r.stderr
