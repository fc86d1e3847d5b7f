"""The ingress gateway process: HTTP and HTTPS from outside the mesh in, each request decided, allowed
ones into the mesh over HBONE with the gateway's own identity.

One process serves one Gateway (class ambit-ingress). It follows the cluster and compiles
its own snapshot (workloads, services, waypoints and Istio policies, the last good
policies kept on disk, like the waypoint) and its view (gateway.view: listeners, routes,
rate limits), holds a certificate for its identity (its pods' service account, asked of
the CA like a waypoint), and:

- listens on every port of the Gateway's listeners (TLS terminated for HTTPS, the
  certificate chosen by SNI: gateway.tls), and opens and closes ports as the Gateway
  changes;
- runs the waypoint's HTTP engine on each connection (HTTP/1.1, and HTTP/2 with prior
  knowledge on plaintext ports) with `gateway.decide` as its decision: routes, JWT,
  authorization, validation, rate limits, CORS, redirects;
- sends each allowed request to its backend Service as a source ztunnel would
  (gateway.backends): over HBONE, with the gateway's identity, to the Service's waypoint
  or to an endpoint's node, through the ztunnel's pool; so the backend's policies can
  allow exactly `ns/<gateway ns>/sa/<gateway sa>`;
- tells about each request as a waypoint does (gateway.telemetry, `reporter="gateway"`):
  metrics on 15020, one JSON access-log line, a span; and /requests on its admin for
  `ambit flows`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from ambit.cluster import ClusterState
from ambit.http import Response
from ambit.sources import ClusterSource, open_source
from ambit.spiffe import SpiffeId
from gateway import GatewayError
from gateway.backends import Hop, Unreachable, plan_hop
from gateway.decide import Connection, Context, Judgement, decide
from gateway.ratelimit import RateLimiter
from gateway.routes import BackendRef
from gateway.telemetry import GatewayMetrics, RequestFacts
from gateway.tls import TlsListeners
from gateway.view import GatewayView, build_view
from waypoint.engine import proxy
from waypoint.exchange import Hooks, Limits, Request, RequestRecord, Retry, Upstream, Verdict
from waypoint.process import MeshProxy, ProxyConfig
from waypoint.streams import ByteStream, LegStream
from waypoint.telemetry import failure_flag
from ztunnel.copy import TcpLeg
from ztunnel.identity.manager import CaClientLike, CertNotReady
from ztunnel.pool import PoolError

log = logging.getLogger("ambit.gateway")

FLAGS = {"no_listener": "NR", "no_route": "NR", "route_error": "NR", "rate_limited": "RL", "denied": "DENY",
         "jwt_invalid": "UAEX", "backend_unavailable": "UH", "headers_too_large": "DPE", "body_too_large": "DPE",
         "unsupported_media_type": "DPE", "misdirected": "DPE", "cors_refused": "-"}


class ConfigError(GatewayError):
    """A gateway setting is invalid; names the flag."""


@dataclass(frozen=True)
class GatewayConfig(ProxyConfig):
    """Everything a gateway process needs."""

    bind: str = "0.0.0.0"  # the listeners' address
    # listener port -> the port actually bound (a test rig on one host; 0: any free port)
    port_map: dict[int, int] = field(default_factory=dict)
    # a client's first bytes and every next request head must come within this (slowloris,
    # idle keep-alive connections): closed, or 408 for a head sent too slowly
    idle_timeout: float = 60.0


class ClientLeg(TcpLeg):
    """A client's TCP (or TLS) connection as the engine's byte stream's leg."""

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        # TLS cannot half-close: asyncio warns when asked to keep it open
        return keep_open and self.transport is not None and self.transport.get_extra_info("sslcontext") is None


