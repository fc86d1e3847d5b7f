"""The CA's certificate material: creating and loading the Istio plug-in layout, signing SVIDs.

Files in a CA directory (Istio's "plug-in CA" layout, so an operator can hand
the same directory to istiod): `root-cert.pem` (self-signed root),
`ca-cert.pem` + `ca-key.pem` (the intermediate that signs every leaf, signed by
the root), `cert-chain.pem` (ca-cert then root). `ambit ca init` writes an
intermediate signed by a fresh root rather than making the root sign leaves, so
the root key can later be taken offline.

Node credentials are X.509-SVIDs for `spiffe://<td>/ns/ambit-system/sa/ztunnel`
whose subject is `O=ambit:nodes, CN=ambit:node:<node>` (the kubelet's
`system:node:<name>` convention): the URI SAN says *what* the caller is, the
subject says *which node* it runs on. Only this CA issues them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambit.spiffe import SpiffeError, SpiffeId, validate_trust_domain, validate_uri
from ambit.svid import SvidError, TrustBundle, load_pem_chain
from controlplane import ControlPlaneError

ROOT_CERT = "root-cert.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
CA_FILES = (ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN)

NODE_NAMESPACE = "ambit-system"
NODE_SERVICE_ACCOUNT = "ztunnel"
NODE_ORG = "ambit:nodes"
NODE_CN_PREFIX = "ambit:node:"
CA_SERVER_NAME = "ambit-ca.ambit-system.svc"

ROOT_TTL = dt.timedelta(days=3650)
INTERMEDIATE_TTL = dt.timedelta(days=1825)
NODE_TTL = dt.timedelta(days=365)
# Leaves start a little in the past so that a peer whose clock is slightly
# behind does not see a brand-new certificate as not yet valid.
BACKDATE = dt.timedelta(minutes=5)


class PkiError(ControlPlaneError):
    """CA material is missing, unreadable or inconsistent, or a CSR cannot be signed."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    ttl: dt.timedelta,
    path_length: int | None,
    now: dt.datetime,
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
    )
    if issuer_key is not key:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class CaMaterial:
    """A loaded CA: the signing intermediate, its key, the chain above it, the root."""

    trust_domain: str
    root: x509.Certificate
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # ca-cert first, root last

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, [self.root])

    @property
    def intermediates(self) -> list[x509.Certificate]:
        """The chain without the root: what a leaf's holder sends after its leaf."""
        return [c for c in self.chain if c != self.root]

    @classmethod
    def generate(cls, trust_domain: str = "cluster.local", now: dt.datetime | None = None) -> CaMaterial:
        """A fresh root and intermediate for `trust_domain` (kept in memory)."""
        try:
            validate_trust_domain(trust_domain)
        except SpiffeError as e:
            raise PkiError(f"--trust-domain: {e}") from e
        now = now or _now()
        root_key, ca_key = new_key(), new_key()
        org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ambit")
        root_name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"ambit root CA {trust_domain}")])
        ca_name = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"ambit intermediate CA {trust_domain}")])
        root = _ca_cert(root_name, root_key, root_name, root_key, trust_domain, ROOT_TTL, 1, now)
        ca = _ca_cert(ca_name, ca_key, root_name, root_key, trust_domain, INTERMEDIATE_TTL, 0, now)
        return cls(trust_domain, root, ca, ca_key, (ca, root))

    def write(self, directory: Path, force: bool = False) -> None:
        """Write the plug-in layout; refuse to overwrite an existing CA unless `force`."""
        directory.mkdir(parents=True, exist_ok=True)
        existing = [f for f in CA_FILES if (directory / f).exists()]
        if existing and not force:
            raise PkiError(
                f"{directory} already holds a CA ({', '.join(existing)}); "
                "pass --force to replace it (every issued certificate stops being trusted)"
            )
        files = {
            ROOT_CERT: cert_pem(self.root),
            CA_CERT: cert_pem(self.ca_cert),
            CERT_CHAIN: b"".join(cert_pem(c) for c in self.chain),
            CA_KEY: key_pem(self.ca_key),
        }
        for name, data in files.items():
            _write_file(directory / name, data, 0o600 if name == CA_KEY else 0o644)

    @classmethod
    def load(cls, directory: Path, trust_domain: str | None = None) -> CaMaterial:
        """Load a plug-in-layout directory; the trust domain comes from the root's SPIFFE URI SAN
        unless given (Istio's own roots carry none)."""
        missing = [f for f in CA_FILES if not (directory / f).is_file()]
        if missing:
            raise PkiError(
                f"CA directory {directory}: missing {', '.join(missing)}; create it with `ambit ca init --dir {directory}`"
            )
        try:
            root = load_pem_chain((directory / ROOT_CERT).read_bytes(), str(directory / ROOT_CERT))[0]
            ca_cert = load_pem_chain((directory / CA_CERT).read_bytes(), str(directory / CA_CERT))[0]
            chain = tuple(load_pem_chain((directory / CERT_CHAIN).read_bytes(), str(directory / CERT_CHAIN)))
        except SvidError as e:
            raise PkiError(str(e)) from e
        try:
            key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise PkiError(f"{directory / CA_KEY}: not an unencrypted PEM private key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / CA_KEY}: only ECDSA CA keys are supported")
        if key.public_key().public_numbers() != ca_cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise PkiError(f"{directory}: {CA_KEY} does not match {CA_CERT}")
        if chain[0] != ca_cert:
            raise PkiError(f"{directory}: {CERT_CHAIN} does not start with {CA_CERT}")
        if root not in chain:
            chain = (*chain, root)
        td = trust_domain or _uri_trust_domain(root)
        if td is None:
            raise PkiError(
                f"{directory / ROOT_CERT} has no spiffe:// URI SAN naming the trust domain; pass --trust-domain"
            )
        return cls(td, root, ca_cert, key, chain)

    # -- issuing ---------------------------------------------------------

    def sign_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey | object,
        identity: SpiffeId,
        ttl: dt.timedelta,
        *,
        subject: x509.Name | None = None,
        dns_names: Sequence[str] = (),
        ips: Sequence[str] = (),
        now: dt.datetime | None = None,
    ) -> list[x509.Certificate]:
        """Sign an X.509-SVID for `identity` over `public_key`; returns leaf, intermediates..., root."""
        now = now or _now()
        not_after = min(now + ttl, self.ca_cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(subject or x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False
            )
            # An empty subject requires the SAN to be critical (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(sans), critical=subject is None)
            .sign(self.ca_key, hashes.SHA256())
        )
        return [leaf, *self.chain]

    def node_credential(
        self, node: str, ttl: dt.timedelta = NODE_TTL, now: dt.datetime | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        """A ztunnel credential for `node`: key and chain (leaf, intermediate, root)."""
        check_node_name(node)
        key = new_key()
        ident = SpiffeId(self.trust_domain, NODE_NAMESPACE, NODE_SERVICE_ACCOUNT)
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODE_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, NODE_CN_PREFIX + node),
        ])
        return key, self.sign_leaf(key.public_key(), ident, ttl, subject=subject, now=now)

    def server_credential(
        self, hosts: Sequence[str] = (), now: dt.datetime | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        """The CA server's own TLS certificate (made at start, kept in memory)."""
        key = new_key()
        ident = SpiffeId(self.trust_domain, NODE_NAMESPACE, "ambit-ca")
        dns, ips = [CA_SERVER_NAME, "localhost"], ["127.0.0.1"]
        for h in hosts:
            try:
                ipaddress.ip_address(h)
                ips.append(h)
            except ValueError:
                dns.append(h)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_SERVER_NAME)])
        leaf_chain = self.sign_leaf(
            key.public_key(), ident, dt.timedelta(days=365), subject=subject,
            dns_names=sorted(set(dns)), ips=sorted(set(ips)), now=now,
        )
        return key, leaf_chain


