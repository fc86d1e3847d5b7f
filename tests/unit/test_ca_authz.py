"""The CA's pure decisions: what a CSR asks for (INVALID_ARGUMENT cases) and may a node have it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambit.cluster import build_state
from ambit.spiffe import SpiffeId
from ambit.svid import verify_svid
from controlplane import authz
from controlplane.pki import CaMaterial, PkiError, node_of, write_node_credential
from ztunnel.identity.manager import make_csr

TD = "cluster.local"


def pod(name: str, ns: str, sa: str, node: str) -> dict[str, object]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "serviceAccountName": sa}}


CLUSTER = build_state([
    {"kind": "Namespace", "metadata": {"name": "shop"}},
    {"kind": "Node", "metadata": {"name": "node-a"}},
    {"kind": "Node", "metadata": {"name": "node-b"}},
    pod("fe-1", "shop", "frontend", "node-a"),
    pod("be-1", "shop", "backend", "node-b"),
    pod("be-2", "shop", "backend", "node-a"),
])

AUTHZ_TABLE = [
    ("node-a", "shop", "frontend", authz.OK, "hosts a pod"),
    ("node-a", "shop", "backend", authz.OK, "hosts a pod"),
    ("node-b", "shop", "backend", authz.OK, "hosts a pod"),
    ("node-b", "shop", "frontend", authz.PERMISSION_DENIED, "scheduled on: node-a"),
    ("node-a", "shop", "db", authz.PERMISSION_DENIED, "no pod in namespace shop runs as service account db"),
    ("node-a", "other", "frontend", authz.PERMISSION_DENIED, "namespace other has no pods"),
    ("node-z", "shop", "frontend", authz.PERMISSION_DENIED, "node node-z is not in the cluster state"),
]


@pytest.mark.parametrize(("node", "ns", "sa", "code", "why"), AUTHZ_TABLE)
def test_authorize_table(node: str, ns: str, sa: str, code: str, why: str) -> None:
    v = authz.authorize(node, SpiffeId(TD, ns, sa), CLUSTER)
    assert v.code == code
    assert why in v.reason
    assert v.allowed == (code == authz.OK)


def _csr(sans: list[x509.GeneralName], key: object | None = None) -> str:
    k = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = b.sign(k, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _uri(u: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(u)


def _tampered() -> str:
    pem = make_csr(SpiffeId(TD, "shop", "frontend"), ec.generate_private_key(ec.SECP256R1()))
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # flip bits inside the signature
    import base64

    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


CSR_TABLE = [
    ("empty", lambda: "", "csr is empty"),
    ("garbage", lambda: "hello", "not a PEM PKCS#10"),
    ("bad signature", _tampered, "signature does not verify"),
    ("no SAN", lambda: _csr([]), "no subjectAltName"),
    ("two URIs", lambda: _csr([_uri("spiffe://cluster.local/ns/a/sa/b"), _uri("spiffe://cluster.local/ns/a/sa/c")]),
     "has 2 URI SANs"),
    ("DNS only", lambda: _csr([x509.DNSName("x.example")]), "has 0 URI SANs"),
    ("URI plus DNS", lambda: _csr([_uri("spiffe://cluster.local/ns/a/sa/b"), x509.DNSName("x")]), "only one spiffe"),
    ("non-spiffe", lambda: _csr([_uri("https://cluster.local/ns/a/sa/b")]), "is not a SPIFFE ID"),
    ("bad spiffe", lambda: _csr([_uri("spiffe://cluster.local/ns/a/sa/b?q")]), "query"),
    ("foreign td", lambda: _csr([_uri("spiffe://evil.org/ns/a/sa/b")]), "trust domain 'evil.org'"),
    ("small rsa", lambda: _csr([_uri("spiffe://cluster.local/ns/a/sa/b")], rsa.generate_private_key(65537, 1024)),
     "too small"),
    ("weak curve", lambda: _csr([_uri("spiffe://cluster.local/ns/a/sa/b")], ec.generate_private_key(ec.SECP256K1())),
     "not allowed"),
]


@pytest.mark.parametrize(("case", "make", "why"), CSR_TABLE, ids=[c[0] for c in CSR_TABLE])
def test_inspect_csr_rejections(case: str, make: object, why: str) -> None:
    got = authz.inspect_csr(make(), TD)  # type: ignore[operator]
    assert isinstance(got, authz.Verdict), case
    assert got.code == authz.INVALID_ARGUMENT
    assert why in got.reason


def test_inspect_csr_good() -> None:
    ident = SpiffeId(TD, "shop", "frontend")
    got = authz.inspect_csr(make_csr(ident, ec.generate_private_key(ec.SECP256R1())), TD)
    assert isinstance(got, authz.CsrFacts)
    assert got.identity == ident


def test_ca_dir_roundtrip_and_force(tmp_path: Path) -> None:
    m = CaMaterial.generate("example.org")
    m.write(tmp_path)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    loaded = CaMaterial.load(tmp_path)
    assert loaded.trust_domain == "example.org"
    assert loaded.root == m.root and loaded.ca_cert == m.ca_cert
    with pytest.raises(PkiError, match=r"already holds a CA.*--force"):
        CaMaterial.generate().write(tmp_path)
    CaMaterial.generate().write(tmp_path, force=True)
    assert CaMaterial.load(tmp_path).root != m.root
    with pytest.raises(PkiError, match=r"missing root-cert.pem"):
        CaMaterial.load(tmp_path / "nope")
    with pytest.raises(PkiError, match="trust-domain"):
        CaMaterial.generate("Bad_TD:1")


def test_mismatched_key_is_refused(tmp_path: Path) -> None:
    CaMaterial.generate().write(tmp_path)
    other = tmp_path / "o"
    CaMaterial.generate().write(other)
    (tmp_path / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        CaMaterial.load(tmp_path)


def test_node_credential_is_an_svid_naming_the_node(tmp_path: Path) -> None:
    m = CaMaterial.generate()
    write_node_credential(m, "node-a", tmp_path)
    chain = x509.load_pem_x509_certificates((tmp_path / "tls.crt").read_bytes())
    ident = verify_svid(chain, m.bundle)
    assert ident.uri == "spiffe://cluster.local/ns/ambit-system/sa/ztunnel"
    assert node_of(chain[0]) == "node-a"
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600
    assert x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()) == m.root
    with pytest.raises(PkiError, match="not a DNS subdomain"):
        m.node_credential("Node_A")
    # A workload SVID is not a node credential.
    key = ec.generate_private_key(ec.SECP256R1())
    assert node_of(m.sign_leaf(key.public_key(), SpiffeId(TD, "a", "b"), dt.timedelta(hours=1))[0]) is None
