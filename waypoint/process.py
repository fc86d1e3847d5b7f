"""What a proxy at the mesh's L7 edge is as a process: the waypoint and the ingress gateway.

Both follow the cluster state and compile the node's snapshot from it (keeping the last
good policies on disk), hold one workload identity from the CA, reach destinations over
the ztunnel's HBONE pool, serve admin, metrics and readiness listeners, and report each
request (metrics, access log, traces, the numbered `/requests`). `ProxyConfig` is what
both are configured with and `MeshProxy` is that shared life (start, follow, stop); each
process adds its own listeners and decisions; `add_proxy_arguments` and
`proxy_config_args` are ProxyConfig's command-line flags, for both commands.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from ambit import AmbitError
from ambit.args import CliError, duration
from ambit.cluster import ClusterState
from ambit.http import Handler, HttpServer, Response, Routes
from ambit.lastgood import LastGood
from ambit.snapshot import Snapshot, build_snapshot
from ambit.sources import ClusterSource
from ambit.spiffe import SpiffeId
from ambit.svid import TrustBundle
from ambit.tasks import TaskSet
from waypoint.jwks import JwksFiles
from waypoint.telemetry import RecentRequests, RequestLog, Tracing, WaypointMetrics
from ztunnel.accesslog import AccessLog
from ztunnel.config import ConfigError as ZtunnelConfigError
from ztunnel.config import Listen, Timeouts, ZtunnelConfig, parse_listen
from ztunnel.context import ProxyContext
from ztunnel.hbone import HboneConfig
from ztunnel.identity.caclient import CaClient
from ztunnel.identity.manager import CaClientLike, CertManager
from ztunnel.metrics import CONTENT_TYPE, Metrics
from ztunnel.pool import Pool
from ztunnel.state import StateStore


@dataclass(frozen=True)
class ProxyConfig:
    """What a waypoint and an ingress gateway are both configured with."""

    namespace: str
    gateway: str  # the Gateway it serves
    node: str
    cluster: str  # cluster source: local:PATH or kubernetes
    ca_address: str
    credential_dir: Path
    ca_token_file: Path | None = None
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    metrics: Listen | None = field(default_factory=lambda: Listen("0.0.0.0", 15020))
    readiness: Listen | None = field(default_factory=lambda: Listen("0.0.0.0", 15021))
    admin: Listen | None = field(default_factory=lambda: Listen("127.0.0.1", 15000))
    access_log: str = "-"
    state_dir: Path | None = None  # last good policies; None: in memory only
    otlp_endpoint: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    cert_ttl_seconds: int = 86400
    # peers' HBONE ports by node address (a test rig with several "nodes" on one host)
    peer_hbone_ports: dict[str, int] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.gateway}"

    @property
    def hbone_listener(self) -> Listen | None:
        """The HBONE listener it serves, if any (the waypoint's; a gateway has none)."""
        return None

    def pool_config(self) -> ZtunnelConfig:
        """What the ztunnel's HBONE client pool reads (it is the ztunnel's code)."""
        return ZtunnelConfig(node=self.node, cluster=self.cluster, ca_address=self.ca_address,
                             credential_dir=self.credential_dir, trust_domain=self.trust_domain,
                             hbone=self.hbone_listener, admin=None, timeouts=self.timeouts,
                             peer_hbone_ports=dict(self.peer_hbone_ports))


class MeshProxy:
    """The life both proxies share: `start()` (identity, pool, the first cluster state),
    following the cluster, the HTTP listeners, `stop()`. A subclass compiles its own view in
    `apply`, says what readiness means and opens its own listeners."""

    kind = "proxy"  # in logs, task names and the access log's reporter
    gateway_class = ""  # the GatewayClass of the Gateways it serves (in messages)
    config_error: type[AmbitError] = AmbitError  # raised for a bad setting, naming the flag

    def __init__(self, config: ProxyConfig, metrics: WaypointMetrics, *, ca: CaClientLike | None,
                 source: ClusterSource | None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.log = logging.getLogger(f"ambit.{self.kind}")
        self.store = StateStore(config.node, trust_domain=config.trust_domain, root_namespace=config.root_namespace)
        self.tasks = TaskSet(self.kind)
        self.metrics = metrics
        self.requests_log = RequestLog(config.access_log, reporter=self.kind)
        self.tracing = Tracing(f"{self.kind} {config.uid}", config.otlp_endpoint)
        self.recent = RecentRequests()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.clock = clock
        self.hbone = HboneConfig()
        self.jwks = JwksFiles()
        self.certs: CertManager | None = None
        self.ctx: ProxyContext | None = None
        self.pool: Pool | None = None
        self._ca = ca
        self._own_ca: CaClient | None = None
        self._source = source
        self._lastgood = LastGood(config.state_dir) if config.state_dir is not None else None
        self._http: list[HttpServer] = []
        self._rr = 0  # round robin over endpoints
        self._loaded = False

    # ------------------------------------------------------------------ state

    def compile(self, cluster: ClusterState) -> Snapshot:
        """Compile and publish the node's snapshot from `cluster` and the previous one (the
        last good policies kept, also on disk across restarts)."""
        cfg = self.config
        previous = self.store.current
        if previous.version == 0 and self._lastgood is not None:
            previous = self._lastgood.seed(cfg.node, cfg.trust_domain, cfg.root_namespace)
        snap = build_snapshot(cluster, cfg.node, trust_domain=cfg.trust_domain,
                              root_namespace=cfg.root_namespace, previous=previous)
        if self._lastgood is not None:
            try:
                self._lastgood.save(snap)
            except OSError as e:
                self.log.error("cannot save the last good policies to %s: %s", self._lastgood.path, e)
        self.store.publish(snap)
        return snap

    def apply(self, cluster: ClusterState) -> object:
        """Take a new cluster state (a subclass compiles its own view too)."""
        return self.compile(cluster)

    @property
    def identity(self) -> SpiffeId | None:
        """The SPIFFE identity it holds (None while its Gateway is unknown)."""
        raise NotImplementedError

    def open_source(self) -> ClusterSource:
        raise NotImplementedError

    async def changed(self) -> None:
        """Called after each new cluster state once it is applied."""

    async def _follow(self, source: ClusterSource) -> None:
        async for cluster in source.changes(0.25):
            self.apply(cluster)
            self._loaded = True
            if self.certs is not None:
                identity = self.identity
                self.certs.track({identity} if identity is not None else set())
            await self.changed()

    # ------------------------------------------------------------------ lifecycle

    async def start_mesh(self, first_snapshot_timeout: float) -> TrustBundle:
        """The trust bundle, the CA client and the certificate manager, the HBONE pool, and the
        first cluster state (within `first_snapshot_timeout`, else stopped and an error)."""
        cfg = self.config
        try:
            bundle = TrustBundle.from_pem(cfg.trust_domain, (cfg.credential_dir / "ca.crt").read_bytes())
        except (OSError, ValueError) as e:
            raise self.config_error(f"--credential-dir: cannot read the trust bundle ca.crt: {e}") from e
        if self._ca is None:
            self._own_ca = CaClient(cfg.ca_address, cfg.credential_dir, token_file=cfg.ca_token_file)
            self._ca = self._own_ca
        self.certs = CertManager(self._ca, ttl_seconds=cfg.cert_ttl_seconds, bundle=bundle, clock=self.clock)
        self.ctx = ProxyContext(config=cfg.pool_config(), snapshot=lambda: self.store.current, certs=self.certs,
                                bundle=bundle, hbone=self.hbone, metrics=Metrics(),
                                access_log=AccessLog(cfg.access_log + ".tcp" if cfg.access_log != "-" else "-"))
        self.pool = Pool(self.ctx)
        source = self._source or self.open_source()
        self.tasks.spawn("state", self._follow(source))
        self.tasks.spawn("certs", self.certs.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + first_snapshot_timeout
        while not self._loaded:
            if loop.time() > deadline:
                await self.stop()
                raise self.config_error(f"--cluster {cfg.cluster}: no cluster state within "
                                        f"{first_snapshot_timeout:g}s")
            await asyncio.sleep(0.05)
        return bundle

    async def open_admin(self, admin_routes: Routes | None = None) -> None:
        """The admin (the pod's loopback: config dump, certificates, the request records, readiness
        and `admin_routes`), metrics and readiness listeners; a `None` address: that one is off."""
        cfg = self.config
        admin: dict[str, tuple[tuple[str, ...], Handler]] = {
            "/config_dump": (("GET",), self._config_dump),
            "/certs": (("GET",), lambda m, q: Response.json({"items": self.certs.status() if self.certs else []})),
            "/requests": (("GET",), self.recent.report),
            "/healthz/ready": (("GET",), self._ready),
            **(admin_routes or {}),
        }
        listeners: tuple[tuple[str, Listen | None, Routes], ...] = (
            ("admin", cfg.admin, admin),
            ("metrics", cfg.metrics, {"/metrics": (("GET",), self._metrics),
                                      "/stats/prometheus": (("GET",), self._metrics)}),
            ("readiness", cfg.readiness, {"/healthz/ready": (("GET",), self._ready)}),
        )
        for name, where, routes in listeners:
            if where is None:
                continue
            http = HttpServer(f"{self.kind} {name}", routes)
            try:
                self.addresses[name] = await http.start(where.host, where.port)
            except OSError as e:
                raise self.config_error(f"--{name}: cannot listen on {where}: {e.strerror or e}") from e
            self._http.append(http)

    # ------------------------------------------------------------------ readiness, admin

    def gateway_known(self) -> bool:
        """Whether its Gateway is in the cluster state."""
        raise NotImplementedError

    def readiness(self) -> tuple[bool, str]:
        """Ready once the cluster state holds its Gateway and a pod of it, and its certificate came."""
        if not self._loaded:
            return False, "no cluster state loaded yet"
        if not self.gateway_known():
            return False, f"no Gateway {self.config.uid} of class {self.gateway_class}"
        identity = self.identity
        if identity is None:
            return False, f"no pod of Gateway {self.config.uid} in the cluster state"
        if self.certs is None or self.certs.current(identity) is None:
            return False, f"waiting for a certificate for {identity}"
        return True, "ready"

    def _ready(self, method: str, query: dict[str, str]) -> Response:
        ok, why = self.readiness()
        return Response.json({"ready": ok, "reason": why}, 200 if ok else 503)

    def _metrics(self, method: str, query: dict[str, str]) -> Response:
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE)

    def _config_dump(self, method: str, query: dict[str, str]) -> Response:
        raise NotImplementedError

    async def start(self, first_snapshot_timeout: float = 15.0) -> None:
        raise NotImplementedError

    async def run_until_signalled(self) -> int:
        """Start, serve until SIGTERM or SIGINT, stop: the process's life as `ambit ... run`."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()
        return 0

    def log_up(self) -> None:
        self.log.info("%s %s up: %s", self.kind, self.config.uid,
                      ", ".join(f"{k} {h}:{p}" for k, (h, p) in self.addresses.items()))

    async def stop(self) -> None:
        """Close what start opened (the subclass closes its own listeners and clients first)."""
        if self.pool is not None:
            self.pool.close()
        if self.ctx is not None:
            await self.ctx.tasks.close(timeout=2.0)
        for h in self._http:
            await h.close()
        await self.tasks.close()
        if self.certs is not None:
            await self.certs.close()
        if self._own_ca is not None:
            await self._own_ca.close()
        self.store.close()
        self.tracing.close()
        self.requests_log.close()
        if self.ctx is not None:
            self.ctx.access_log.close()


# ---------------------------------------------------------------------- the flags

def add_proxy_arguments(p: argparse.ArgumentParser, kind: str, gateway_class: str, example_gateway: str) -> None:
    """The flags a waypoint and an ingress gateway share (ProxyConfig's)."""
    p.add_argument("--gateway", required=True, metavar="NS/NAME",
                   help=f"the Gateway (class {gateway_class}) this {kind} serves")
    p.set_defaults(example_gateway=example_gateway)
    p.add_argument("--node", required=True, help="the node it runs on (its identity is asked of the CA from there)")
    p.add_argument("--cluster", required=True, help="cluster state source: local:PATH or kubernetes")
    p.add_argument("--ca", required=True, metavar="HOST:PORT", help="the CA's gRPC address")
    p.add_argument("--credential-dir", required=True, type=Path,
                   help="ca.crt, and the node credential (tls.crt, tls.key) unless --ca-token-file")
    p.add_argument("--ca-token-file", type=Path, default=None, metavar="PATH",
                   help="authenticate to the CA with this ServiceAccount token instead of a node credential")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system", help="namespace of mesh-wide policies")
    p.add_argument("--metrics", default="0.0.0.0:15020", help="Prometheus listener ('off' to disable)")
    p.add_argument("--readiness", default="0.0.0.0:15021", help="readiness listener ('off' to disable)")
    p.add_argument("--admin", default="127.0.0.1:15000", help="admin listener ('off' to disable)")
    p.add_argument("--access-log", default="-", help="access log file (one JSON line per request), '-' for stdout")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="where the last good policies are kept across restarts")
    p.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                   help="export a span per request over OTLP/gRPC to this collector")
    p.add_argument("--cert-ttl", type=duration, default=dt.timedelta(days=1), metavar="DURATION",
                   help=f"validity asked of the CA for the {kind}'s certificate (default 24h)")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")


def proxy_config_args(args: argparse.Namespace) -> dict[str, Any]:
    """ProxyConfig's fields from the shared flags; CliError naming a bad one."""
    ns, sep, name = args.gateway.partition("/")
    if not sep or not ns or not name:
        raise CliError(f"--gateway {args.gateway!r}: expected NAMESPACE/NAME, e.g. {args.example_gateway}")

    def listen(value: str, flag: str, port: int) -> Listen | None:
        return None if value == "off" else parse_listen(value, flag, port)

    try:
        return dict(
            namespace=ns, gateway=name, node=args.node, cluster=args.cluster, ca_address=args.ca,
            credential_dir=args.credential_dir, ca_token_file=args.ca_token_file, trust_domain=args.trust_domain,
            root_namespace=args.root_namespace,
            metrics=listen(args.metrics, "--metrics", 15020), readiness=listen(args.readiness, "--readiness", 15021),
            admin=listen(args.admin, "--admin", 15000), access_log=args.access_log, state_dir=args.state_dir,
            otlp_endpoint=args.otlp_endpoint, timeouts=Timeouts(), cert_ttl_seconds=int(args.cert_ttl.total_seconds()),
        )
    except ZtunnelConfigError as e:
        raise CliError(str(e)) from e
