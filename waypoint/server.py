"""The waypoint process: HBONE in from source ztunnels, HTTP decided per request, HBONE on to the
destinations' ztunnels.

One waypoint serves one Gateway (class ambit-waypoint). It follows the cluster and compiles
its own snapshot (keeping the last good policies on disk, like the agent), holds a
certificate for its own identity (its pods' service account), and:

- accepts HBONE on 15008 from source ztunnels, the peer's identity (the client workload's)
  proved by its certificate and the client's address by `ambit.peers.client_address`;
- serves only destinations that use it: a Service whose waypoint it is, or a workload whose
  waypoint it is; anything else is 400;
- reads the HTTP inside (`waypoint.http1`, `waypoint.http2`: HTTP/1.1 and HTTP/2 with prior
  knowledge) and decides each request with `ambit.policy.authorize_http` against the
  original client's identity, every policy that selects the destination applying (L4 and L7
  parts together); a JWT is checked first (RequestAuthentication);
- forwards allowed requests over HBONE, with its own identity, to the destination's node
  (the destination admits a workload's traffic only from its waypoint), adding the client's
  address in `x-forwarded-for` and `forwarded` and the trace context in `traceparent`;
- traffic that is not HTTP passes through only when no rule that needs HTTP applies to it.

The HBONE, identity and pool code is the ztunnel's (the one dependency the waypoint has on
another process's code, allowed by the import contracts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from ambit.cluster import ClusterState
from ambit.http import Response
from ambit.peers import ClientAddress, client_address, serving_waypoint
from ambit.policy import (
    AuthnResult,
    ConnectionFacts,
    Decision,
    HttpFacts,
    authenticate,
    authorize_http,
    authorize_opaque,
    output_headers,
)
from ambit.snapshot import ServiceInfo, Snapshot, WaypointInfo, Workload
from ambit.sources import ClusterSource, open_source
from ambit.spiffe import SpiffeError, SpiffeId
from ambit.svid import SvidError, TrustBundle
from waypoint import WaypointError
from waypoint.engine import proxy
from waypoint.exchange import Hooks, Limits, Request, RequestRecord, Verdict
from waypoint.extauthz import CheckRequest, ExtAuthz, Provider
from waypoint.headers import joined
from waypoint.process import MeshProxy, ProxyConfig
from waypoint.streams import ByteStream, LegStream
from waypoint.telemetry import RequestFacts, WaypointMetrics, failure_flag
from ztunnel.config import Listen
from ztunnel.hbone import ConnectRequest, HboneServer, RequestRejected
from ztunnel.identity.manager import CaClientLike, CertNotReady
from ztunnel.identity.tls import server_context_selector, verified_peer
from ztunnel.pool import PoolError
from ztunnel.tunnel import HboneProtocol, StreamLeg

log = logging.getLogger("ambit.waypoint")

SNIFF_TIMEOUT = 1.0  # a client that sends nothing this long is taken as non-HTTP


class ConfigError(WaypointError):
    """A waypoint setting is invalid; names the flag."""


@dataclass(frozen=True)
class WaypointConfig(ProxyConfig):
    """Everything a waypoint process needs."""

    hbone: Listen = field(default_factory=lambda: Listen("0.0.0.0", 15008))
    limits: Limits = field(default_factory=Limits)
    # the external authorizers CUSTOM policies may name (--extension-provider, --mesh-config)
    extension_providers: tuple[Provider, ...] = ()

    @property
    def hbone_listener(self) -> Listen | None:
        return self.hbone


@dataclass(frozen=True)
class Target:
    """Where one HBONE stream to the waypoint goes: a workload, reached as a Service or itself."""

    workload: Workload
    port: int  # the workload's port
    service: ServiceInfo | None
    authority: str  # as the client dialed it


def resolve_target(snap: Snapshot, me: WaypointInfo, host: str, port: int, pick: int) -> Target | str:
    """Pure: the destination of a CONNECT to the waypoint, or why it is not one of its own."""
    svc = snap.service_by_vip(host)
    if svc is not None:
        if svc.namespace != me.namespace or svc.waypoint != me.name:
            return f"service {svc.uid} does not use waypoint {me.uid}"
        eps = [(w, t) for w, t in snap.service_endpoints(host, port) if w.ip and w.enrolled]
        if not eps:
            return f"service {svc.uid} has no port {port} or no ready endpoints"
        picked, target_port = eps[pick % len(eps)]
        return Target(picked, target_port, svc, f"{host}:{port}")
    w = snap.workload_by_ip(host)
    if w is None or not w.enrolled:
        return f"{host} is neither a service nor a workload of the mesh"
    served = serving_waypoint(snap, me.identity, w)
    if served is None or served.uid != me.uid:
        return f"{w.uid} does not use waypoint {me.uid}"
    return Target(w, port, None, f"{host}:{port}")


@dataclass
class _RequestContext:
    """What the decide hook hands the record hook through the verdict."""

    facts: RequestFacts
    span: Any
    start: float


class Waypoint(MeshProxy):
    """The waypoint process; `start()`, serve, `stop()`."""

    kind = "waypoint"
    gateway_class = "ambit-waypoint"
    config_error = ConfigError

    def __init__(self, config: WaypointConfig, *, ca: CaClientLike | None = None,
                 source: ClusterSource | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(config, WaypointMetrics(), ca=ca, source=source, clock=clock)
        self.config: WaypointConfig = config
        self._servers: list[asyncio.Server] = []
        self.connections: set[WaypointConnection] = set()
        self.extauthz = ExtAuthz(config.extension_providers, resolve=self._provider_address)

    # ------------------------------------------------------------------ state

    @property
    def me(self) -> WaypointInfo | None:
        return self.store.current.waypoint(self.config.namespace, self.config.gateway)

    @property
    def identity(self) -> SpiffeId | None:
        me = self.me
        return me.identity if me is not None else None

    def apply(self, cluster: ClusterState) -> Snapshot:
        """Compile the snapshot from `cluster` and the previous one (last good policies kept)."""
        return self.compile(cluster)

    def open_source(self) -> ClusterSource:
        return open_source(self.config.cluster)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, first_snapshot_timeout: float = 15.0) -> None:
        bundle = await self.start_mesh(first_snapshot_timeout)
        if self.me is None or not self.me.exists:
            log.warning("no Gateway %s of class ambit-waypoint in the cluster state (yet)", self.config.uid)
        try:
            await self._open_listeners(bundle)
        except BaseException:
            await self.stop()
            raise
        self.log_up()

    async def _open_listeners(self, bundle: TrustBundle) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        tls = server_context_selector(self._lookup_cert, bundle)
        try:
            srv = await loop.create_server(lambda: WaypointConnection(self), cfg.hbone.host, cfg.hbone.port,
                                           ssl=tls, ssl_handshake_timeout=cfg.timeouts.connect,
                                           reuse_address=True, backlog=1024)
        except OSError as e:
            raise ConfigError(f"--listen: cannot listen on {cfg.hbone}: {e.strerror or e}") from e
        self._servers.append(srv)
        a = srv.sockets[0].getsockname()
        self.addresses["hbone"] = (str(a[0]), int(a[1]))
        await self.open_admin({"/debug/authorize": (("GET",), self._authorize)})

    def _provider_address(self, host: str, port: int) -> tuple[str, int]:
        """Where to reach an extension provider: `<name>.<namespace>.svc[...]` (or `<name>.<namespace>`)
        is one of that Service's endpoints, at the port it targets; anything else as given."""
        parts = host.split(".")
        snap = self.store.current
        if len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc"):
            svc = next((s for s in snap.services.values() if (s.name, s.namespace) == (parts[0], parts[1])), None)
            if svc is not None:
                eps = [(w.ip, target) for w, target in snap.service_endpoints(svc.vip, port) if w.ip]
                if not eps:
                    raise WaypointError(f"Service {svc.uid} has no endpoints for port {port}")
                self._rr += 1
                return eps[self._rr % len(eps)]
        return host, port

    def _lookup_cert(self, identity: SpiffeId) -> Any:
        if self.certs is None or identity != self.identity:
            return None  # only ever this waypoint's own identity
        return self.certs.current(identity)

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for c in list(self.connections):
            c.abort("waypoint shutting down")
        await super().stop()
        await self.extauthz.close()

    # ------------------------------------------------------------------ readiness, admin

    def gateway_known(self) -> bool:
        me = self.me
        return me is not None and me.exists

    def _config_dump(self, method: str, query: dict[str, str]) -> Response:
        snap = self.store.current
        me = self.me
        served = sorted({w.uid for w in snap.workloads.values() if me is not None
                         and serving_waypoint(snap, me.identity, w) is not None})
        return Response.json({
            "gateway": self.config.uid, "identity": str(self.identity) if self.identity else None,
            "ready": self.readiness()[0], "version": snap.version, "serves": served,
            "policies": snap.policies.summary(), "errors": list(snap.errors),
            "listeners": {k: f"{h}:{p}" for k, (h, p) in self.addresses.items()},
            "extension_providers": [p.describe() for p in self.extauthz.providers.values()],
        })

    def _authorize(self, method: str, query: dict[str, str]) -> Response:
        """`ambit policy check --method --path`: this waypoint's verdict on one request."""
        snap = self.store.current
        try:
            src_ns, src_sa = query["from"].split("/", 1)
            src = SpiffeId.for_workload(snap.trust_domain, src_ns, src_sa)
            dst = snap.workload(query["to"])
            port = int(query["port"])
        except (KeyError, ValueError, SpiffeError) as e:
            return Response.json({"error": f"use ?from=NS/SA&to=NS/POD&port=N[&method=&path=&host=] ({e})"}, 400)
        if dst is None:
            return Response.json({"error": f"no workload {query['to']} in this waypoint's state"}, 404)
        headers = {k.lower(): v for k, v in (h.split("=", 1) for h in query.get("headers", "").split(",")
                                             if "=" in h)}
        if query.get("jwt"):
            headers["authorization"] = f"Bearer {query['jwt']}"
        path = query.get("path", "/")
        authn = authenticate(snap.policies.jwt_rules(dst), headers, path, now=self.clock(), keys=self.jwks.resolve)
        if not authn.ok:
            return Response.json({"allowed": False, "action": "DENY", "policy": authn.rule, "rule": None,
                                  "reason": f"{authn.status} {authn.reason} (RequestAuthentication)", "notes": [],
                                  "source": str(src), "destination": dst.uid, "port": port,
                                  "waypoint": self.config.uid})
        facts = ConnectionFacts(query.get("source_ip", "0.0.0.0"), src, dst, port, True)
        http = HttpFacts(query.get("method", "GET").upper(), path.partition("?")[0], query.get("host", ""),
                         headers, auth=authn.auth)
        d = authorize_http(facts, http, snap.policies, providers=self.extauthz.names)
        out = d.to_dict()
        out.update({"source": str(src), "destination": dst.uid, "port": port, "waypoint": self.config.uid})
        return Response.json(out)

    # ------------------------------------------------------------------ the data path

    async def handle_connect(self, conn: WaypointConnection, leg: StreamLeg, req: ConnectRequest) -> None:
        snap = self.store.current
        me = self.me
        peer_ip = conn.peer[0]
        if me is None or me.identity is None:
            conn.respond(leg, 503)
            return
        client = client_address(snap, peer_ip, conn.identity, req.forwarded_for)
        if client.ip is None:
            log.info("%s: %s", conn.label, client.reason)
            conn.respond(leg, 400)
            return
        self._rr += 1
        target = resolve_target(snap, me, req.host, req.port, self._rr)
        if isinstance(target, str):
            log.info("%s: CONNECT %s refused: %s", conn.label, req.authority, target)
            conn.respond(leg, 400)
            return
        conn.respond(leg, 200)
        down = LegStream(leg, name=f"downstream {req.authority}")
        leg.attach(cast(Any, down))
        session = _Session(self, conn, client, target)
        try:
            await session.run(down)
        finally:
            down.close()


