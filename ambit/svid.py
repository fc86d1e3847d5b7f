"""X.509-SVID verification: every MUST of the SPIFFE X509-SVID standard, then the chain to the bundle.

Pure (no I/O). `verify_svid` checks, in order, each rule on the leaf, the
validity period of every certificate (expired and not-yet-valid are distinct
errors), each rule on the signing certificates, the trust domain, and finally
the signature chain to the bundle's roots with `cryptography.x509.verification`.
Each rejection names the rule it applied.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from ambit import AmbitError
from ambit.spiffe import SpiffeError, SpiffeId


class SvidError(AmbitError):
    """A certificate chain is not a valid X.509-SVID for the trust bundle; names the rule."""


class SvidExpired(SvidError):
    """A certificate of the chain is past its notAfter."""


class SvidNotYetValid(SvidError):
    """A certificate of the chain is before its notBefore (often: clock skew between nodes)."""


def load_pem_chain(pem: bytes, what: str = "PEM") -> list[x509.Certificate]:
    """All certificates of a PEM blob, in order; SvidError if there are none or one is broken."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise SvidError(f"{what}: not a PEM certificate list: {e}") from e
    if not certs:
        raise SvidError(f"{what}: contains no certificate")
    return certs


@dataclass
class TrustBundle:
    """The root certificates trusted for one trust domain."""

    trust_domain: str
    roots: list[x509.Certificate] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.roots:
            raise SvidError(f"trust bundle for {self.trust_domain!r} has no root certificate")

    @classmethod
    def from_pem(cls, trust_domain: str, pem: bytes) -> TrustBundle:
        return cls(trust_domain, load_pem_chain(pem, f"trust bundle for {trust_domain!r}"))

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return b"".join(c.public_bytes(Encoding.PEM) for c in self.roots)


def _describe(cert: x509.Certificate) -> str:
    return f"certificate serial {cert.serial_number:x} ({cert.subject.rfc4514_string() or 'empty subject'})"


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:  # a duplicated or malformed extension
        raise SvidError(f"{_describe(cert)}: unparsable extensions: {e}") from e


