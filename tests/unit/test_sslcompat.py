"""ztunnel/identity/sslcompat.py: the peer's chain as sent, through the public or the private `_ssl` path."""

from __future__ import annotations

import logging
import ssl
import sys

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from controlplane.pki import CaMaterial
from tests.unit.test_svid_tls import CLIENT, SERVER, handshake, issue
from ztunnel.identity import sslcompat, tls

WHAT_TO_DO = (
    f"Python {sys.version.split()[0]} changed how the certificate chain a TLS peer sent is "
    "read: adapt ztunnel/identity/sslcompat.py (until then tls checks peers by their leaf only)"
)


@pytest.fixture(scope="module")
def ca() -> CaMaterial:
    return CaMaterial.generate()


def test_this_python_has_the_expected_path() -> None:
    expected = "public" if sys.version_info >= (3, 13) else "private"
    assert expected == sslcompat.CHAIN_SOURCE, WHAT_TO_DO


def test_both_sides_get_the_chain_the_peer_sent_leaf_first(ca: CaMaterial) -> None:
    srv, cli = issue(ca, SERVER), issue(ca, CLIENT)
    client, server = handshake(tls.client_context(cli, ca.bundle),
                               tls.server_context(srv, ca.bundle), tls.sni_for(SERVER))
    for side, sent in ((client, srv), (server, cli)):
        got = sslcompat.peer_chain_der(side)
        assert got is not None, WHAT_TO_DO
        assert got[0] == side.getpeercert(binary_form=True), WHAT_TO_DO
        assert got == [c.public_bytes(Encoding.DER) for c in sent.chain], WHAT_TO_DO


def test_no_chain_before_the_handshake(ca: CaMaterial) -> None:
    ctx = tls.client_context(issue(ca, CLIENT), ca.bundle)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=tls.sni_for(SERVER))
    assert sslcompat.peer_chain_der(obj) is None


def test_the_public_path_takes_what_python_313_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    class Python313SSLObject:  # get_unverified_chain() -> list of DER bytes, [] when none
        def __init__(self, chain: list[bytes]) -> None:
            self.chain = chain

        def get_unverified_chain(self) -> list[bytes]:
            return self.chain

    monkeypatch.setattr(sslcompat, "CHAIN_SOURCE", "public")
    assert sslcompat.peer_chain_der(Python313SSLObject([b"leaf", b"ca"])) == [b"leaf", b"ca"]  # type: ignore[arg-type]
    assert sslcompat.peer_chain_der(Python313SSLObject([])) is None  # type: ignore[arg-type]


def test_without_either_path_none_and_one_warning(
    ca: CaMaterial, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    srv, cli = issue(ca, SERVER), issue(ca, CLIENT)
    client, server = handshake(tls.client_context(cli, ca.bundle),
                               tls.server_context(srv, ca.bundle), tls.sni_for(SERVER))
    monkeypatch.setattr(sslcompat, "CHAIN_SOURCE", "none")
    monkeypatch.setattr(sslcompat, "_logged_none", False)
    with caplog.at_level(logging.WARNING, logger="ambit.identity"):
        assert sslcompat.peer_chain_der(client) is None
        assert sslcompat.peer_chain_der(server) is None
    assert len(caplog.records) == 1 and "leaf only" in caplog.records[0].getMessage()
    # tls still proves the identity, from the leaf OpenSSL verified
    assert tls.verify_peer(client, ca.bundle, SERVER) == SERVER
