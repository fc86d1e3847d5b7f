"""The outbound path: a local workload's TCP connection (15001, or SOCKS5 on 15080) to its destination.

`plan_outbound` is the pure routing decision over a snapshot (who is the
source, is the destination a mesh workload, a service VIP, or outside the
mesh, on which node); `Outbound` does the socket work: HBONE through the pool
with the source workload's certificate, same-node delivery through the inbound
policy in-process, or a logged plain-TCP passthrough.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ztunnel import socks5
from ztunnel.config import HBONE_PORT
from ztunnel.conntrack import INBOUND, OUTBOUND, ConnRecord, Route
from ztunnel.context import ProxyContext
from ztunnel.copy import TcpLeg
from ztunnel.hbone import HboneError
from ztunnel.hbone.wire import format_authority
from ztunnel.identity.manager import CertNotReady
from ztunnel.inbound import (
    UpstreamError,
    apply_check,
    check_inbound,
    dial,
    local_record,
    splice_and_wait,
)
from ztunnel.origdst import OrigDstError, original_dst
from ztunnel.pool import Pool, PoolError
from ztunnel.refusal import Refusal

if TYPE_CHECKING:
    from ambit.snapshot import ServiceInfo, Snapshot, WaypointInfo, Workload

log = logging.getLogger("ambit.ztunnel.outbound")

# Where `plan_outbound` sends a connection.
PlanKind = Literal[Route.HBONE, Route.LOCAL, Route.PASSTHROUGH, Route.REFUSE, Route.WAYPOINT]

# Reply sent to a SOCKS5 client once the upstream side is known: (ok, socks5 code)
Reply = Callable[[int], None]


@dataclass(frozen=True)
class OutboundPlan:
    kind: PlanKind
    reason: str
    src: Workload | None = None
    dst: Workload | None = None
    dst_ip: str = ""
    dst_port: int = 0
    service: ServiceInfo | None = None
    node_address: str | None = None  # where the tunnel goes: the destination's node, or its waypoint
    refusal: Refusal | None = None  # set when kind is REFUSE
    waypoint: WaypointInfo | None = None  # set when kind is WAYPOINT (or REFUSE for want of one)


def plan_outbound(snap: Snapshot, src_ip: str, dst_ip: str, dst_port: int, pick: int = 0, *,
                  loopback_workloads: bool = False) -> OutboundPlan:
    """Pure: where a local workload's connection to dst_ip:dst_port goes. `pick` chooses the endpoint.

    `loopback_workloads`: the workloads live on the node's loopback (test harness), so
    passthrough to loopback addresses is allowed there (see `passthrough_forbidden`)."""
    src = snap.workload_by_ip(src_ip)
    if src is None:
        return OutboundPlan(Route.REFUSE, f"source {src_ip} is not a known workload",
                            refusal=Refusal.UNKNOWN_SOURCE)
    if src.node != snap.node:
        return OutboundPlan(Route.REFUSE, f"source {src.uid} runs on {src.node}, not on {snap.node}",
                            src=src, refusal=Refusal.UNKNOWN_SOURCE)
    if not src.enrolled:
        # Only enrolled pods' sockets are redirected here; an unenrolled pod that reaches the
        # listener directly must not be given its service account's identity.
        return OutboundPlan(Route.REFUSE, f"source {src.uid} is not enrolled in the mesh: the ztunnel proxies "
                            "only enrolled pods' connections and never lends an identity to another",
                            src=src, refusal=Refusal.UNKNOWN_SOURCE)
    svc = snap.service_by_vip(dst_ip)
    if svc is not None:
        if dst_port not in svc.ports:
            return OutboundPlan(Route.REFUSE, f"service {svc.namespace}/{svc.name} has no port {dst_port}",
                                src=src, service=svc, refusal=Refusal.NO_SERVICE_PORT)
        wp = snap.waypoint(svc.namespace, svc.waypoint)
        if wp is not None and wp.takes("service"):
            return _via_waypoint(wp, pick, src=src, dst=None, dst_ip=dst_ip, dst_port=dst_port, service=svc)
        eps = [(w, target) for w, target in snap.service_endpoints(dst_ip, dst_port) if w.ip]
        if not eps:
            return OutboundPlan(Route.REFUSE, f"service {svc.namespace}/{svc.name} has no ready endpoints",
                                src=src, service=svc, refusal=Refusal.NO_ENDPOINTS)
        picked, dst_port = eps[pick % len(eps)]
        dst: Workload | None = picked
        dst_ip = picked.ip
    else:
        dst = snap.workload_by_ip(dst_ip)
        wp = snap.waypoint(dst.namespace, dst.waypoint) if dst is not None and dst.enrolled else None
        if wp is not None and wp.takes("workload"):
            return _via_waypoint(wp, pick, src=src, dst=dst, dst_ip=dst_ip, dst_port=dst_port, service=None)
    if dst is None or not dst.enrolled:
        forbidden = passthrough_forbidden(dst_ip, loopback_ok=loopback_workloads)
        if forbidden:
            return OutboundPlan(Route.REFUSE, f"{dst_ip}:{dst_port}: {forbidden}", src=src, dst=dst,
                                dst_ip=dst_ip, dst_port=dst_port, service=svc,
                                refusal=Refusal.FORBIDDEN_DESTINATION)
        why = "not a mesh workload" if dst is None else f"{dst.uid} is not enrolled"
        return OutboundPlan(Route.PASSTHROUGH, f"{dst_ip}:{dst_port}: {why}: plain TCP passthrough",
                            src=src, dst=dst, dst_ip=dst_ip, dst_port=dst_port, service=svc)
    if dst.node == snap.node:
        return OutboundPlan(Route.LOCAL, f"{dst.uid} is on this node", src=src, dst=dst, dst_ip=dst_ip,
                            dst_port=dst_port, service=svc)
    addr = dst.node_address or snap.nodes.get(dst.node)
    if not addr:
        return OutboundPlan(Route.REFUSE, f"{dst.uid} runs on node {dst.node}, whose address is unknown",
                            src=src, dst=dst, dst_ip=dst_ip, dst_port=dst_port, service=svc,
                            refusal=Refusal.UNKNOWN_NODE)
    return OutboundPlan(Route.HBONE, f"{dst.uid} on node {dst.node} ({addr})", src=src, dst=dst,
                        dst_ip=dst_ip, dst_port=dst_port, service=svc, node_address=addr)


def _via_waypoint(wp: WaypointInfo, pick: int, *, src: Workload, dst: Workload | None, dst_ip: str,
                  dst_port: int, service: ServiceInfo | None) -> OutboundPlan:
    """To the destination's waypoint, which decides per request and picks the endpoint; refused
    (never around it) when the waypoint does not exist or has no running pod."""
    target = f"service {service.uid}" if service is not None else (dst.uid if dst else dst_ip)
    if not wp.exists:
        return OutboundPlan(Route.REFUSE, f"{target} uses waypoint {wp.uid}, which does not exist (no Gateway "
                            "of class ambit-waypoint by that name): refused", src=src, dst=dst, dst_ip=dst_ip,
                            dst_port=dst_port, service=service, refusal=Refusal.WAYPOINT_UNAVAILABLE, waypoint=wp)
    if not wp.ready:
        return OutboundPlan(Route.REFUSE, f"{target} uses waypoint {wp.uid}, which has no running pod: refused",
                            src=src, dst=dst, dst_ip=dst_ip, dst_port=dst_port, service=service,
                            refusal=Refusal.WAYPOINT_UNAVAILABLE, waypoint=wp)
    addr = wp.addresses[pick % len(wp.addresses)]
    return OutboundPlan(Route.WAYPOINT, f"{target} through waypoint {wp.uid} ({addr})", src=src, dst=dst,
                        dst_ip=dst_ip, dst_port=dst_port, service=service, node_address=addr, waypoint=wp)


def passthrough_forbidden(ip: str, *, loopback_ok: bool = False) -> str | None:
    """Why the ztunnel must not dial `ip` on a pod's behalf (None: it may).

    A passthrough connection is dialed from the node's network namespace, so an address that
    means "this host" there (0.0.0.0/8, loopback) would reach the node's own listeners (the
    admin ports on 127.0.0.1) instead of anything the pod could reach itself. Multicast,
    broadcast and reserved addresses are never TCP destinations.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or (isinstance(addr, ipaddress.IPv4Address) and addr in _THIS_NETWORK):
        return "an unspecified address means the node itself to the ztunnel: refused"
    if addr.is_loopback and not loopback_ok:
        return "a loopback address means the node itself to the ztunnel: refused"
    if addr.is_multicast or (isinstance(addr, ipaddress.IPv4Address) and (addr.is_reserved or addr == _BROADCAST)):
        return "not a unicast TCP destination"
    return None


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")

