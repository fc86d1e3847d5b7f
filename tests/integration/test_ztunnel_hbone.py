"""The ztunnel's HBONE port (15008) against a raw HTTP/2 client: statuses, mTLS failures, abuse.

The client here is plain `h2` over `ssl`, independent of the ztunnel's own
client code, so these tests check the wire behaviour another implementation sees.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.spiffe import SpiffeId
from controlplane.pki import CaMaterial
from tests.integration.ztunnel_harness import Mesh, echo_server, loopback_mesh
from ztunnel.identity.manager import WorkloadCert
from ztunnel.identity.tls import client_context, sni_for

pytestmark = pytest.mark.timeout(60)

SERVER_ID = SpiffeId("cluster.local", "shop", "server")


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with loopback_mesh(tmp_path, start=("node-b",)) as m:
        await m.wait_ready("node-b")
        yield m


def make_cert(material: CaMaterial, ident: SpiffeId) -> WorkloadCert:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = material.sign_leaf(key.public_key(), ident, dt.timedelta(hours=1))
    return WorkloadCert(ident, key, tuple(c for c in chain if c != material.root))


class RawClient:
    """An h2 client over TLS to a ztunnel's 15008."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, mesh: Mesh, cert: WorkloadCert | None, ctx: ssl.SSLContext | None = None,
                      sni: str | None = None, source: str | None = None) -> RawClient:
        """From node-a's address by default, as node-a's ztunnel would dial."""
        if ctx is None:
            assert cert is not None
            ctx = client_context(cert, mesh.material.bundle)
        host, port = mesh.ztunnels["node-b"].addresses["hbone"]
        r, w = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni or sni_for(SERVER_ID),
                                             local_addr=(source or mesh.nodes["node-a"], 0))
        c = cls(r, w)
        await c.flush()
        return c

    async def flush(self) -> None:
        self.w.write(self.h2.data_to_send())
        await self.w.drain()

    async def pump(self) -> list[Any]:
        data = await asyncio.wait_for(self.r.read(65536), 5)
        if not data:
            raise ConnectionResetError("server closed the connection")
        evs = self.h2.receive_data(data)
        await self.flush()
        self.events.extend(evs)
        return list(evs)

    def connect_headers(self, authority: str, extra: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority.encode()),
                                   *(extra or [])])
        return sid

    async def status(self, sid: int) -> int | str:
        """The response status of a stream, or 'reset'/'goaway'."""
        await self.flush()
        while True:
            for ev in await self.pump():
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    return int(dict(ev.headers)[b":status"])
                if isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    return "reset"
                if isinstance(ev, h2.events.ConnectionTerminated):
                    return "goaway"

    def close(self) -> None:
        self.w.close()


async def test_statuses(mesh: Mesh) -> None:
    c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "client")))
    server = mesh.pods["shop/server"]
    async with echo_server(server, 8080):
        ok = c.connect_headers(f"{server}:8080", [(b"forwarded", b"for=" + mesh.pods["shop/client"].encode())])
        assert await c.status(ok) == 200
        c.h2.send_data(ok, b"hello")
        await c.flush()
        got = b""
        while got != b"hello":
            for ev in await c.pump():
                if isinstance(ev, h2.events.DataReceived):
                    got += ev.data
                    c.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        # not CONNECT: 400
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(b":method", b"GET"), (b":authority", f"{server}:8080".encode()),
                                (b":scheme", b"https"), (b":path", b"/")], end_stream=True)
        assert await c.status(sid) == 400
        # authority not a workload of this node: 400
        assert await c.status(c.connect_headers(f"{mesh.pods['shop/client']}:8080")) == 400
        assert await c.status(c.connect_headers("not-an-ip:80")) == 400
        # nothing listens there: 503
        assert await c.status(c.connect_headers(f"{server}:9")) == 503
        # denied by policy: 401
        mesh.write("deny", """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-9000, namespace: shop}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["8080"]}}]}]}
""")
        await asyncio.sleep(0.1)
        for _ in range(100):
            if mesh.ztunnels["node-b"].store.current.policies.authz:
                break
            await asyncio.sleep(0.05)
        assert await c.status(c.connect_headers(f"{server}:8080")) == 401
    c.close()
    items = mesh.ztunnels["node-b"].ctx.conns.recent  # type: ignore[union-attr]
    flags = [r.response_flags for r in items]
    assert "DENY" in flags and "NR" in flags and "UF" in flags


