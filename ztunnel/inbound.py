"""The inbound paths: HBONE on 15008 (mTLS) and plaintext on 15006 (PERMISSIVE), to local workloads.

`check_inbound` is the pure decision (is the authority a local workload, does
the certificate the client asked for belong to it, does L4 policy allow it);
`InboundConnection` drives one HBONE server connection; `deliver` dials the
workload and splices. The same decision and delivery serve same-node traffic
from the outbound path (no TLS inside the process, same policy).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ambit.peers import client_address, serving_waypoint
from ambit.policy import ConnectionFacts, Decision, authorize, mtls_mode
from ambit.spiffe import SpiffeId
from ambit.svid import SvidError
from ztunnel.conntrack import INBOUND, INBOUND_PLAINTEXT, ByteCounters, ConnRecord, Route
from ztunnel.context import ProxyContext
from ztunnel.copy import Leg, Splice, TcpLeg
from ztunnel.hbone import ConnectRequest, HboneServer, RequestRejected
from ztunnel.identity.tls import server_context_selector, verified_peer
from ztunnel.origdst import OrigDstError, original_dst
from ztunnel.refusal import Refusal
from ztunnel.tunnel import HboneProtocol, StreamLeg

if TYPE_CHECKING:
    from ambit.snapshot import Snapshot, Workload

log = logging.getLogger("ambit.ztunnel.inbound")


class UpstreamError(Exception):
    """Dialing a workload failed; the message names the address and the likely cause."""


@dataclass(frozen=True)
class InboundCheck:
    refusal: Refusal | None  # None: allowed
    workload: Workload | None
    port: int
    decision: Decision | None
    reason: str

    @property
    def status(self) -> int:
        """The HBONE answer: 200 allowed, 400 bad/unknown destination, 401 denied by policy."""
        return 200 if self.refusal is None else self.refusal.hbone_status


def check_inbound(
    snap: Snapshot,
    dst_ip: str,
    dst_port: int,
    *,
    src_ip: str,
    src_identity: SpiffeId | None,
    mtls: bool,
    tls_identity: SpiffeId | None = None,
) -> InboundCheck:
    """Pure: may this connection reach local workload dst_ip:dst_port? (HBONE status semantics)."""
    unknown = Refusal.UNKNOWN_DESTINATION
    w = snap.workload_by_ip(dst_ip)
    if w is None or w.node != snap.node:
        return InboundCheck(unknown, None, dst_port, None,
                            f"{dst_ip}:{dst_port} is not a workload on node {snap.node}")
    if not w.enrolled:
        return InboundCheck(unknown, w, dst_port, None, f"{w.uid} is not enrolled in the mesh")
    if tls_identity is not None and tls_identity != w.identity:
        return InboundCheck(
            unknown, w, dst_port, None,
            f"{dst_ip} is {w.uid} ({w.identity}) but the TLS connection was opened for {tls_identity}",
        )
    facts = ConnectionFacts(src_ip, src_identity, w, dst_port, mtls)
    d = authorize(facts, snap.policies, via_waypoint=serving_waypoint(snap, src_identity, w) is not None)
    if not d.allowed:
        # `authorize` refuses plaintext to a STRICT port before any other check
        strict = not mtls and mtls_mode(w, dst_port, snap.policies) == "STRICT"
        refusal = Refusal.STRICT_MTLS if strict else Refusal.POLICY_DENIED
        return InboundCheck(refusal, w, dst_port, d, d.reason)
    return InboundCheck(None, w, dst_port, d, d.reason)


def apply_check(rec: ConnRecord, chk: InboundCheck) -> None:
    if chk.workload is not None:
        rec.dst_workload = chk.workload.uid
        rec.dst_identity = str(chk.workload.identity)
    if chk.decision is not None:
        rec.policy, rec.rule = chk.decision.policy, chk.decision.rule
        rec.dry_run = [d.to_dict() for d in chk.decision.dry_run]
    rec.reason = chk.reason
    rec.decision = "allow" if chk.status == 200 else "deny" if chk.status == 401 else "pending"


async def dial(ip: str, port: int, timeout: float) -> TcpLeg:
    """Connect to a workload (or a passthrough destination) as a splice leg."""
    loop = asyncio.get_running_loop()
    try:
        _, leg = await asyncio.wait_for(loop.create_connection(TcpLeg, ip, port), timeout)
    except TimeoutError:
        raise UpstreamError(f"connect to {ip}:{port} timed out after {timeout:g}s: is the workload "
                            "running, or is a firewall dropping the SYN?") from None
    except ConnectionRefusedError:
        raise UpstreamError(f"connect to {ip}:{port} refused: nothing listens on that port "
                            "in the workload") from None
    except OSError as e:
        raise UpstreamError(f"connect to {ip}:{port} failed: {e.strerror or e}") from None
    return leg


async def splice_and_wait(ctx: ProxyContext, down: Leg, up: Leg, records: list[ConnRecord],
                          counters: ByteCounters) -> None:
    """Join two legs, mark the records open, and close them when the splice is done."""
    def done(err: str | None) -> None:
        for r in records:
            ctx.conns.close(r, err)

    upstream_local = None
    if isinstance(up, TcpLeg) and up.transport is not None:
        name = up.transport.get_extra_info("sockname")
        if name:
            upstream_local = f"{name[0]}:{name[1]}"
    for r in records:
        r.state = "open"
        r.upstream_local = upstream_local
        ctx.metrics.connection_opened(r)
    sp = Splice(down, up, counters, done)
    sp.start()
    await sp.finished


def local_record(ctx: ProxyContext, direction: str, src_ip: str, src_port: int, dst_ip: str,
                 dst_port: int, **kw: Any) -> ConnRecord:
    return ctx.conns.open(ConnRecord(direction, src_ip, src_port, dst_ip, dst_port, **kw))


class Inbound:
    """Serves 15008 and 15006 for this node's workloads."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.connections: set[InboundConnection] = set()

    # -- HBONE

    def tls_context(self) -> ssl.SSLContext:
        selector_ctx = server_context_selector(self._lookup, self.ctx.bundle)
        inner = selector_ctx.sni_callback
        assert inner is not None

        def remember_sni(sslobj: Any, server_name: str | None, c: ssl.SSLContext) -> int | None:
            r = inner(sslobj, server_name, c)  # type: ignore[arg-type]
            if r is None:
                # which workload's certificate we presented: the CONNECT must target it
                sslobj.ambit_server_name = server_name
            return r

        selector_ctx.sni_callback = remember_sni  # type: ignore[assignment]
        return selector_ctx

    def _lookup(self, identity: SpiffeId) -> Any:
        snap = self.ctx.snapshot()
        if not any(w.identity == identity for w in snap.local_workloads()):
            return None  # never present a certificate for an identity this node does not host
        return self.ctx.certs.current(identity)

    def protocol_factory(self) -> InboundConnection:
        return InboundConnection(self)

    async def handle_connect(self, conn: InboundConnection, leg: StreamLeg, req: ConnectRequest) -> None:
        ctx = self.ctx
        peer_ip, peer_port = conn.peer
        # the HBONE layer has checked the request: host is an IP, port in range, and
        # forwarded_for an IP or None (a malformed CONNECT was answered 400 there)
        rec = local_record(
            ctx, INBOUND, peer_ip, peer_port, req.host, req.port,
            src_identity=str(conn.identity) if conn.identity else None, mtls=True, route=Route.HBONE,
            src_cert_serial=conn.peer_cert_serial,
            client_ip=req.forwarded_for,
        )
        snap = ctx.snapshot()
        client = client_address(snap, peer_ip, conn.identity, req.forwarded_for)
        if client.workload is not None and client.ip is not None:
            rec.src_workload = client.workload.uid

        def refuse(refusal: Refusal, reason: str) -> None:
            conn.respond(leg, refusal.hbone_status)
            ctx.refuse(rec, refusal, reason)

        if ctx.draining:
            refuse(Refusal.DRAINING, "the ztunnel is shutting down")
            return
        if client.ip is None:
            refuse(Refusal.UNTRUSTED_CLIENT_ADDRESS, client.reason)
            return
        chk = check_inbound(snap, req.host, req.port, src_ip=client.ip, src_identity=conn.identity,
                            mtls=True, tls_identity=conn.tls_identity)
        apply_check(rec, chk)
        if chk.refusal is not None:
            refuse(chk.refusal, chk.reason)
            return
        reset = "client reset the stream before the workload answered"
        if leg.closed:
            # reset in the same read as its HEADERS (a rapid-reset flood): never dial
            ctx.conns.close(rec, reset)
            return
        task = asyncio.current_task()
        if task is not None:
            leg.on_early_reset = task.cancel  # a reset while dialing cancels the dial; nothing is answered
        try:
            up = await dial(req.host, req.port, ctx.config.timeouts.connect)
        except UpstreamError as e:
            conn.respond(leg, Refusal.UPSTREAM_UNREACHABLE.hbone_status)
            rec.reason = str(e)
            ctx.metrics.refuse(Refusal.UPSTREAM_UNREACHABLE)
            log.warning("inbound %s -> %s: %s", conn.identity, req.authority, e)
            ctx.conns.close(rec, str(e))
            return
        except asyncio.CancelledError:
            ctx.conns.close(rec, reset if leg.closed else "cancelled while dialing the workload")
            raise
        finally:
            leg.on_early_reset = None
        if leg.closed:
            up.abort()
            ctx.conns.close(rec, reset)
            return
        conn.respond(leg, 200)
        await splice_and_wait(ctx, leg, up, [rec], rec.counters)

    # -- plaintext (PERMISSIVE)

    def plaintext_factory(self) -> TcpLeg:
        return TcpLeg(on_connected=self._plaintext_accepted)

    def _plaintext_accepted(self, leg: TcpLeg) -> None:
        leg.pause_reading()
        self.ctx.tasks.spawn("inbound-plaintext", self.handle_plaintext(leg))

    async def handle_plaintext(self, leg: TcpLeg) -> None:
        ctx = self.ctx
        assert leg.transport is not None
        src_ip, src_port = leg.peername
        try:
            dst_ip, dst_port = original_dst(leg.transport.get_extra_info("socket"))
        except OrigDstError as e:
            rec = local_record(ctx, INBOUND_PLAINTEXT, src_ip, src_port, "-", 0, route=Route.PLAINTEXT)
            ctx.refuse(rec, Refusal.NO_ORIGINAL_DST, str(e))
            leg.abort()
            return
        snap = ctx.snapshot()
        rec = local_record(ctx, INBOUND_PLAINTEXT, src_ip, src_port, dst_ip, dst_port, route=Route.PLAINTEXT)
        src_w = snap.workload_by_ip(src_ip)
        if src_w is not None:
            rec.src_workload = src_w.uid
        chk = check_inbound(snap, dst_ip, dst_port, src_ip=src_ip, src_identity=None, mtls=False)
        apply_check(rec, chk)
        if chk.refusal is not None:
            leg.abort()
            ctx.refuse(rec, chk.refusal, chk.reason)
            return
        try:
            up = await dial(dst_ip, dst_port, ctx.config.timeouts.connect)
        except UpstreamError as e:
            leg.abort()
            rec.reason = str(e)
            ctx.metrics.refuse(Refusal.UPSTREAM_UNREACHABLE)
            ctx.conns.close(rec, str(e))
            return
        await splice_and_wait(ctx, leg, up, [rec], rec.counters)

    def drain(self) -> None:
        for c in list(self.connections):
            c.drain()


