"""TLS contexts for HBONE: mutual TLS 1.3 with X.509-SVIDs, ALPN h2, identities from verified certs.

The server names no certificate of its own: an SNI callback picks, per
handshake, the certificate of the destination workload the client asked for
(`sni_for(identity)`), from a lookup function the ztunnel provides; an unknown
or unserved name fails the handshake (fail closed). Clients send the expected
server identity in SNI and check afterwards that the server proved exactly it.

Private keys reach OpenSSL through an anonymous memfd (`/proc/self/fd/N`),
never through a file on disk: Python's ssl module can only load keys from a
path, and a memfd is a path that lives only in this process's memory.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ambit.spiffe import SpiffeError, SpiffeId
from ambit.svid import SvidError, TrustBundle, check_leaf, check_validity, verify_svid
from ztunnel.identity import IdentityError
from ztunnel.identity.manager import WorkloadCert
from ztunnel.identity.sslcompat import peer_chain_der

ALPN = "h2"
SNI_SUFFIX_NS = "ns"
SNI_SUFFIX_SA = "sa"
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")

CertLookup = Callable[[SpiffeId], WorkloadCert | None]


# ---------------------------------------------------------------------------
# SNI <-> identity


def sni_for(identity: SpiffeId) -> str:
    """The TLS server name a client sends to reach `identity`: `<sa>.sa.<ns>.ns.<trust-domain>`.

    Kubernetes names (lowercase DNS labels/subdomains) always fit; a SPIFFE ID
    with uppercase or '_' in namespace or service account cannot be named in SNI.
    """
    name = f"{identity.service_account}.{SNI_SUFFIX_SA}.{identity.namespace}.{SNI_SUFFIX_NS}.{identity.trust_domain}"
    parts = (identity.service_account, identity.namespace, identity.trust_domain)
    if any(set(p) - _DNS_CHARS for p in parts) or "." in identity.namespace:
        raise IdentityError(
            f"{identity}: namespace/service account/trust domain are not lowercase DNS names, "
            "so the identity cannot be named in TLS SNI"
        )
    if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
        raise IdentityError(f"{identity}: too long to be named in TLS SNI ({len(name)} characters)")
    return name


def identity_from_sni(server_name: str, trust_domain: str) -> SpiffeId | None:
    """Inverse of `sni_for` for our trust domain; None for any other name."""
    suffix = f".{SNI_SUFFIX_NS}.{trust_domain}"
    name = server_name.lower().rstrip(".")
    if not name.endswith(suffix):
        return None
    rest = name.removesuffix(suffix)
    sa_part, _, ns = rest.rpartition(".")
    if not sa_part.endswith(f".{SNI_SUFFIX_SA}"):
        return None
    sa = sa_part.removesuffix(f".{SNI_SUFFIX_SA}")
    try:
        return SpiffeId(trust_domain, ns, sa)
    except SpiffeError:
        return None


# ---------------------------------------------------------------------------
# contexts


def load_cert_chain_in_memory(ctx: ssl.SSLContext, pem: bytes, name: str = "ambit-svid") -> None:
    """`ctx.load_cert_chain` from PEM bytes (key and chain) through an anonymous memory file:
    the key never touches a disk (OpenSSL's Python binding loads only from a path)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _load_cert_in_memory(ctx: ssl.SSLContext, cert: WorkloadCert) -> None:
    load_cert_chain_in_memory(ctx, cert.key_pem() + cert.chain_pem())


def _base_context(purpose: ssl.Purpose, bundle: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    # SVIDs name no host: the peer is checked by SPIFFE ID after the handshake
    # (verify_peer / peer_identity), never by hostname.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.to_pem().decode())
    return ctx


def server_context(cert: WorkloadCert, bundle: TrustBundle) -> ssl.SSLContext:
    """A server context presenting `cert`; TLS 1.3 only, ALPN h2, client certificate required."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, bundle)
    _load_cert_in_memory(ctx, cert)
    return ctx


def client_context(cert: WorkloadCert, bundle: TrustBundle) -> ssl.SSLContext:
    """A client context presenting `cert`; connect with `server_hostname=sni_for(expected)`."""
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, bundle)
    _load_cert_in_memory(ctx, cert)
    return ctx


class _ServerSelector:
    """Keeps one server context per served certificate, chosen by SNI at handshake time."""

    def __init__(self, lookup: CertLookup, bundle: TrustBundle) -> None:
        self.lookup = lookup
        self.bundle = bundle
        self._lock = threading.Lock()
        self._contexts: dict[SpiffeId, tuple[int, ssl.SSLContext]] = {}

    def context_for(self, identity: SpiffeId) -> ssl.SSLContext | None:
        cert = self.lookup(identity)
        if cert is None:
            with self._lock:
                self._contexts.pop(identity, None)  # the workload left this node
            return None
        with self._lock:
            cached = self._contexts.get(identity)
            if cached is not None and cached[0] == cert.serial:
                return cached[1]
        ctx = server_context(cert, self.bundle)
        with self._lock:
            self._contexts[identity] = (cert.serial, ctx)
        return ctx

    def __call__(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if not server_name:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME  # type: ignore[no-any-return]
        identity = identity_from_sni(server_name, self.bundle.trust_domain)
        if identity is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME  # type: ignore[no-any-return]
        try:
            ctx = self.context_for(identity)
        except (ssl.SSLError, OSError, IdentityError):
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR  # type: ignore[no-any-return]
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME  # type: ignore[no-any-return]
        sslobj.context = ctx
        return None


def server_context_selector(lookup: CertLookup, bundle: TrustBundle) -> ssl.SSLContext:
    """A server context (for 15008) that presents, per handshake, the certificate of the
    workload named in SNI, as returned by `lookup` (None: the handshake fails)."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, bundle)
    ctx.sni_callback = _ServerSelector(lookup, bundle)
    return ctx


# ---------------------------------------------------------------------------
# peers


def _peer_chain(ssl_obj: ssl.SSLObject | ssl.SSLSocket) -> list[x509.Certificate] | None:
    """The chain the peer sent (leaf first), or None where this Python cannot tell.

    The chain as sent is what verify_svid wants: it builds and checks the path
    to the bundle itself, independently of OpenSSL.
    """
    ders = peer_chain_der(ssl_obj)
    return None if ders is None else [x509.load_der_x509_certificate(der) for der in ders]


def peer_identity(ssl_obj: ssl.SSLObject | ssl.SSLSocket, bundle: TrustBundle) -> SpiffeId:
    """The SPIFFE ID the peer proved in the handshake; SvidError when it is not a valid SVID.

    OpenSSL has already verified the chain against the bundle's roots
    (CERT_REQUIRED); verify_svid then re-checks the chain the peer sent against
    every SPIFFE MUST and the trust domain. The identity never comes from anything
    but that certificate.
    """
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        raise SvidError("the peer presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    chain = _peer_chain(ssl_obj)
    if chain is not None and chain[0] == leaf:
        roots = set(bundle.roots)
        return verify_svid([c for c in chain if c not in roots], bundle)
    # Fallback: OpenSSL has verified the path to the bundle (CERT_REQUIRED);
    # apply the SPIFFE leaf rules and the trust domain ourselves.
    ident = check_leaf(leaf)
    if ident.trust_domain != bundle.trust_domain:
        raise SvidError(f"peer {ident}: trust domain is not the trusted {bundle.trust_domain!r}")
    check_validity(leaf, dt.datetime.now(dt.UTC), "peer leaf")
    return ident


def verify_peer(
    ssl_obj: ssl.SSLObject | ssl.SSLSocket, bundle: TrustBundle, expected: SpiffeId
) -> SpiffeId:
    """Client side: the server must have proved exactly `expected`, else SvidError."""
    got = peer_identity(ssl_obj, bundle)
    if got != expected:
        raise SvidError(
            f"server presented {got} but {expected} was expected (wrong node or a stale route?)"
        )
    return got


@dataclass(frozen=True)
class VerifiedPeer:
    """What an HBONE server knows of its TLS peer once the handshake is done."""

    identity: SpiffeId
    cert_serial: str | None  # hex serial of the certificate that proved it
    tls_identity: SpiffeId | None  # the identity the peer asked for in SNI (this side's)


def verified_peer(ssl_obj: ssl.SSLObject | ssl.SSLSocket | None, bundle: TrustBundle) -> VerifiedPeer:
    """The peer of a server-side HBONE connection (15008 of a ztunnel or a waypoint); SvidError
    when it is not TLS or its certificate is not a valid SVID of the bundle."""
    if ssl_obj is None:
        raise SvidError("the connection is not TLS")
    identity = peer_identity(ssl_obj, bundle)
    der = ssl_obj.getpeercert(binary_form=True)
    serial = f"{x509.load_der_x509_certificate(der).serial_number:x}" if der else None
    name = getattr(ssl_obj, "ambit_server_name", None)
    sni = identity_from_sni(name, bundle.trust_domain) if name else None
    return VerifiedPeer(identity, serial, sni)

