"""HBONE TLS over in-memory BIOs (no sockets): TLS 1.3, ALPN h2, SNI picks the certificate, peers verified."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.spiffe import SpiffeId
from ambit.svid import SvidError
from controlplane.pki import CaMaterial
from ztunnel.identity import IdentityError, tls
from ztunnel.identity.manager import WorkloadCert

SERVER = SpiffeId("cluster.local", "shop", "backend")
CLIENT = SpiffeId("cluster.local", "shop", "frontend")


def issue(ca: CaMaterial, ident: SpiffeId) -> WorkloadCert:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign_leaf(key.public_key(), ident, dt.timedelta(hours=1))
    return WorkloadCert(ident, key, tuple(c for c in chain if c != ca.root))


@pytest.fixture(scope="module")
def ca() -> CaMaterial:
    return CaMaterial.generate()


def handshake(cctx: ssl.SSLContext, sctx: ssl.SSLContext, sni: str) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(c_in, c_out, server_hostname=sni)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate after the
            # client considers the handshake done; push one record through.
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            return client, server
    raise AssertionError("handshake did not complete")


def test_mutual_tls_with_sni_selection(ca: CaMaterial) -> None:
    srv, cli = issue(ca, SERVER), issue(ca, CLIENT)
    sctx = tls.server_context_selector(lambda i: srv if i == SERVER else None, ca.bundle)
    client, server = handshake(tls.client_context(cli, ca.bundle), sctx, tls.sni_for(SERVER))
    assert client.version() == "TLSv1.3"
    assert client.selected_alpn_protocol() == "h2"
    assert tls.verify_peer(client, ca.bundle, SERVER) == SERVER
    assert tls.peer_identity(server, ca.bundle) == CLIENT
    with pytest.raises(SvidError, match="was expected"):
        tls.verify_peer(client, ca.bundle, CLIENT)


def test_unknown_sni_fails_the_handshake(ca: CaMaterial) -> None:
    srv, cli = issue(ca, SERVER), issue(ca, CLIENT)
    sctx = tls.server_context_selector(lambda i: srv if i == SERVER else None, ca.bundle)
    cctx = tls.client_context(cli, ca.bundle)
    for name in (tls.sni_for(CLIENT), "example.com"):
        with pytest.raises(ssl.SSLError):
            handshake(cctx, sctx, name)


def test_foreign_client_is_refused(ca: CaMaterial) -> None:
    other = CaMaterial.generate()
    srv = issue(ca, SERVER)
    sctx = tls.server_context(srv, ca.bundle)
    with pytest.raises(ssl.SSLError):
        handshake(tls.client_context(issue(other, CLIENT), ca.bundle), sctx, tls.sni_for(SERVER))


def test_server_context_refreshes_on_renewal(ca: CaMaterial) -> None:
    certs = {SERVER: issue(ca, SERVER)}
    sctx = tls.server_context_selector(certs.get, ca.bundle)
    cctx = tls.client_context(issue(ca, CLIENT), ca.bundle)
    first, _ = handshake(cctx, sctx, tls.sni_for(SERVER))
    certs[SERVER] = issue(ca, SERVER)
    second, _ = handshake(cctx, sctx, tls.sni_for(SERVER))
    assert first.getpeercert(binary_form=True) != second.getpeercert(binary_form=True)


SNI_CASES = [
    SpiffeId("cluster.local", "shop", "frontend"),
    SpiffeId("example.org", "a-b", "sa.with.dots"),
]


@pytest.mark.parametrize("ident", SNI_CASES)
def test_sni_roundtrip(ident: SpiffeId) -> None:
    name = tls.sni_for(ident)
    assert identity_from(name, ident.trust_domain) == ident
    assert identity_from(name.upper(), ident.trust_domain) == ident
    assert identity_from(name, "other.td") is None


def identity_from(name: str, td: str) -> SpiffeId | None:
    return tls.identity_from_sni(name, td)


def test_sni_rejects_unnameable_identities_and_foreign_names() -> None:
    with pytest.raises(IdentityError, match="SNI"):
        tls.sni_for(SpiffeId("cluster.local", "Shop", "frontend"))
    with pytest.raises(IdentityError, match="SNI"):
        tls.sni_for(SpiffeId("cluster.local", "shop", "x" * 64))
    assert tls.identity_from_sni("frontend.shop.svc.cluster.local", "cluster.local") is None
    assert tls.identity_from_sni("ns.cluster.local", "cluster.local") is None