class IngressGateway(MeshProxy):
    """The gateway process; `start()`, serve, `stop()`."""

    kind = "gateway"
    gateway_class = "ambit-ingress"
    config_error = ConfigError

    def __init__(self, config: GatewayConfig, *, ca: CaClientLike | None = None,
                 source: ClusterSource | None = None, clock: Callable[[], float] = time.time) -> None:
        metrics = GatewayMetrics()
        super().__init__(config, metrics, ca=ca, source=source, clock=clock)
        self.config: GatewayConfig = config
        self.metrics: GatewayMetrics = metrics
        self.view = GatewayView(config.namespace, config.gateway, None)
        self.listening: dict[int, tuple[str, asyncio.Server]] = {}  # listener port -> (protocol, server)
        self.tls = TlsListeners()
        self.tls_errors: list[str] = []
        self.context = Context(RateLimiter())
        self.context.keys = self.jwks.resolve
        self._serving = False  # listeners follow the Gateway once start() opened them
        self._reconciling = asyncio.Lock()

    # ------------------------------------------------------------------ state

    @property
    def identity(self) -> SpiffeId | None:
        return self.view.identity

    def apply(self, cluster: ClusterState) -> GatewayView:
        """Compile the snapshot and the view from `cluster` (last good versions kept)."""
        cfg = self.config
        self.compile(cluster)
        view = build_view(cluster, cfg.namespace, cfg.gateway, trust_domain=cfg.trust_domain, previous=self.view)
        for err in set(view.errors) - set(self.view.errors):
            log.error("%s", err)
        self.tls_errors = self.tls.update(view.gateway)
        for err in self.tls_errors:
            log.error("%s", err)
        self.view = view
        rules = {rule.ref for rs in view.routes.values() for r in rs for rule in r.rules}
        self.context.pickers = {k: p for k, p in self.context.pickers.items() if k in rules}
        self.context.limiter.forget({rl.uid for rl in view.rate_limits})
        return view

    def open_source(self) -> ClusterSource:
        # on Kubernetes also HTTPRoutes, RateLimitPolicies and the TLS Secrets of its own namespace
        return open_source(self.config.cluster, gateway_namespace=self.config.namespace)

    async def changed(self) -> None:
        if self._serving:
            await self._reconcile()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, first_snapshot_timeout: float = 15.0) -> None:
        await self.start_mesh(first_snapshot_timeout)
        if self.view.gateway is None:
            log.warning("no Gateway %s of class ambit-ingress in the cluster state (yet)", self.config.uid)
        try:
            await self.open_admin()
            await self._reconcile()
            self._serving = True
        except BaseException:
            await self.stop()
            raise
        self.log_up()

    async def _reconcile(self) -> None:
        """Open the listener ports the Gateway has, close the ones it no longer has."""
        async with self._reconciling:
            gw = self.view.gateway
            want = {p.port: p.protocol for p in gw.ports.values()} if gw is not None else {}
            for port, (proto, srv) in list(self.listening.items()):
                if want.get(port) != proto:
                    srv.close()
                    del self.listening[port]
                    self.addresses.pop(f"{proto.lower()} {port}", None)
                    log.info("listener port %d (%s) closed", port, proto)
            for port, proto in sorted(want.items()):
                if port in self.listening:
                    continue
                await self._listen(port, proto)

    async def _listen(self, port: int, proto: str) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        tls = proto == "HTTPS"
        ctx = self.tls.server_context(port) if tls else None
        bind_port = cfg.port_map.get(port, port)

        def factory() -> ClientLeg:
            return ClientLeg(on_connected=lambda leg: self._accepted(leg, port, tls))

        try:
            srv = await loop.create_server(factory, cfg.bind, bind_port, ssl=ctx,
                                           ssl_handshake_timeout=cfg.timeouts.connect if tls else None,
                                           reuse_address=True, backlog=1024)
        except OSError as e:
            log.error("listener port %d (%s): cannot listen on %s:%d: %s", port, proto, cfg.bind, bind_port,
                      e.strerror or e)
            return
        self.listening[port] = (proto, srv)
        a = srv.sockets[0].getsockname()
        self.addresses[f"{proto.lower()} {port}"] = (str(a[0]), int(a[1]))
        log.info("listener port %d (%s) on %s:%d", port, proto, a[0], a[1])

    def _accepted(self, leg: TcpLeg, port: int, tls: bool) -> None:
        if self.tasks.closed:
            leg.abort()
            return
        self.tasks.spawn(f"conn-{leg.peername[0]}:{leg.peername[1]}", self._serve(leg, port, tls))

    async def _serve(self, leg: TcpLeg, port: int, tls: bool) -> None:
        assert leg.transport is not None
        sni = self.tls.listener_of(port, leg.transport.get_extra_info("ssl_object")) if tls else None
        conn = Connection(leg.peername[0], port, tls, sni)
        stream = LegStream(leg, name=f"client {conn.peer}")
        leg.attach(cast(Any, stream))
        session = Session(self, conn)
        gw = self.view.gateway
        limits = Limits(max_header_count=gw.max_header_count if gw else 100,
                        max_header_bytes=gw.max_header_bytes if gw else 64 * 1024,
                        head_timeout=self.config.idle_timeout)
        try:
            found = await proxy(stream, session.hooks(), limits, sniff_timeout=self.config.idle_timeout)
            if found.protocol == "opaque":
                log.info("connection from %s to port %d is not HTTP: closed", conn.peer, port)
                stream.abort()
        finally:
            session.close()
            stream.close()

    async def stop(self) -> None:
        for _, srv in self.listening.values():
            srv.close()
        self.listening.clear()
        await super().stop()

    # ------------------------------------------------------------------ readiness, admin

    def gateway_known(self) -> bool:
        return self.view.gateway is not None

    def readiness(self) -> tuple[bool, str]:
        ok, why = super().readiness()
        gw = self.view.gateway
        if not ok or gw is None:
            return ok, why
        missing = [p for p in gw.ports if p not in self.listening]
        if missing:
            return False, f"listener port(s) {', '.join(map(str, missing))} not open"
        return True, "ready"

    def _config_dump(self, method: str, query: dict[str, str]) -> Response:
        v, snap = self.view, self.store.current
        gw = v.gateway
        return Response.json({
            "gateway": self.config.uid, "identity": str(v.identity) if v.identity else None,
            "ready": self.readiness()[0], "version": v.version,
            "listeners": [{"name": lst.name, "port": lst.port, "protocol": lst.protocol,
                           "hostname": lst.hostname, "routes": [r.uid for r in v.routes.get(lst.name, ())],
                           "certificate": lst.certificate.key if lst.certificate else None}
                          for p in (gw.ports.values() if gw else ()) for lst in p.listeners],
            "num_trusted_proxies": gw.num_trusted_proxies if gw else None,
            "rate_limits": [{"policy": rl.uid, "targets": [f"{k}/{n}" for k, n in rl.targets],
                             "limits": [lim.describe() for lim in rl.limits]} for rl in v.rate_limits],
            "policies": [p for p in snap.policies.summary()],
            "errors": [*v.errors, *self.tls_errors, *snap.errors],
            "addresses": {k: f"{h}:{p}" for k, (h, p) in self.addresses.items()},
        })

    # ------------------------------------------------------------------ into the mesh

    async def open_backend(self, backend: BackendRef, session: Session) -> ByteStream:
        """An HBONE stream to `backend` with the gateway's identity (gateway.backends)."""
        me = self.identity
        if me is None or self.certs is None or self.pool is None or self.ctx is None:
            raise GatewayError("the gateway has no identity yet (no pod of its Gateway in the cluster state)")
        self._rr += 1
        try:
            hop = plan_hop(self.store.current, backend, self._rr)
        except Unreachable as e:
            raise GatewayError(str(e)) from None
        session.hops[(backend.uid, backend.port)] = hop
        port = hop.port or self.ctx.config.hbone_port_for(hop.address)
        try:
            cert = await self.certs.get(me, timeout=self.config.timeouts.cert)
            leg = await self.pool.open_stream(cert, hop.peer, hop.address, port, hop.authority, None)
        except (CertNotReady, PoolError) as e:
            raise GatewayError(f"to {hop.describe()}: {e}") from e
        up = LegStream(leg, name=f"upstream {hop.describe()}")
        leg.attach(cast(Any, up))
        session.upstreams.append(up)
        return up