def node_of(cert: x509.Certificate) -> str | None:
    """The node name a node credential was issued to, or None when it is not one."""
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if orgs != [NODE_ORG] or len(cns) != 1:
        return None
    cn = str(cns[0])
    if not cn.startswith(NODE_CN_PREFIX):
        return None
    node = cn.removeprefix(NODE_CN_PREFIX)
    return node or None


def check_node_name(node: str) -> str:
    """Kubernetes node names are DNS subdomains (RFC 1123): lowercase, digits, '-', '.'."""
    ok = (
        0 < len(node) <= 253
        and all(c.islower() or c.isdigit() or c in "-." for c in node)
        and node[0].isalnum()
        and node[-1].isalnum()
    )
    if not ok:
        raise PkiError(f"node name {node!r} is not a DNS subdomain (lowercase letters, digits, '-', '.')")
    return node


def _uri_trust_domain(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            td, _ = validate_uri(uri)
        except SpiffeError:
            continue
        return td
    return None


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file created with its final mode, then rename: no window where a
    key is world-readable, and no half-written file after a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_node_credential(
    material: CaMaterial, node: str, out: Path, ttl: dt.timedelta = NODE_TTL
) -> Path:
    """Write tls.crt (leaf + intermediates), tls.key, ca.crt (root) for the ztunnel of `node`."""
    key, chain = material.node_credential(node, ttl)
    out.mkdir(parents=True, exist_ok=True)
    _write_file(out / "tls.key", key_pem(key), 0o600)
    _write_file(out / "tls.crt", b"".join(cert_pem(c) for c in chain if c != material.root), 0o644)
    _write_file(out / "ca.crt", cert_pem(material.root), 0o644)
    return out