class _Session:
    """One proxied TCP connection through the waypoint (one HBONE stream in)."""

    def __init__(self, wp: Waypoint, conn: WaypointConnection, client: ClientAddress, target: Target) -> None:
        self.wp = wp
        self.conn = conn
        self.client = client
        self.target = target
        self.upstreams: list[ByteStream] = []

    async def run(self, down: LegStream) -> None:
        hooks = Hooks(decide=self.decide, open_upstream=self.open_upstream, on_request=self.on_request,
                      authority=self.target.authority)
        try:
            found = await proxy(down, hooks, self.wp.config.limits, sniff_timeout=SNIFF_TIMEOUT)
            if found.protocol == "opaque":
                await self._opaque(down, found.prefix)
        finally:
            for up in self.upstreams:
                up.close()

    # -- hooks

    def facts(self) -> ConnectionFacts:
        return ConnectionFacts(self.client.ip or "", self.conn.identity, self.target.workload, self.target.port, True)

    def decide(self, req: Request) -> Verdict | Awaitable[Verdict]:
        snap = self.wp.store.current
        t = self.target
        rf = RequestFacts(
            method=req.method, authority=req.authority, path=req.path,
            protocol="grpc" if (req.header("content-type") or "").startswith("application/grpc") else "http",
            client_ip=self.client.ip or "", source_workload=self.client.workload.uid if self.client.workload else None,
            source_principal=str(self.conn.identity) if self.conn.identity else None,
            destination_workload=t.workload.uid, destination_principal=str(t.workload.identity),
            destination_service=t.service.uid if t.service else None,
        )
        span = self.wp.tracing.start(f"{req.method} {req.path}", dict(req.headers), {
            "ambit.source.principal": rf.source_principal, "ambit.destination.workload": rf.destination_workload,
            "ambit.waypoint": self.wp.config.uid, "client.address": rf.client_ip,
        })
        rf.trace_id = self.wp.tracing.trace_id(span)
        context = _RequestContext(rf, span, time.monotonic())
        headers = joined(req.headers)
        # JWT first (RequestAuthentication): a present but invalid token is refused (401), a
        # missing one passes and the policies decide. A CORS preflight carries no token, but
        # the headers only a verified token may set are removed from it all the same.
        preflight = req.method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers
        rules = snap.policies.jwt_rules(t.workload)
        if preflight:
            authn = AuthnResult(ok=True, remove_headers=output_headers(rules))
        else:
            authn = authenticate(rules, headers, req.target, now=self.wp.clock(), keys=self.wp.jwks.resolve)
        if not authn.ok:
            rf.decision, rf.reason, rf.policy = "deny", authn.reason, authn.rule
            challenge = authn.www_authenticate(req.authority or t.authority)
            return Verdict.deny(authn.status, authn.reason.encode(), response_headers=[("www-authenticate", challenge)],
                                context=context)
        if authn.auth is not None:
            rf.request_principal = authn.auth.principal
        http = HttpFacts(req.method, req.path, req.authority, headers, auth=authn.auth)
        d: Decision = authorize_http(self.facts(), http, snap.policies, providers=self.wp.extauthz.names)
        self.wp.metrics.note_dry_run(rf, d.dry_run)
        rf.decision = "allow" if d.allowed else "deny"
        rf.policy, rf.rule, rf.reason = d.policy, d.rule, d.reason
        if not d.allowed:
            return Verdict.deny(403, context=context)
        xff = req.header("x-forwarded-for")
        fwd = req.header("forwarded")
        add = [
            ("x-forwarded-for", f"{xff}, {rf.client_ip}" if xff else rf.client_ip),
            ("forwarded", f"{fwd}, for={_forwarded_node(rf.client_ip)}" if fwd else f"for={_forwarded_node(rf.client_ip)}"),
            *self.wp.tracing.outgoing(span),
        ]
        # the token is not passed on unless forwardOriginalToken; claims/payload headers are set
        # only from a verified token (a client's own are removed)
        add += list(authn.set_headers)
        remove = ["x-forwarded-for", "forwarded", "traceparent", *authn.remove_headers,
                  *(n for n, _ in authn.set_headers)]
        if d.custom:  # CUSTOM policies matched: their providers must allow it too
            return self._ask_providers(d, req, add, remove, context)
        return Verdict.allow(add_headers=add, remove_headers=remove, context=context)

    async def _ask_providers(self, d: Decision, req: Request, add: list[tuple[str, str]], remove: list[str],
                             context: _RequestContext) -> Verdict:
        """Ask each matching CUSTOM policy's provider (Istio asks them before its DENY and ALLOW
        policies; here they are asked only when those allow): any denial is the answer."""
        rf, t = context.facts, self.target
        check = CheckRequest.of(req, source_ip=rf.client_ip, source_principal=rf.source_principal,
                                destination_ip=t.workload.ip, destination_port=t.port,
                                destination_principal=rf.destination_principal)
        asked: list[dict[str, Any]] = []
        rf.extra["ext_authz"] = asked
        to_client: list[tuple[str, str]] = []
        for c in d.custom:
            res = await self.wp.extauthz.check(c.provider, check)
            self.wp.metrics.ext_authz.labels(c.provider, "allow" if res.allowed else "deny" if res.status else "error").inc()
            asked.append({"provider": c.provider, "policy": c.policy, "rule": c.rule, "allowed": res.allowed,
                          "reason": res.reason})
            if not res.allowed:
                rf.decision, rf.policy, rf.rule = "deny", c.policy, c.rule
                rf.reason = f"denied by CUSTOM policy {c.policy} rule {c.rule}: {res.reason}"
                return Verdict.deny(res.deny_status, res.body, response_headers=res.response_headers, context=context)
            add += res.upstream_headers
            remove += [*(n for n, _ in res.upstream_headers), *res.remove_headers]
            to_client += res.response_headers
        rf.reason = f"{d.reason}; " + "; ".join(a["reason"] for a in asked)
        return Verdict.allow(add_headers=add, remove_headers=remove, add_response_headers=to_client, context=context)

    async def open_upstream(self) -> ByteStream:
        wp, t = self.wp, self.target
        assert wp.certs is not None and wp.pool is not None
        me = wp.identity
        if me is None:
            raise WaypointError("the waypoint has no identity (no pod of its Gateway in the cluster state)")
        snap = wp.store.current
        addr = t.workload.node_address or snap.nodes.get(t.workload.node)
        if not addr:
            raise WaypointError(f"{t.workload.uid} runs on node {t.workload.node}, whose address is unknown")
        try:
            cert = await wp.certs.get(me, timeout=wp.config.timeouts.cert)
            leg = await wp.pool.open_stream(cert, t.workload.identity, addr, wp.ctx.config.hbone_port_for(addr)
                                            if wp.ctx else 15008, f"{t.workload.ip}:{t.port}", self.client.ip)
        except (CertNotReady, PoolError) as e:
            raise WaypointError(f"to {t.workload.uid}: {e}") from e
        up = LegStream(leg, name=f"upstream {t.workload.uid}")
        leg.attach(cast(Any, up))
        self.upstreams.append(up)
        return up

    def on_request(self, record: RequestRecord) -> None:
        ctx = record.context
        if not isinstance(ctx, _RequestContext):  # refused before a decision (a malformed request)
            rf = RequestFacts(method=record.method, authority=record.authority, path=record.path,
                              client_ip=self.client.ip or "", decision="deny",
                              source_principal=str(self.conn.identity) if self.conn.identity else None,
                              destination_workload=self.target.workload.uid,
                              reason=record.detail or "malformed request")
            span = None
        else:
            rf, span = ctx.facts, ctx.span
        rf.status = record.status
        rf.request_bytes, rf.response_bytes = record.request_bytes, record.response_bytes
        rf.duration_ms = max(0.0, (record.end - record.start) * 1000)
        if record.failure is not None:
            rf.error = f"{record.failure}: {record.detail}"
        rf.response_flags = _flag(record, rf)
        self.wp.metrics.record(rf)
        self.wp.requests_log.write(rf)
        self._remember(rf)
        if span is not None:
            self.wp.tracing.finish(span, rf)

    def _remember(self, rf: RequestFacts) -> None:
        """Keep the decision for the admin's `/requests` (`ambit flows`, the node's history)."""
        self.wp.recent.append({
            "time": time.time(), "protocol": rf.protocol, "method": rf.method, "authority": rf.authority,
            "path": rf.path, "status": rf.status, "decision": rf.decision, "policy": rf.policy, "rule": rf.rule,
            "reason": rf.reason, "client_ip": rf.client_ip, "src_workload": rf.source_workload,
            "src_identity": rf.source_principal, "dst_workload": rf.destination_workload,
            "dst_service": rf.destination_service, "waypoint": self.wp.config.uid, "trace_id": rf.trace_id,
            "dst_identity": rf.destination_principal, "dst_port": self.target.port,
            "request_principal": rf.request_principal,
            "bytes_received": rf.request_bytes, "bytes_sent": rf.response_bytes,
            "dry_run": rf.extra.get("dry_run", []),
        })

    # -- not HTTP

    async def _opaque(self, down: LegStream, first: bytes) -> None:
        """TCP that is not HTTP (or that was not HTTP soon enough): through only when no rule
        that needs HTTP applies, and no RequestAuthentication (whose checks and header
        cleaning it would skip)."""
        snap = self.wp.store.current
        t = self.target
        rf = RequestFacts(method="", authority=t.authority, path="", protocol="tcp", client_ip=self.client.ip or "",
                          source_workload=self.client.workload.uid if self.client.workload else None,
                          source_principal=str(self.conn.identity) if self.conn.identity else None,
                          destination_workload=t.workload.uid, destination_principal=str(t.workload.identity),
                          destination_service=t.service.uid if t.service else None)
        d = authorize_opaque(self.facts(), snap.policies, providers=self.wp.extauthz.names)
        self.wp.metrics.note_dry_run(rf, d.dry_run)
        rf.decision, rf.policy, rf.rule, rf.reason = ("allow" if d.allowed else "deny"), d.policy, d.rule, d.reason
        started = time.monotonic()
        try:
            if rf.decision != "allow":
                down.abort()
                return
            try:
                up = await self.open_upstream()
            except WaypointError as e:
                rf.error = str(e)
                down.abort()
                return
            if first:
                up.write(first)
            rf.request_bytes, rf.response_bytes = await _pump_both(down, up)
            rf.request_bytes += len(first)
        finally:
            rf.duration_ms = (time.monotonic() - started) * 1000
            self.wp.requests_log.write(rf)
            self._remember(rf)
            if rf.decision == "deny":
                self.wp.metrics.denied(rf, "0")