@dataclass
class _RequestContext:
    """What the decide hook hands the record hook through the verdict."""

    facts: RequestFacts
    judgement: Judgement
    span: Any


class Session:
    """One client connection to the gateway: the engine's hooks."""

    def __init__(self, gw: IngressGateway, conn: Connection) -> None:
        self.gw = gw
        self.conn = conn
        self.upstreams: list[ByteStream] = []
        self.hops: dict[tuple[str, int], Hop] = {}

    def hooks(self) -> Hooks:
        return Hooks(decide=self.decide, open_upstream=self._no_default, on_request=self.on_request)

    async def _no_default(self) -> ByteStream:
        raise GatewayError("every request the gateway forwards names its backend")

    def close(self) -> None:
        for up in self.upstreams:
            up.close()

    def decide(self, req: Request) -> Verdict:
        gw = self.gw
        j = decide(gw.view, gw.store.current, self.conn, req, gw.context, now=gw.clock(), mono=time.monotonic())
        rf = RequestFacts(
            method=req.method, authority=req.authority, path=req.path, client_ip=j.client_ip,
            protocol="grpc" if (req.header("content-type") or "").startswith("application/grpc") else "http",
            decision=j.decision, policy=j.policy, rule=j.policy_rule, reason=j.reason,
            request_principal=j.request_principal,
            destination_service=j.backend.uid if j.backend else None,
            connection_security_policy="tls" if self.conn.tls else "none",
        )
        rf.extra = {"gateway": gw.config.uid, "listener": j.listener, "route": j.route,
                    "route_rule": j.rule, "client_from": j.client_from, "peer": self.conn.peer,
                    "subject": j.subject, "rejection": j.rejection, "rate_limit": j.limit,
                    "allowed_by": j.allowed_by,
                    "backend": f"{j.backend.uid}:{j.backend.port}" if j.backend else None}
        gw.metrics.note_dry_run(rf, j.dry_run)
        span = gw.tracing.start(f"{req.method} {req.path}", dict(req.headers), {
            "ambit.gateway": gw.config.uid, "client.address": j.client_ip, "ambit.route": j.route,
            "ambit.request.principal": j.request_principal,
        })
        rf.trace_id = gw.tracing.trace_id(span)
        context = _RequestContext(rf, j, span)
        if j.action == "answer":
            return Verdict.respond(j.status, j.body, j.headers, context=context)
        assert j.backend is not None
        backend = j.backend
        retry = (Retry(j.retry_attempts, j.retry_codes, j.retry_backoff) if j.retry_attempts else None)

        async def open_backend() -> ByteStream:
            return await gw.open_backend(backend, self)

        return Verdict.allow(
            add_headers=[*j.add_headers, *gw.tracing.outgoing(span)],
            remove_headers=[*j.remove_headers, "traceparent", "tracestate"],
            context=context,
            upstream=Upstream((backend.uid, backend.port), open_backend),
            add_response_headers=j.add_response_headers,
            remove_response_headers=j.remove_response_headers,
            max_request_body=j.max_body, timeout=j.timeout, retry=retry, target=j.target, authority=j.authority,
        )

    def on_request(self, record: RequestRecord) -> None:
        gw = self.gw
        ctx = record.context
        if not isinstance(ctx, _RequestContext):  # refused before a decision (malformed HTTP)
            rf = RequestFacts(method=record.method, authority=record.authority, path=record.path,
                              client_ip=self.conn.peer, decision="deny", reason=record.detail or "malformed request",
                              connection_security_policy="tls" if self.conn.tls else "none")
            rf.extra = {"gateway": gw.config.uid, "peer": self.conn.peer, "rejection": str(record.failure or "")}
            j, span = None, None
        else:
            rf, j, span = ctx.facts, ctx.judgement, ctx.span
        rf.status = record.status
        rf.request_bytes, rf.response_bytes = record.request_bytes, record.response_bytes
        rf.duration_ms = max(0.0, (record.end - record.start) * 1000)
        if record.failure is not None:
            rf.error = f"{record.failure}: {record.detail}"
        if j is not None and j.backend is not None:
            hop = self.hops.get((j.backend.uid, j.backend.port))
            if hop is not None:
                rf.destination_workload = hop.workload
                rf.destination_principal = str(hop.peer)
                rf.extra["hop"] = hop.describe()
        if j is not None and j.rejection is not None:
            rf.response_flags = FLAGS.get(j.rejection, "-")
        else:
            rf.response_flags = failure_flag(record.failure)
        reason = j.rejection if j is not None else (str(record.failure) if record.failure else None)
        if reason is not None or (record.failure is not None and not record.forwarded):
            gw.metrics.rejected(j.listener if j else None, j.route if j else None, reason or "-", record.status)
        gw.metrics.record(rf)
        gw.requests_log.write(rf)
        gw.recent.append({
            "time": time.time(), "method": rf.method, "authority": rf.authority, "path": rf.path,
            "status": rf.status, "decision": rf.decision, "policy": rf.policy, "rule": rf.rule,
            "reason": rf.reason, "client_ip": rf.client_ip, "src_workload": None, "src_identity": None,
            "request_principal": rf.request_principal, "dst_workload": rf.destination_workload,
            "dst_service": rf.destination_service, "gateway": gw.config.uid, "trace_id": rf.trace_id,
            "route": rf.extra.get("route"), "rejection": rf.extra.get("rejection"),
            "bytes_received": rf.request_bytes, "bytes_sent": rf.response_bytes,
        })
        if span is not None:
            gw.tracing.finish(span, rf)


async def run(config: GatewayConfig, **kw: Any) -> int:
    """Start, serve until SIGTERM/SIGINT, stop."""
    return await IngressGateway(config, **kw).run_until_signalled()

