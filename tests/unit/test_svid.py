"""X.509-SVID verifier: accepts good SVIDs and rejects each broken MUST of the standard, naming it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambit.spiffe import SpiffeId
from ambit.svid import SvidError, SvidExpired, SvidNotYetValid, TrustBundle, verify_svid
from controlplane.pki import CaMaterial

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
ID = SpiffeId("cluster.local", "shop", "frontend")


@pytest.fixture(scope="module")
def ca() -> CaMaterial:
    return CaMaterial.generate("cluster.local", now=NOW - dt.timedelta(days=1))


def _ku(**on: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


Ext = tuple[x509.ExtensionType, bool]
DEFAULT_BC: Ext = (x509.BasicConstraints(ca=False, path_length=None), True)
DEFAULT_KU: Ext = (_ku(digital_signature=True), True)
DEFAULT_EKU: Ext = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)


def leaf(
    ca: CaMaterial,
    *,
    sans: list[x509.GeneralName] | None = None,
    bc: Ext | None = DEFAULT_BC,
    ku: Ext | None = DEFAULT_KU,
    eku: Ext | None = DEFAULT_EKU,
    not_before: dt.datetime = NOW - dt.timedelta(hours=1),
    not_after: dt.datetime = NOW + dt.timedelta(hours=1),
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = signer or (ca.ca_cert, ca.ca_key)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    san_list = [x509.UniformResourceIdentifier(ID.uri)] if sans is None else sans
    if san_list:
        b = b.add_extension(x509.SubjectAlternativeName(san_list), critical=False)
    for ext in (bc, ku, eku):
        if ext is not None:
            b = b.add_extension(ext[0], critical=ext[1])
    return b.sign(issuer_key, hashes.SHA256())


def intermediate(
    ca: CaMaterial, *, is_ca: bool = True, cert_sign: bool = True, td: str = "cluster.local",
    not_after: dt.datetime = NOW + dt.timedelta(days=1),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub-ca")]))
        .issuer_name(ca.ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(_ku(digital_signature=True, key_cert_sign=cert_sign, crl_sign=cert_sign), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]), critical=False)
        .sign(ca.ca_key, hashes.SHA256())
    )
    return cert, key


def test_accepts_a_good_svid(ca: CaMaterial) -> None:
    assert verify_svid([leaf(ca), ca.ca_cert], ca.bundle, NOW) == ID


def test_accepts_the_cas_own_leaves_and_no_eku(ca: CaMaterial) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_leaf(key.public_key(), ID, dt.timedelta(hours=1), now=NOW)
    assert verify_svid(chain[:-1], ca.bundle, NOW) == ID
    # EKU is a SHOULD: a leaf without it is valid.
    assert verify_svid([leaf(ca, eku=None), ca.ca_cert], ca.bundle, NOW) == ID


def test_path_length_constraint_is_enforced(ca: CaMaterial) -> None:
    # ambit's intermediate has pathLen 0: a sub-CA under it is not a valid path.
    sub = intermediate(ca)
    with pytest.raises(SvidError, match="path length"):
        verify_svid([leaf(ca, signer=sub), sub[0], ca.ca_cert], ca.bundle, NOW)


BAD_LEAVES: list[tuple[str, Callable[[CaMaterial], x509.Certificate], str]] = [
    ("no SAN", lambda ca: leaf(ca, sans=[]), "no subjectAltName"),
    ("two URI SANs", lambda ca: leaf(ca, sans=[x509.UniformResourceIdentifier(ID.uri),
                                               x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y")]),
     "has 2 URI SANs"),
    ("DNS SAN only", lambda ca: leaf(ca, sans=[x509.DNSName("frontend.shop")]), "has 0 URI SANs"),
    ("non-spiffe URI", lambda ca: leaf(ca, sans=[x509.UniformResourceIdentifier("https://cluster.local/ns/a/sa/b")]),
     "not a valid SPIFFE ID"),
    ("empty segment", lambda ca: leaf(ca, sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns//sa/b")]),
     "empty segment"),
    ("query", lambda ca: leaf(ca, sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b?x")]),
     "query"),
    ("port", lambda ca: leaf(ca, sans=[x509.UniformResourceIdentifier("spiffe://cluster.local:1/ns/a/sa/b")]),
     "port"),
    ("userinfo", lambda ca: leaf(ca, sans=[x509.UniformResourceIdentifier("spiffe://u@cluster.local/ns/a/sa/b")]),
     "userinfo"),
    ("no basicConstraints", lambda ca: leaf(ca, bc=None), "basicConstraints is missing"),
    ("cA=true", lambda ca: leaf(ca, bc=(x509.BasicConstraints(ca=True, path_length=None), True)), "cA=true"),
    ("no keyUsage", lambda ca: leaf(ca, ku=None), "keyUsage is missing"),
    ("keyUsage not critical", lambda ca: leaf(ca, ku=(_ku(digital_signature=True), False)), "not critical"),
    ("no digitalSignature", lambda ca: leaf(ca, ku=(_ku(key_encipherment=True), True)), "lacks digitalSignature"),
    ("keyCertSign", lambda ca: leaf(ca, ku=(_ku(digital_signature=True, key_cert_sign=True), True)), "keyCertSign"),
    ("cRLSign", lambda ca: leaf(ca, ku=(_ku(digital_signature=True, crl_sign=True), True)), "cRLSign"),
    ("EKU server only", lambda ca: leaf(ca, eku=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)),
     "lacks clientAuth"),
    ("EKU client only", lambda ca: leaf(ca, eku=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)),
     "lacks serverAuth"),
]


@pytest.mark.parametrize(("case", "make", "rule"), BAD_LEAVES, ids=[c[0] for c in BAD_LEAVES])
def test_rejects_broken_leaf(ca: CaMaterial, case: str, make: Callable[[CaMaterial], x509.Certificate], rule: str) -> None:
    with pytest.raises(SvidError) as e:
        verify_svid([make(ca), ca.ca_cert], ca.bundle, NOW)
    assert rule in str(e.value), case
    assert not isinstance(e.value, SvidExpired | SvidNotYetValid)


def test_expired_and_not_yet_valid_are_distinct(ca: CaMaterial) -> None:
    old = leaf(ca, not_before=NOW - dt.timedelta(hours=2), not_after=NOW - dt.timedelta(seconds=1))
    with pytest.raises(SvidExpired, match="expired at"):
        verify_svid([old, ca.ca_cert], ca.bundle, NOW)
    future = leaf(ca, not_before=NOW + dt.timedelta(minutes=1))
    with pytest.raises(SvidNotYetValid, match="not valid before"):
        verify_svid([future, ca.ca_cert], ca.bundle, NOW)


def test_expired_intermediate(ca: CaMaterial) -> None:
    sub = intermediate(ca, not_after=NOW - dt.timedelta(seconds=1))
    with pytest.raises(SvidExpired, match="intermediate"):
        verify_svid([leaf(ca, signer=sub), sub[0], ca.ca_cert], ca.bundle, NOW)


def test_signing_cert_rules(ca: CaMaterial) -> None:
    not_ca = intermediate(ca, is_ca=False)
    with pytest.raises(SvidError, match="must be a CA"):
        verify_svid([leaf(ca, signer=not_ca), not_ca[0], ca.ca_cert], ca.bundle, NOW)
    no_sign = intermediate(ca, cert_sign=False)
    with pytest.raises(SvidError, match="keyCertSign"):
        verify_svid([leaf(ca, signer=no_sign), no_sign[0], ca.ca_cert], ca.bundle, NOW)
    foreign = intermediate(ca, td="evil.org")
    with pytest.raises(SvidError, match=r"trust domain 'evil.org'"):
        verify_svid([leaf(ca, signer=foreign), foreign[0], ca.ca_cert], ca.bundle, NOW)


def test_chain_must_reach_the_bundle(ca: CaMaterial) -> None:
    other = CaMaterial.generate("cluster.local", now=NOW - dt.timedelta(days=1))
    good = leaf(ca)
    with pytest.raises(SvidError, match="no valid chain"):
        verify_svid([good, ca.ca_cert], other.bundle, NOW)
    # Missing intermediate: the leaf alone does not chain to the root.
    with pytest.raises(SvidError, match="no valid chain"):
        verify_svid([good], ca.bundle, NOW)
    # A leaf signed by an unrelated key claiming the CA's name.
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    forged = leaf(ca, signer=(ca.ca_cert, impostor_key))
    with pytest.raises(SvidError, match="no valid chain"):
        verify_svid([forged, ca.ca_cert], ca.bundle, NOW)


def test_trust_domain_must_match(ca: CaMaterial) -> None:
    foreign = leaf(ca, sans=[x509.UniformResourceIdentifier("spiffe://evil.org/ns/shop/sa/frontend")])
    with pytest.raises(SvidError, match=r"'evil.org' is not the trusted 'cluster.local'"):
        verify_svid([foreign, ca.ca_cert], ca.bundle, NOW)


def test_empty_chain_and_bundle_pem(ca: CaMaterial) -> None:
    with pytest.raises(SvidError, match="no certificate"):
        verify_svid([], ca.bundle, NOW)
    bundle = TrustBundle.from_pem("cluster.local", ca.bundle.to_pem())
    assert bundle.roots == [ca.root]
    with pytest.raises(SvidError, match="not a PEM"):
        TrustBundle.from_pem("cluster.local", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(SvidError, match=r"no certificate|not a PEM"):
        TrustBundle.from_pem("cluster.local", b"")