async def test_forwarded_client_is_taken_only_when_the_certificate_backs_it(mesh: Mesh) -> None:
    """`forwarded: for=` decides what ipBlocks see, so a claim the TLS peer cannot back is refused."""
    server = mesh.pods["shop/server"]
    client_ip = mesh.pods["shop/client"]
    mesh.write("deny-client-ip", f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client-ip, namespace: shop}}
spec: {{action: DENY, rules: [{{from: [{{source: {{ipBlocks: ["{client_ip}/32"]}}}}]}}]}}
""")
    for _ in range(100):
        if mesh.ztunnels["node-b"].store.current.policies.authz:
            break
        await asyncio.sleep(0.05)
    fwd = [(b"forwarded", b"for=" + client_ip.encode())]
    async with echo_server(server, 8080):
        # the client pod's own identity, from its node: its address is trusted, so the DENY on it applies
        c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "client")))
        assert await c.status(c.connect_headers(f"{server}:8080", fwd)) == 401
        c.close()
        # another identity claiming the client's address: refused, not judged as the client
        c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "local")))
        assert await c.status(c.connect_headers(f"{server}:8080", fwd)) == 400
        c.close()
        # the right identity, but not from the client's node (node-b's own address)
        c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "client")),
                                    source=mesh.nodes["node-b"])
        assert await c.status(c.connect_headers(f"{server}:8080", fwd)) == 400
        c.close()
    mesh.remove("deny-client-ip")
    recent = mesh.ztunnels["node-b"].ctx.conns.recent  # type: ignore[union-attr]
    assert any("claims client" in r.reason for r in recent)


async def test_handshake_failures(mesh: Mesh) -> None:
    client_id = SpiffeId("cluster.local", "shop", "client")
    # no client certificate
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.material.bundle.to_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    # an untrusted CA, and a foreign trust domain signed by our own CA
    other = CaMaterial.generate("cluster.local")
    foreign = make_cert(mesh.material, SpiffeId("evil.example", "shop", "client"))
    cases: list[tuple[str, ssl.SSLContext]] = [
        ("no certificate", ctx),
        ("untrusted CA", client_context(make_cert(other, client_id), mesh.material.bundle)),
        ("foreign trust domain", client_context(foreign, mesh.material.bundle)),
    ]
    for what, c_ctx in cases:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, TimeoutError)):
            c = await RawClient.connect(mesh, None, ctx=c_ctx)
            # TLS 1.3: the client learns of a rejected certificate on its first read
            sid = c.connect_headers(f"{mesh.pods['shop/server']}:8080")
            await c.status(sid)
            pytest.fail(f"{what}: the ztunnel accepted the connection")
    # an SNI naming an identity the node does not host fails the handshake too
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await RawClient.connect(mesh, make_cert(mesh.material, client_id),
                                sni=sni_for(SpiffeId("cluster.local", "shop", "client")))
    refused = sum(s.value for m in mesh.ztunnels["node-b"].metrics.refused.collect() for s in m.samples
                  if s.name.endswith("_total") and s.labels["reason"] == "peer_certificate")
    assert refused >= 1
    await assert_still_serving(mesh)


async def assert_still_serving(mesh: Mesh) -> None:
    c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "client")))
    async with echo_server(mesh.pods["shop/server"], 8080):
        assert await c.status(c.connect_headers(f"{mesh.pods['shop/server']}:8080")) == 200
    c.close()


async def test_reset_flood_gets_goaway(mesh: Mesh) -> None:
    c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "client")))
    outcome = None
    for _ in range(2000):
        sid = c.connect_headers(f"{mesh.pods['shop/server']}:9")
        c.h2.reset_stream(sid)
        try:
            c.w.write(c.h2.data_to_send())
        except Exception:
            outcome = "closed"
            break
        if _ % 50 == 0:
            await c.w.drain()
    if outcome is None:
        try:
            while outcome is None:
                for ev in await c.pump():
                    if isinstance(ev, h2.events.ConnectionTerminated):
                        outcome = "goaway"
        except (ConnectionError, TimeoutError, h2.exceptions.ProtocolError):
            outcome = outcome or "closed"
    assert outcome in ("goaway", "closed")
    c.close()
    await assert_still_serving(mesh)


async def test_oversized_headers_refused(mesh: Mesh) -> None:
    c = await RawClient.connect(mesh, make_cert(mesh.material, SpiffeId("cluster.local", "shop", "client")))
    sid = c.connect_headers(f"{mesh.pods['shop/server']}:8080", [(b"x-big", b"a" * 100_000)])
    try:
        result = await c.status(sid)
    except (ConnectionError, TimeoutError):
        result = "closed"
    assert result in (431, 400, "reset", "goaway", "closed")
    c.close()
    await assert_still_serving(mesh)