def _forwarded_node(ip: str) -> str:
    """RFC 7239 node: an IPv6 address is quoted and bracketed."""
    return f'"[{ip}]"' if ":" in ip else ip


def _flag(record: RequestRecord, rf: RequestFacts) -> str:
    if rf.decision == "deny":
        return "UAEX" if record.status == 401 else "DENY"
    return failure_flag(record.failure)


async def _pump_both(a: ByteStream, b: ByteStream) -> tuple[int, int]:
    """Copy both ways until both directions ended; bytes (a->b, b->a), also those copied
    before one side failed (the record of a reset flow keeps what went through)."""
    moved = [0, 0]

    async def pump(src: ByteStream, dst: ByteStream, i: int) -> None:
        while True:
            data = await src.read(65536)
            if not data:
                dst.write_eof()
                return
            dst.write(data)
            moved[i] += len(data)
            await dst.drain()

    try:
        await asyncio.gather(pump(a, b, 0), pump(b, a, 1))
    except (WaypointError, OSError):
        a.abort()
        b.abort()
    return moved[0], moved[1]


class WaypointConnection(HboneProtocol):
    """One HBONE server connection on the waypoint's 15008."""

    def __init__(self, wp: Waypoint) -> None:
        super().__init__(HboneServer(wp.hbone, asyncio.get_running_loop().time()), "waypoint")
        self.wp = wp
        self.identity: SpiffeId | None = None
        self.peer: tuple[str, int] = ("-", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        p = transport.get_extra_info("peername")
        self.peer = (str(p[0]), int(p[1]))
        self.label = f"waypoint HBONE from {self.peer[0]}:{self.peer[1]}"
        try:
            self.identity = verified_peer(transport.get_extra_info("ssl_object"), self.wp.ctx.bundle
                                          if self.wp.ctx else _no_bundle()).identity
        except SvidError as e:
            log.warning("%s: rejected peer certificate: %s", self.label, e)
            cast(asyncio.Transport, transport).abort()
            return
        self.label = f"waypoint HBONE from {self.identity} at {self.peer[0]}:{self.peer[1]}"
        self.wp.connections.add(self)
        super().connection_made(transport)

    def handle_other(self, ev: Any) -> None:
        if isinstance(ev, ConnectRequest):
            leg = StreamLeg(self, ev.stream_id)
            self.streams[ev.stream_id] = leg
            self.wp.tasks.spawn(f"stream-{ev.stream_id}", self.wp.handle_connect(self, leg, ev))
        elif isinstance(ev, RequestRejected):
            log.info("%s: rejected stream %d with %d: %s", self.label, ev.stream_id, ev.status, ev.reason)
        else:
            super().handle_other(ev)

    def on_closed(self) -> None:
        self.wp.connections.discard(self)


def _no_bundle() -> TrustBundle:
    raise SvidError("the waypoint is not started: no trust bundle")


async def run(config: WaypointConfig, **kw: Any) -> int:
    """Start, serve until SIGTERM/SIGINT, stop."""
    return await Waypoint(config, **kw).run_until_signalled()