SERVICE_SUFFIXES = (".svc.cluster.local", ".svc")


def resolve_name(snap: Snapshot, name: str) -> str | None:
    """A service's VIP for `<svc>.<ns>[.svc[.cluster.local]]`, or an IP literal; None if unknown."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    n = name.lower().rstrip(".")
    for suf in SERVICE_SUFFIXES:
        if n.endswith(suf):
            n = n.removesuffix(suf)
            break
    parts = n.split(".")
    if len(parts) != 2:
        return None
    svc_name, ns = parts
    for vip, s in snap.services.items():
        if s.name == svc_name and s.namespace == ns:
            return vip
    return None


class Outbound:
    """Serves 15001 (original destination from SO_ORIGINAL_DST) and the optional SOCKS5 listener."""

    def __init__(self, ctx: ProxyContext, pool: Pool) -> None:
        self.ctx = ctx
        self.pool = pool
        self._rr: dict[str, int] = {}

    # -- 15001

    def protocol_factory(self) -> TcpLeg:
        return TcpLeg(on_connected=self._accepted)

    def _accepted(self, leg: TcpLeg) -> None:
        leg.pause_reading()  # nothing to forward to until the route is known
        self.ctx.tasks.spawn("outbound", self._handle_captured(leg))

    async def _handle_captured(self, leg: TcpLeg) -> None:
        assert leg.transport is not None
        src_ip, src_port = leg.peername
        try:
            dst_ip, dst_port = original_dst(leg.transport.get_extra_info("socket"))
        except OrigDstError as e:
            rec = local_record(self.ctx, OUTBOUND, src_ip, src_port, "-", 0)
            self.ctx.refuse(rec, Refusal.NO_ORIGINAL_DST, str(e))
            leg.abort()
            return
        if (dst_ip, dst_port) == leg.sockname:
            rec = local_record(self.ctx, OUTBOUND, src_ip, src_port, dst_ip, dst_port)
            self.ctx.refuse(rec, Refusal.LOOP, "connection addressed to the outbound listener itself")
            leg.abort()
            return
        await self.proxy(leg, src_ip, src_port, dst_ip, dst_port, None)

    # -- SOCKS5

    def socks5_factory(self) -> TcpLeg:
        done: asyncio.Future[socks5.Socks5Request | None] = asyncio.get_running_loop().create_future()
        leg = TcpLeg(on_connected=lambda lg: self._socks5_accepted(lg, done))
        hs = socks5.Socks5Handshake()

        def on_early(lg: TcpLeg) -> None:
            if hs.request is not None:
                return
            try:
                out, used = hs.feed(bytes(lg.early))
            except socks5.Socks5Error as e:
                if lg.transport is not None:
                    if e.reply:
                        lg.transport.write(e.reply)
                    lg.transport.close()
                log.info("socks5 client %s: %s", lg.peername if lg.transport else "?", e)
                self.ctx.metrics.refuse(Refusal.SOCKS5_PROTOCOL)
                lg.on_early = None
                return
            lg.take_early(used)
            if out and lg.transport is not None:
                lg.transport.write(out)
            if hs.request is not None:
                lg.on_early = None
                lg.pause_reading()
                if not done.done():
                    done.set_result(hs.request)
            elif lg.early_eof and not done.done():
                done.set_result(None)

        leg.on_early = on_early
        return leg

    def _socks5_accepted(self, leg: TcpLeg, done: asyncio.Future[socks5.Socks5Request | None]) -> None:
        self.ctx.tasks.spawn("socks5", self._handle_socks5(leg, done))

    async def _handle_socks5(self, leg: TcpLeg, done: asyncio.Future[socks5.Socks5Request | None]) -> None:
        try:
            req = await asyncio.wait_for(asyncio.shield(done), self.ctx.config.timeouts.socks5_handshake)
        except TimeoutError:
            leg.abort()
            self.ctx.metrics.refuse(Refusal.SOCKS5_TIMEOUT)
            return
        if req is None:
            leg.close()
            return
        src_ip, src_port = leg.peername
        dst_ip = resolve_name(self.ctx.snapshot(), req.host) if req.is_domain else req.host
        assert leg.transport is not None
        transport = leg.transport

        def send_reply(code: int) -> None:
            if not transport.is_closing():
                transport.write(socks5.reply(code))

        if dst_ip is None:
            rec = local_record(self.ctx, OUTBOUND, src_ip, src_port, req.host, req.port)
            send_reply(Refusal.UNKNOWN_NAME.socks5_reply)
            self.ctx.refuse(rec, Refusal.UNKNOWN_NAME, f"{req.host} is not a service known to the mesh")
            leg.close()
            return
        await self.proxy(leg, src_ip, src_port, dst_ip, req.port, send_reply)

    # -- the path

    async def proxy(self, leg: TcpLeg, src_ip: str, src_port: int, dst_ip: str, dst_port: int,
                    reply: Reply | None) -> None:
        ctx = self.ctx
        snap = ctx.snapshot()
        pick = 0
        if snap.service_by_vip(dst_ip) is not None or snap.workload_by_ip(dst_ip) is not None:
            # round robin over a service's endpoints; counting every destination IP
            # (passthrough ones too) would grow this dict without bound
            pick = self._rr.get(dst_ip, 0)
            self._rr[dst_ip] = pick + 1
        plan = plan_outbound(snap, src_ip, dst_ip, dst_port, pick,
                             loopback_workloads=ctx.config.loopback_workloads)
        rec = local_record(ctx, OUTBOUND, src_ip, src_port, plan.dst_ip or dst_ip, plan.dst_port or dst_port,
                           route=plan.kind)
        if plan.dst_ip and (plan.dst_ip, plan.dst_port) != (dst_ip, dst_port):
            rec.original_dst = f"{dst_ip}:{dst_port}"
        if plan.src is not None:
            rec.src_workload, rec.src_identity = plan.src.uid, str(plan.src.identity)
        if plan.dst is not None:
            rec.dst_workload, rec.dst_identity = plan.dst.uid, str(plan.dst.identity)
        if plan.service is not None:
            rec.dst_service = f"{plan.service.name}.{plan.service.namespace}.svc.cluster.local"

        def fail(refusal: Refusal, reason: str) -> None:
            if reply is not None:
                reply(refusal.socks5_reply)
                leg.close()  # the client reads the SOCKS5 error, then EOF
            else:
                leg.abort()
            ctx.refuse(rec, refusal, reason)

        if ctx.draining:
            fail(Refusal.DRAINING, "the ztunnel is shutting down")
            return
        if plan.kind == Route.REFUSE:
            assert plan.refusal is not None
            fail(plan.refusal, plan.reason)
            return
        if plan.kind == Route.PASSTHROUGH:
            rec.decision, rec.reason = "allow", plan.reason
            log.info("outbound %s:%d -> %s:%d: %s", src_ip, src_port, plan.dst_ip, plan.dst_port, plan.reason)
            try:
                up = await dial(plan.dst_ip, plan.dst_port, ctx.config.timeouts.connect)
            except UpstreamError as e:
                fail(Refusal.UPSTREAM_UNREACHABLE, str(e))
                return
            if reply is not None:
                reply(socks5.SUCCEEDED)
            await splice_and_wait(ctx, leg, up, [rec], rec.counters)
            return
        assert plan.src is not None
        if plan.kind == Route.LOCAL:
            assert plan.dst is not None
            await self._same_node(leg, plan, rec, fail, reply)
            return
        rec.mtls = True
        try:
            authority = format_authority(plan.dst_ip, plan.dst_port)
        except HboneError as e:
            # e.g. a SOCKS5 CONNECT to port 0: refused here rather than sent for the peer to answer 400
            fail(Refusal.BAD_DESTINATION, str(e))
            return
        try:
            cert = await ctx.certs.get(plan.src.identity, timeout=ctx.config.timeouts.cert)
        except CertNotReady as e:
            fail(Refusal.CERT_NOT_READY, f"no certificate for the source: {e}")
            return
        assert plan.node_address is not None
        rec.src_cert_serial = f"{cert.serial:x}"
        if plan.waypoint is not None:
            # the waypoint listens on its pod's 15008 and presents its own identity
            assert plan.waypoint.identity is not None
            peer_id, port = plan.waypoint.identity, HBONE_PORT
            rec.waypoint = plan.waypoint.uid
        else:
            assert plan.dst is not None
            peer_id, port = plan.dst.identity, ctx.config.hbone_port_for(plan.node_address)
        try:
            up_leg = await self.pool.open_stream(cert, peer_id, plan.node_address, port, authority, src_ip)
        except PoolError as e:
            if e.refusal is Refusal.POLICY_DENIED:
                rec.decision = "deny"
            log.warning("outbound %s -> %s: %s", rec.src_workload, authority, e)
            fail(e.refusal, str(e))
            return
        rec.decision, rec.reason = "allow", plan.reason
        if leg.lost.done():
            up_leg.abort()
            ctx.conns.close(rec, "client went away before the tunnel opened")
            return
        if reply is not None:
            reply(socks5.SUCCEEDED)
        await splice_and_wait(ctx, leg, up_leg, [rec], rec.counters)

    async def _same_node(self, leg: TcpLeg, plan: OutboundPlan, rec: ConnRecord,
                         fail: Callable[[Refusal, str], None], reply: Reply | None) -> None:
        """Same node: no TLS, but the destination's inbound policy with the source's identity."""
        ctx = self.ctx
        assert plan.src is not None and plan.dst is not None
        snap = ctx.snapshot()
        rec.mtls = True
        in_rec = local_record(ctx, INBOUND, plan.src.ip, rec.src_port, plan.dst_ip, plan.dst_port,
                              src_workload=plan.src.uid, src_identity=str(plan.src.identity), mtls=True,
                              route=Route.LOCAL, dst_service=rec.dst_service, counters=rec.counters)
        chk = check_inbound(snap, plan.dst_ip, plan.dst_port, src_ip=plan.src.ip,
                            src_identity=plan.src.identity, mtls=True)
        apply_check(in_rec, chk)
        apply_check(rec, chk)
        if chk.refusal is not None:
            ctx.refuse(in_rec, chk.refusal, chk.reason)
            fail(chk.refusal, chk.reason)
            return
        try:
            up = await dial(plan.dst_ip, plan.dst_port, ctx.config.timeouts.connect)
        except UpstreamError as e:
            ctx.conns.close(in_rec, str(e))
            fail(Refusal.UPSTREAM_UNREACHABLE, str(e))
            return
        if reply is not None:
            reply(socks5.SUCCEEDED)
        await splice_and_wait(ctx, leg, up, [rec, in_rec], rec.counters)
