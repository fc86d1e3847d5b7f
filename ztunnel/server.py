"""The ztunnel process: owns the listeners, the state store, the certificates and every task.

`Ztunnel.start()` loads state, starts certificate management and opens the
listeners (15001, 15006, 15008, 15000, 15020, 15021 and the optional SOCKS5);
`stop()` drains gracefully: stop accepting, GOAWAY on every HBONE connection,
let live connections finish (bounded), then cancel the named tasks and close
every socket. `run()` wraps both for the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from ambit.http import HttpServer, Response
from ambit.policy import ConnectionFacts, mtls_mode
from ambit.snapshot import Snapshot
from ambit.sources import open_source
from ambit.spiffe import SpiffeError, SpiffeId
from ambit.svid import TrustBundle
from ambit.tasks import TaskSet
from ztunnel.accesslog import AccessLog
from ztunnel.config import ConfigError, Listen, ZtunnelConfig
from ztunnel.context import ProxyContext
from ztunnel.copy import tune_allocator
from ztunnel.hbone import HboneConfig
from ztunnel.identity.caclient import CaClient
from ztunnel.identity.manager import CaClientLike, CertManager
from ztunnel.inbound import Inbound
from ztunnel.metrics import CONTENT_TYPE, Metrics
from ztunnel.outbound import Outbound
from ztunnel.pool import Pool
from ztunnel.state import LocalStateSource, StateSource, StateStore

log = logging.getLogger("ambit.ztunnel")

METRICS_FLUSH_INTERVAL = 5.0


class Ztunnel:
    """One node's ztunnel. Tests and the benchmark build it directly; the CLI via `run()`."""

    def __init__(
        self,
        config: ZtunnelConfig,
        *,
        state_source: StateSource | None = None,
        ca: CaClientLike | None = None,
        hbone: HboneConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.instance = secrets.token_hex(8)  # a restarted ztunnel numbers its records from 1 again
        self.store = StateStore(config.node, trust_domain=config.trust_domain,
                                root_namespace=config.root_namespace)
        self._state_source = state_source
        self._ca = ca
        self._own_ca: CaClient | None = None
        self._hbone = hbone or HboneConfig()
        self._clock = clock
        self.tasks = TaskSet("ztunnel")
        self.metrics = Metrics()
        self.addresses: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        self._http: list[HttpServer] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        # The task request_stop() starts: owned here, not in self.tasks, because
        # stop() closes self.tasks and must not cancel itself.
        self._stop_task: asyncio.Task[None] | None = None
        self._snapshot_loaded = False
        self.ctx: ProxyContext | None = None
        self.pool: Pool | None = None
        self.inbound: Inbound | None = None
        self.outbound: Outbound | None = None
        self.certs: CertManager | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, first_snapshot_timeout: float = 10.0) -> None:
        cfg = self.config
        cfg.check()
        tune_allocator()  # process-wide: the data path's chunk copies stay on the heap
        try:
            bundle = TrustBundle.from_pem(cfg.trust_domain, (cfg.credential_dir / "ca.crt").read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--credential-dir: cannot read the trust bundle ca.crt: {e}") from e
        if self._ca is None:
            self._own_ca = CaClient(cfg.ca_address, cfg.credential_dir, token_file=cfg.ca_token_file)
            self._ca = self._own_ca
        self.certs = CertManager(self._ca, ttl_seconds=cfg.cert_ttl_seconds, bundle=bundle, clock=self._clock)
        access_log = AccessLog(cfg.access_log)
        ctx = self.ctx = ProxyContext(
            config=cfg, snapshot=lambda: self.store.current, certs=self.certs, bundle=bundle,
            hbone=self._hbone, metrics=self.metrics, access_log=access_log,
        )
        ctx.conns.on_close.append(access_log.write)
        ctx.conns.on_close.append(self.metrics.connection_closed)
        self.metrics.set_cert_source(self._cert_expiries)
        self.metrics.set_snapshot_source(lambda: self.store.current)
        self.metrics.pool_connections.set_function(lambda: len(self.pool) if self.pool else 0)
        self.pool = Pool(ctx)
        self.inbound = Inbound(ctx)
        self.outbound = Outbound(ctx, self.pool)

        source = self._state_source or LocalStateSource(
            open_source(cfg.cluster), cfg.node, cfg.trust_domain, cfg.root_namespace
        )
        self.tasks.spawn("state", source.run(self.store))
        self.tasks.spawn("certs", self.certs.run())
        first = asyncio.get_running_loop().create_future()
        self.tasks.spawn("track-identities", self._track(first))
        self.tasks.spawn("metrics-flush", self._flush_metrics())
        try:
            await asyncio.wait_for(asyncio.shield(first), first_snapshot_timeout)
        except TimeoutError:
            await self.stop(graceful=False)
            raise ConfigError(f"--cluster {cfg.cluster}: no cluster state within {first_snapshot_timeout:g}s") from None

        try:
            await self._open_listeners()
        except BaseException:
            await self.stop(graceful=False)
            raise
        log.info("ztunnel for node %s up: %s", cfg.node,
                 ", ".join(f"{k} {h}:{p}" for k, (h, p) in self.addresses.items()))

    def _resolve_listeners(self) -> ZtunnelConfig:
        cfg = self.config
        if all(x is not None for x in (cfg.outbound, cfg.inbound_plaintext, cfg.hbone, cfg.metrics, cfg.readiness)):
            return cfg
        addr = self.store.current.nodes.get(cfg.node)
        if not addr:
            raise ConfigError(
                f"--node {cfg.node}: the cluster state has no Node {cfg.node!r} with an address "
                "(status.addresses); pass --hbone/--outbound/... explicitly or fix the Node object"
            )
        return cfg.with_node_address(addr)

    async def _open_listeners(self) -> None:
        cfg = self.config = self._resolve_listeners()
        assert self.ctx is not None and self.inbound is not None and self.outbound is not None
        self.ctx.config = cfg
        loop = asyncio.get_running_loop()

        async def listen(name: str, where: Listen | None, factory: Any, **kw: Any) -> None:
            if where is None:
                return
            try:
                srv = await loop.create_server(factory, where.host, where.port, reuse_address=True,
                                               backlog=1024, **kw)
            except OSError as e:
                raise ConfigError(f"{name}: cannot listen on {where}: {e.strerror or e}") from e
            self._servers.append(srv)
            a = srv.sockets[0].getsockname()
            self.addresses[name] = (str(a[0]), int(a[1]))

        inbound, outbound = self.inbound, self.outbound
        await listen("hbone", cfg.hbone, inbound.protocol_factory, ssl=inbound.tls_context(),
                     ssl_handshake_timeout=cfg.timeouts.connect)
        await listen("outbound", cfg.outbound, outbound.protocol_factory)
        await listen("inbound_plaintext", cfg.inbound_plaintext, inbound.plaintext_factory)
        await listen("socks5", cfg.socks5, outbound.socks5_factory)
        routes: Mapping[str, tuple[tuple[str, ...], Any]]
        for name, where, routes in (
            ("admin", cfg.admin, self._admin_routes()),
            ("metrics", cfg.metrics, {"/metrics": (("GET",), self._metrics_handler),
                                      "/stats/prometheus": (("GET",), self._metrics_handler)}),
            ("readiness", cfg.readiness, {"/healthz/ready": (("GET",), self._ready_handler)}),
        ):
            if where is None:
                continue
            http = HttpServer(name, routes)
            try:
                self.addresses[name] = await http.start(where.host, where.port)
            except OSError as e:
                raise ConfigError(f"{name}: cannot listen on {where}: {e.strerror or e}") from e
            self._http.append(http)

    async def stop(self, graceful: bool = True) -> None:
        """Stop accepting, drain (GOAWAY, let connections finish up to the drain timeout), close all."""
        if self._stopping:
            await self.wait_stopped()
            return
        self._stopping = True
        try:
            await self._shut_down(graceful)
        finally:
            # Set even when a step failed, so no waiter hangs; the failure itself
            # reaches whoever awaits this stop (directly or via wait_stopped()).
            self._stopped.set()
        log.info("ztunnel for node %s stopped", self.config.node)

    async def _shut_down(self, graceful: bool) -> None:
        ctx = self.ctx
        log.info("ztunnel for node %s stopping (%s)", self.config.node, "draining" if graceful else "now")
        for s in self._servers:
            s.close()
        if ctx is not None:
            ctx.draining = True
            if graceful:
                if self.inbound is not None:
                    self.inbound.drain()
                if self.pool is not None:
                    self.pool.drain()
                await ctx.sleep_until_drained(self.config.timeouts.drain)
            if ctx.conns.live:
                log.warning("closing %d connection(s) that did not finish in time", len(ctx.conns.live))
        if self.pool is not None:
            self.pool.close()
        if self.inbound is not None:
            for c in list(self.inbound.connections):
                c.abort("ztunnel shutting down")
        if ctx is not None:
            await ctx.tasks.close(timeout=2.0)
            for rec in list(ctx.conns.live.values()):
                ctx.conns.close(rec, "ztunnel shut down")
        for h in self._http:
            await h.close()
        await self.tasks.close()
        if self.certs is not None:
            await self.certs.close()
        if self._own_ca is not None:
            await self._own_ca.close()
        self.store.close()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except TimeoutError:
                pass
        if ctx is not None:
            ctx.access_log.close()

    async def wait_stopped(self) -> None:
        """Until stop() finished; re-raises a failure of the stop request_stop() started."""
        await self._stopped.wait()
        if self._stop_task is not None:
            await self._stop_task

    def request_stop(self) -> None:
        """From a signal handler or /quitquitquit: drain and stop in the background."""
        if not self._stopping and self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.stop(), name="ztunnel/stop")

    # ------------------------------------------------------------------ background

    async def _track(self, first: asyncio.Future[None]) -> None:
        """Keep CertManager's desired set = identities of this node's enrolled workloads."""
        assert self.certs is not None
        async for snap in self.store.updates():
            if snap.version == 0:
                continue
            self._snapshot_loaded = True
            self.certs.track(self.local_identities(snap))
            if not first.done():
                first.set_result(None)

    @staticmethod
    def local_identities(snap: Snapshot) -> set[SpiffeId]:
        return {w.identity for w in snap.local_workloads() if w.enrolled}

    async def _flush_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            if self.ctx is not None:
                self.metrics.flush(list(self.ctx.conns.live.values()))

    def _cert_expiries(self) -> list[tuple[str, float]]:
        if self.certs is None:
            return []
        out = []
        for ident in self.certs.tracked():
            c = self.certs.current(ident)
            if c is not None:
                out.append((str(ident), c.not_after.timestamp()))
        return out

    # ------------------------------------------------------------------ readiness

    def readiness(self) -> tuple[bool, str]:
        ok, why, _ = self._readiness()
        return ok, why

    def _readiness(self) -> tuple[bool, str, list[str]]:
        """(ready, why, identities still waiting for a certificate)."""
        if not self._snapshot_loaded:
            return False, "no cluster state loaded yet", []
        if self._stopping:
            return False, "draining", []
        assert self.certs is not None
        missing = sorted(str(i) for i in self.local_identities(self.store.current)
                         if self.certs.current(i) is None)
        if missing:
            return False, f"waiting for certificates: {', '.join(missing)}", missing
        return True, "ready", []

    def _ready_handler(self, method: str, query: dict[str, str]) -> Response:
        ok, why, missing = self._readiness()
        # `serving`: the listeners are up with a cluster state, so redirected connections are
        # handled (those of identities in `waiting_for_certificates` fail until the CA answers).
        serving = self._snapshot_loaded and not self._stopping
        return Response.json({"ready": ok, "reason": why, "serving": serving,
                              "waiting_for_certificates": missing}, 200 if ok else 503)

    def _metrics_handler(self, method: str, query: dict[str, str]) -> Response:
        live = list(self.ctx.conns.live.values()) if self.ctx else []
        return Response(200, self.metrics.render(self._clock(), live), CONTENT_TYPE)

    # ------------------------------------------------------------------ admin

    def _admin_routes(self) -> dict[str, tuple[tuple[str, ...], Any]]:
        return {
            "/config_dump": (("GET",), self._config_dump),
            "/workloads": (("GET",), self._workloads),
            "/certs": (("GET",), self._certs),
            "/connections": (("GET",), self._connections),
            "/quitquitquit": (("POST",), self._quit),
            "/healthz/ready": (("GET",), self._ready_handler),
            "/debug/authorize": (("GET",), self._authorize),
            "/metrics": (("GET",), self._metrics_handler),
        }

    def _workload_json(self, snap: Snapshot) -> list[dict[str, Any]]:
        return [
            {
                "uid": w.uid, "name": w.name, "namespace": w.namespace, "service_account": w.service_account,
                "ip": w.ip, "node": w.node, "node_address": w.node_address, "identity": str(w.identity),
                "enrolled": w.enrolled, "local": w.node == snap.node, "waypoint": w.waypoint,
                "labels": dict(w.labels), "services": list(w.services),
            }
            for w in sorted(snap.workloads.values(), key=lambda w: w.uid)
        ]

    def _config_dump(self, method: str, query: dict[str, str]) -> Response:
        snap = self.store.current
        policies = []
        for row in snap.policies.summary():
            row = dict(row)
            row["key"] = f"{row['namespace']}/{row['name']}"
            policies.append(row)
        return Response.json({
            "node": snap.node,
            "version": snap.version,
            "trust_domain": snap.trust_domain,
            "root_namespace": snap.policies.root_namespace,
            "workloads": self._workload_json(snap),
            "services": [
                {"namespace": s.namespace, "name": s.name, "vip": s.vip, "waypoint": s.waypoint,
                 "ports": {str(k): v for k, v in s.ports.items()}, "endpoints": list(s.endpoints)}
                for s in sorted(snap.services.values(), key=lambda s: s.uid)
            ],
            "waypoints": [
                {"uid": w.uid, "for": w.waypoint_for, "identity": str(w.identity) if w.identity else None,
                 "addresses": list(w.addresses), "exists": w.exists, "ready": w.ready}
                for w in sorted(snap.waypoints.values(), key=lambda w: w.uid)
            ],
            "nodes": dict(snap.nodes),
            "policies": policies,
            "errors": list(snap.errors),
            "listeners": {k: f"{h}:{p}" for k, (h, p) in self.addresses.items()},
        })

    def _workloads(self, method: str, query: dict[str, str]) -> Response:
        return Response.json({"items": self._workload_json(self.store.current)})

    def _certs(self, method: str, query: dict[str, str]) -> Response:
        return Response.json({"items": self.certs.status() if self.certs else []})

    def _connections(self, method: str, query: dict[str, str]) -> Response:
        """Live records and recently closed ones (`?closed_after=N`: only those that closed after
        the N-th; `closed_last` is the newest number, `closed_first` the oldest still kept)."""
        assert self.ctx is not None and self.pool is not None
        try:
            after = int(query.get("closed_after", "0"))
        except ValueError:
            return Response.json({"error": "use ?closed_after=N (the last closed_seq taken)"}, 400)
        conns = self.ctx.conns
        return Response.json({"items": conns.snapshot(after), "pool": self.pool.stats_json(),
                              "instance": self.instance, "closed_last": conns.closed,
                              "closed_first": conns.recent[0].closed_seq if conns.recent else conns.closed + 1})

    def _quit(self, method: str, query: dict[str, str]) -> Response:
        self.request_stop()
        return Response.json({"status": "draining"})

    def _authorize(self, method: str, query: dict[str, str]) -> Response:
        """`ambit policy check`: would a connection from ns/sa to ns/pod:port be allowed here?"""
        snap = self.store.current
        try:
            src_ns, src_sa = query["from"].split("/", 1)
            dst_uid = query["to"]
            port = int(query["port"])
            src = SpiffeId.for_workload(snap.trust_domain, src_ns, src_sa)
        except (KeyError, ValueError, SpiffeError) as e:
            return Response.json({"error": f"use ?from=NS/SA&to=NS/POD&port=N ({e})"}, 400)
        dst = snap.workload(dst_uid)
        if dst is None:
            return Response.json({"error": f"no workload {dst_uid} in this ztunnel's state"}, 404)
        mtls = query.get("mtls", "true").lower() not in ("false", "0", "no")
        from ambit.peers import serving_waypoint
        from ambit.policy import HttpFacts, check

        facts = ConnectionFacts(query.get("source_ip", "0.0.0.0"), src if mtls else None, dst, port, mtls)
        http = None
        if query.get("method") or query.get("path"):
            http = HttpFacts(query.get("method", "").upper(), query.get("path", ""), query.get("host", ""))
        d = check(facts, snap.policies, http=http, via_waypoint=serving_waypoint(snap, src if mtls else None, dst) is not None)
        out = d.to_dict()
        out.update({"source": str(src), "destination": dst.uid, "port": port,
                    "mtls_mode": mtls_mode(dst, port, snap.policies)})
        return Response.json(out)


async def run(config: ZtunnelConfig, **kw: Any) -> int:
    """Start, serve until SIGTERM/SIGINT or /quitquitquit, drain, exit 0."""
    import signal

    zt = Ztunnel(config, **kw)
    await zt.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, zt.request_stop)
    await zt.wait_stopped()
    return 0