class InboundConnection(HboneProtocol):
    """One HBONE server connection on 15008: verify the peer, then serve its CONNECTs."""

    def __init__(self, inbound: Inbound) -> None:
        super().__init__(HboneServer(inbound.ctx.hbone, asyncio.get_running_loop().time()), "inbound")
        self.inbound = inbound
        self.identity: SpiffeId | None = None
        self.tls_identity: SpiffeId | None = None
        self.peer_cert_serial: str | None = None
        self.peer: tuple[str, int] = ("-", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        p = transport.get_extra_info("peername")
        self.peer = (str(p[0]), int(p[1]))
        self.label = f"inbound HBONE from {self.peer[0]}:{self.peer[1]}"
        try:
            peer = verified_peer(transport.get_extra_info("ssl_object"), self.inbound.ctx.bundle)
        except SvidError as e:
            log.warning("%s: rejected peer certificate: %s", self.label, e)
            self.inbound.ctx.metrics.refuse(Refusal.PEER_CERTIFICATE)
            cast(asyncio.Transport, transport).abort()
            return
        self.identity, self.peer_cert_serial, self.tls_identity = peer.identity, peer.cert_serial, peer.tls_identity
        self.label = f"inbound HBONE from {self.identity} at {self.peer[0]}:{self.peer[1]}"
        self.inbound.connections.add(self)
        super().connection_made(transport)
        if self.inbound.ctx.draining:
            self.drain()

    def handle_other(self, ev: Any) -> None:
        if isinstance(ev, ConnectRequest):
            leg = StreamLeg(self, ev.stream_id)
            self.streams[ev.stream_id] = leg
            self.inbound.ctx.tasks.spawn(f"inbound-stream-{ev.stream_id}",
                                         self.inbound.handle_connect(self, leg, ev))
        elif isinstance(ev, RequestRejected):
            log.info("%s: rejected stream %d with %d: %s", self.label, ev.stream_id, ev.status, ev.reason)
            self.inbound.ctx.metrics.refuse(Refusal.BAD_REQUEST)
        else:
            super().handle_other(ev)

    def on_closed(self) -> None:
        self.inbound.connections.discard(self)