def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf: exactly one URI SAN, a valid workload SPIFFE ID."""
    san = _ext(cert, x509.SubjectAlternativeName)
    if san is None:
        raise SvidError(f"leaf {_describe(cert)}: no subjectAltName; an SVID has exactly one URI SAN")
    assert isinstance(san.value, x509.SubjectAlternativeName)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidError(
            f"leaf {_describe(cert)}: has {len(uris)} URI SANs; an SVID has exactly one"
        )
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeError as e:
        raise SvidError(f"leaf {_describe(cert)}: URI SAN is not a valid SPIFFE ID: {e}") from e


def check_leaf(cert: x509.Certificate) -> SpiffeId:
    """The leaf rules of X509-SVID (URI SAN, basic constraints, key usage, EKU); returns its ID."""
    ident = leaf_spiffe_id(cert)
    where = f"leaf {_describe(cert)} ({ident})"
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None:
        raise SvidError(f"{where}: basicConstraints is missing; a leaf SVID must state cA=false")
    assert isinstance(bc.value, x509.BasicConstraints)
    if bc.value.ca:
        raise SvidError(f"{where}: basicConstraints cA=true; a leaf SVID must have cA=false")
    if bc.value.path_length is not None:
        raise SvidError(f"{where}: basicConstraints has pathLenConstraint; a leaf SVID must not")
    ku = _ext(cert, x509.KeyUsage)
    if ku is None:
        raise SvidError(f"{where}: keyUsage is missing; an SVID must carry it, critical")
    if not ku.critical:
        raise SvidError(f"{where}: keyUsage is not critical; an SVID must mark it critical")
    assert isinstance(ku.value, x509.KeyUsage)
    if not ku.value.digital_signature:
        raise SvidError(f"{where}: keyUsage lacks digitalSignature; a leaf SVID must set it")
    if ku.value.key_cert_sign:
        raise SvidError(f"{where}: keyUsage has keyCertSign; a leaf SVID must not")
    if ku.value.crl_sign:
        raise SvidError(f"{where}: keyUsage has cRLSign; a leaf SVID must not")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        assert isinstance(eku.value, x509.ExtendedKeyUsage)
        usages = set(eku.value)
        for oid, name in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        ):
            if oid not in usages:
                raise SvidError(
                    f"{where}: extendedKeyUsage lacks {name}; an SVID's EKU must include serverAuth and clientAuth"
                )
    return ident


def check_signing(cert: x509.Certificate, trust_domain: str) -> None:
    """The signing-certificate rules: cA=true and keyUsage keyCertSign."""
    where = f"signing {_describe(cert)}"
    bc = _ext(cert, x509.BasicConstraints)
    if bc is None or not bc.value.ca:  # type: ignore[attr-defined]
        raise SvidError(f"{where}: basicConstraints cA is not true; a signing certificate must be a CA")
    ku = _ext(cert, x509.KeyUsage)
    if ku is None or not ku.value.key_cert_sign:  # type: ignore[attr-defined]
        raise SvidError(f"{where}: keyUsage lacks keyCertSign; a signing certificate must set it")
    san = _ext(cert, x509.SubjectAlternativeName)
    if san is not None:
        assert isinstance(san.value, x509.SubjectAlternativeName)
        for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
            if not uri.startswith("spiffe://"):
                continue
            try:
                from ambit.spiffe import validate_uri

                td, _ = validate_uri(uri)
            except SpiffeError as e:
                raise SvidError(f"{where}: URI SAN is not a valid SPIFFE ID: {e}") from e
            if td != trust_domain:
                raise SvidError(f"{where}: belongs to trust domain {td!r}, not {trust_domain!r}")


def check_validity(cert: x509.Certificate, now: dt.datetime, role: str) -> None:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < nb:
        raise SvidNotYetValid(
            f"{role} {_describe(cert)}: not valid before {nb.isoformat()} (now {now.isoformat()}; clock skew?)"
        )
    if now > na:
        raise SvidExpired(
            f"{role} {_describe(cert)}: expired at {na.isoformat()} (now {now.isoformat()})"
        )


def verify_svid(
    chain: Sequence[x509.Certificate], bundle: TrustBundle, now: dt.datetime | None = None
) -> SpiffeId:
    """Verify an X.509-SVID chain (leaf first) against `bundle`; return the leaf's SPIFFE ID.

    Raises SvidExpired / SvidNotYetValid for the validity period and SvidError
    for every other rule, naming it.
    """
    if not chain:
        raise SvidError("empty certificate chain: the peer presented no certificate")
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    leaf, intermediates = chain[0], list(chain[1:])
    ident = check_leaf(leaf)
    if ident.trust_domain != bundle.trust_domain:
        raise SvidError(
            f"leaf {ident}: trust domain {ident.trust_domain!r} is not the trusted {bundle.trust_domain!r}"
        )
    check_validity(leaf, now, "leaf")
    for c in intermediates:
        check_validity(c, now, "intermediate")
        check_signing(c, bundle.trust_domain)
    for root in bundle.roots:
        check_signing(root, bundle.trust_domain)
    _verify_path(leaf, intermediates, bundle, now, ident)
    return ident


# The web-PKI defaults of cryptography's verifier are stricter than SPIFFE in
# ways that reject valid SVIDs (an SVID leaf may lack EKU; SPIFFE roots often
# lack AKI or non-critical basicConstraints), so the extension policies are
# relaxed to "permit all" and the SPIFFE rules are enforced by the checks above.
# The verifier still does what it is good at: path building, signatures,
# validity of every certificate on the path, name and key constraints.
_POLICY_CA = verification.ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, verification.Criticality.AGNOSTIC, None
)
_POLICY_EE = verification.ExtensionPolicy.permit_all()


def _verify_path(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    bundle: TrustBundle,
    now: dt.datetime,
    ident: SpiffeId,
) -> None:
    store = verification.Store(list(bundle.roots))
    verifier = (
        verification.PolicyBuilder()
        .store(store)
        .time(now)
        .extension_policies(ca_policy=_POLICY_CA, ee_policy=_POLICY_EE)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except verification.VerificationError as e:
        raise SvidError(
            f"leaf {ident}: no valid chain to the {bundle.trust_domain!r} trust bundle: {e}"
        ) from e
