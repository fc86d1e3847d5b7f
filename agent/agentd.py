"""The node agent process: follows the cluster, compiles the node's snapshot once,
feeds it to the node's ztunnel, reconciles this node's pods into the eBPF datapath
from the same snapshot, owns the loaded programs and maps, reads flow events, and
serves a small admin API (/status, /pods, /flows, /bypass, /healthz). /flows joins
the kernel's flow records with the ztunnel's connection records (agent.flowjoin),
which the agent reads from the ztunnel's admin endpoint on the node's loopback.

It keeps the node's flow history (agent.history, SQLite): each connection the ztunnel
closed, each request the node's waypoint and ingress gateway pods decided (their
`/requests?after=N` on the admin port of the pod's own loopback, asked from inside the
pod's network namespace: no other pod can read them), and each connection attempt the
kernel dropped; served as /flows/history and /flows/denials,
with /objects (the snapshot in force and the objects it was compiled from) for
`ambit policy simulate`.

Every snapshot is built from the previous one, so an invalid edit of a policy
keeps its last good version; those versions are saved on the node
(ambit.lastgood) so that a restarted agent keeps them too. Reconciling is
planned by `agent.enroll.plan` and executed here; every pass is idempotent, so a
restarted agent converges by re-running it (attachments made by its
predecessor are adopted by `Datapath`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import AgentError
from agent import netns as nsops
from agent.bpf import Datapath, DropCounts, cgroup_id
from agent.enroll import (
    Action,
    Actual,
    Annotate,
    Attach,
    Desired,
    Detach,
    Forget,
    KernelMode,
    KernelPod,
    PortModes,
    Retry,
    WriteSettings,
    adopt,
    orphans,
    plan,
)
from agent.feed import FeedServer
from agent.flowjoin import DROP_POLICY, join_flows
from agent.flows import FlowTable
from agent.history import (
    CLOSED_STATES,
    DropFolder,
    Filter,
    FlowHistory,
    HistoryError,
    RequestCursor,
    ZtunnelCursor,
    conn_row,
    drop_row,
    request_row,
)
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.metrics import AgentMetrics, NodeView, pod_drops
from agent.netns import NetnsError
from agent.runtime import REDIRECTION_ENABLED, PodAnnotator, PodRuntime
from ambit.cluster import REDIRECTION, ClusterState, Pod
from ambit.http import HttpServer, Response, Routes, get_json, request_on
from ambit.lastgood import LastGood
from ambit.policy import EffectiveMtlsMode, mtls_port_modes
from ambit.snapshot import Snapshot, build_snapshot
from ambit.sources import ClusterSource
from ambit.tasks import TaskSet
from ambit.wire.snapshot import encode_snapshot

CLOSED_KEPT = 256  # the ztunnel's newest closed records /flows shows

log = logging.getLogger("ambit.agent")

RETRY_INTERVAL = 1.0


@dataclass
class AgentConfig:
    node: str
    ztunnel_outbound: tuple[str, int]
    ztunnel_inbound: tuple[str, int]
    ztunnel_addresses: list[str]
    ztunnel_cgroup: Path | None
    admin: tuple[str, int] | None = None
    # A listener that serves only /metrics, for Prometheus on other hosts (None: off; the
    # admin listener, on the node's loopback, serves /metrics too).
    metrics: tuple[str, int] | None = None
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    node_netns: Path | None = None  # None: the agent already runs in the node's netns
    ztunnel_admin: tuple[str, int] = ("127.0.0.1", 15000)
    # Where the agent serves its live feed of the node's snapshot to the ztunnel (None: off).
    feed_socket: Path | None = None
    # Where the agent keeps the node's last good policies across restarts (None: in memory only).
    state_dir: Path | None = None
    # The node's flow history (SQLite; None: none) and its bounds.
    flow_history: Path | None = None
    flow_history_max_bytes: int = 100 * 2**20
    flow_history_max_age: float = 7 * 86400.0
    # Where the waypoints and ingress gateways of the node report their requests: their admin
    # port on the pod's own loopback (the agent enters the pod's network namespace to ask).
    waypoint_admin_port: int = 15000


def kernel_mode(mode: EffectiveMtlsMode) -> KernelMode:
    """What the kernel does with plaintext: STRICT drops it; PERMISSIVE and DISABLE send it
    through the ztunnel's 15006 (ambient mesh traffic is never unencrypted)."""
    return "STRICT" if mode == "STRICT" else "PERMISSIVE"


def pod_modes(snap: Snapshot, pod: Pod) -> tuple[KernelMode, PortModes]:
    """The pod's inbound plaintext mode for the kernel, and the ports that differ from it."""
    w = snap.workload_by_ip(pod.ip) if pod.ip else None
    if w is None:
        return "PERMISSIVE", ()
    default, ports = mtls_port_modes(w, snap.policies)
    k = kernel_mode(default)
    return k, tuple((p, kernel_mode(m)) for p, m in ports.items() if kernel_mode(m) != k)


@dataclass
class Agent:
    source: ClusterSource
    runtime: PodRuntime
    annotator: PodAnnotator | None
    datapath: Datapath
    config: AgentConfig
    flows: FlowTable = field(default_factory=FlowTable)
    actual: dict[str, Actual] = field(default_factory=dict)
    retries: dict[str, str] = field(default_factory=dict)
    _state: ClusterState | None = None  # the newest cluster state taken from the source
    # The node's compiled snapshot, and the cluster state it was built from: the one source
    # of the ztunnel's config, the kernel's pod settings, `ambit policies` and `ambit status`.
    snapshot: Snapshot | None = None
    _snapshot_of: ClusterState | None = None
    _adopted: bool = False  # the kernel's state of the node's pods was read (first pass)
    _lastgood: LastGood | None = None
    _pods: dict[str, Pod] = field(default_factory=dict)
    _ifaces: set[str] = field(default_factory=set)
    _tasks: TaskSet = field(default_factory=lambda: TaskSet("agent"))
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: bool = False
    ztunnel_conns: list[dict[str, Any]] = field(default_factory=list)
    ztunnel_ready: tuple[bool, str] = (False, "not asked yet")
    # The ztunnel handles redirected connections (its listeners are up with a cluster state),
    # even when it is not ready because some identities still wait for their certificate.
    ztunnel_serving: bool = False
    ztunnel_waiting: frozenset[str] = frozenset()  # SPIFFE IDs without a certificate yet
    feed: FeedServer | None = None
    history: FlowHistory | None = None
    _ztunnel_cursor: ZtunnelCursor = field(default_factory=ZtunnelCursor)
    # The ztunnel's closed records taken so far (`closed_after`, per ztunnel instance), and the
    # newest of them for /flows (the ztunnel sends each closed record once).
    _ztunnel_instance: str = ""
    _closed_after: int = 0
    _closed: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=CLOSED_KEPT))
    _request_cursors: dict[str, RequestCursor] = field(default_factory=dict)  # by waypoint pod IP
    _request_seeds: dict[str, int] = field(default_factory=dict)  # waypoint instance -> last seq written
    _drops: DropFolder = field(default_factory=DropFolder)

    # -- one reconcile pass ------------------------------------------------------

    def update_snapshot(self, cluster: ClusterState) -> Snapshot:
        """Compile the node's snapshot from `cluster` and the previous snapshot (invalid objects
        keep their last good version) and save its policies on the node when they changed."""
        cfg = self.config
        if self.snapshot is None:
            if cfg.state_dir is not None:
                self._lastgood = LastGood(cfg.state_dir)
                self.snapshot = self._lastgood.seed(cfg.node, cfg.trust_domain, cfg.root_namespace)
            else:
                self.snapshot = Snapshot.empty(cfg.node, cfg.trust_domain, cfg.root_namespace)
        old_errors = set(self.snapshot.errors)
        snap = build_snapshot(cluster, cfg.node, trust_domain=cfg.trust_domain,
                              root_namespace=cfg.root_namespace, previous=self.snapshot)
        for e in snap.errors:
            if e not in old_errors:
                log.error("policy/state error: %s", e)
        if self._lastgood is not None:
            try:
                self._lastgood.save(snap)
            except OSError as e:  # the snapshot still applies; only a later restart would lose it
                log.error("cannot save the last good policies to %s: %s", self._lastgood.path, e)
        self.snapshot, self._snapshot_of = snap, cluster
        return snap

    def desired(self, cluster: ClusterState) -> dict[str, Desired]:
        snap = self.snapshot if self._snapshot_of is cluster and self.snapshot else self.update_snapshot(cluster)
        out: dict[str, Desired] = {}
        for pod in cluster.pods_on_node(self.config.node):
            if pod.phase in ("Succeeded", "Failed"):
                continue
            enrolled = cluster.is_enrolled(pod)
            mode: KernelMode = "PERMISSIVE"
            port_modes: PortModes = ()
            if enrolled and pod.ip:
                mode, port_modes = pod_modes(snap, pod)
            out[pod.key] = Desired(
                key=pod.key,
                ip=pod.ip,
                cgroup=self.runtime.cgroup_path(pod),
                enrolled=enrolled,
                mode=mode,
                port_modes=port_modes,
                annotated=pod.meta.annotations.get(REDIRECTION) == REDIRECTION_ENABLED,
            )
        return out

    def reconcile(self, cluster: ClusterState) -> list[Action]:
        self._pods = {p.key: p for p in cluster.pods_on_node(self.config.node)}
        # Reset before any step of this pass records a failure (interfaces first), so that
        # every failure is shown in /status and retried on the short interval.
        self.retries = {}
        self._attach_interfaces()
        desired = self.desired(cluster)
        if not self._adopted:
            # first pass of this agent: start from what the kernel holds (an earlier agent's work)
            with contextlib.suppress(AgentError):
                for key, a in adopt(desired, self._cgroup_ids(desired), self._kernel_pods(desired)).items():
                    self.actual.setdefault(key, a)
                self._adopted = True
        actions = plan(desired, self.actual)
        for act in actions:
            self._run(act)
        try:
            gc = orphans(self.actual, self.datapath.pods(), self.datapath.pod_ips())
        except AgentError as e:
            log.warning("reading the kernel's pod maps: %s", e)
            gc = []
        for act in gc:
            log.info("forgetting a kernel entry of a pod that is gone: %s", act.key)
            self._run(act)
        return [*actions, *gc]

    def _run(self, act: Action) -> None:
        try:
            self._execute(act)
        except AgentError as e:
            log.warning("%s: %s", act.key, e)
            self.retries[act.key] = str(e)

    def _cgroup_ids(self, desired: dict[str, Desired]) -> dict[str, int]:
        out = {}
        for key, d in desired.items():
            if d.cgroup is not None:
                with contextlib.suppress(OSError):
                    out[key] = cgroup_id(d.cgroup)
        return out

    def _kernel_pods(self, desired: dict[str, Desired]) -> dict[int, KernelPod]:
        """The kernel's entries for the desired pods' cgroups (attachments checked per pod)."""
        ids = self._cgroup_ids(desired)
        paths = {ids[k]: d.cgroup for k, d in desired.items() if k in ids and d.cgroup is not None}
        ip_of = {cid: ip for ip, cid in self.datapath.pod_ips().items()}
        out = {}
        for cid, k in self.datapath.pods().items():
            path = paths.get(cid)
            if path is None or k["pod_cgroup_id"] != cid:
                continue
            ip = ip_of.get(cid)
            attached = self.datapath.pod_attached(path)
            out[cid] = KernelPod(
                cgroup_id=cid, enrolled=k["enrolled"], mode=k["mode"], port_exceptions=tuple(k["port_exceptions"]),
                ip=ip, port_modes=tuple(sorted(self.datapath.port_modes(ip).items())) if ip else (),
                attached=bool(attached) and all(attached.values()),
            )
        return out

    def _attach_interfaces(self) -> None:
        wanted = list(self.runtime.node_interfaces())
        for pod in self._pods.values():
            host_if = self.runtime.host_interface(pod)
            if host_if:
                wanted.append(host_if)
        # A pod deleted and made again gets a new veth under the same name: forget the old
        # one so the new one is attached (its filters and MAC entry went with the device).
        self._ifaces &= set(wanted)
        for ifname in wanted:
            if ifname in self._ifaces:
                continue
            try:
                self.datapath.attach_interface(ifname, self.config.node_netns)
                self._ifaces.add(ifname)
            except AgentError as e:
                self.retries[f"iface/{ifname}"] = str(e)

    def _execute(self, act: Action) -> None:
        if isinstance(act, WriteSettings):
            root_id = self.datapath.set_pod(
                act.cgroup, act.ip, enrolled=act.enrolled, mode=act.mode, port_modes=dict(act.port_modes),
                port_exceptions=act.port_exceptions,
            )
            prev = self.actual.get(act.key)
            self.actual[act.key] = Actual(
                key=act.key,
                cgroup=act.cgroup,
                cgroup_ids=(root_id,),
                ip=act.ip,
                attached=prev.attached if prev and prev.cgroup == act.cgroup else False,
                enrolled=act.enrolled,
                mode=act.mode,
                port_exceptions=act.port_exceptions,
                port_modes=act.port_modes,
            )
        elif isinstance(act, Attach):
            done = self.datapath.attach_pod(act.cgroup)
            log.info("%s: %s", act.key, ", ".join(done))
            cur = self.actual[act.key]
            self.actual[act.key] = Actual(**{**cur.__dict__, "attached": True})
        elif isinstance(act, Detach):
            with contextlib.suppress(AgentError):  # cgroup already gone: its programs went with it
                self.datapath.detach_pod(act.cgroup)
            old = self.actual.get(act.key)
            if old is not None and old.cgroup == act.cgroup:
                self.actual[act.key] = Actual(**{**old.__dict__, "attached": False})
        elif isinstance(act, Forget):
            self.datapath.remove_pod(act.cgroup_ids, act.ip)
            gone = self.actual.get(act.key)
            if gone is not None and act.cgroup_ids and set(gone.cgroup_ids) <= set(act.cgroup_ids):
                del self.actual[act.key]
        elif isinstance(act, Annotate):
            pod = self._pods.get(act.key)
            if pod is not None and self.annotator is not None:
                self.annotator.set_annotation(pod, REDIRECTION, act.value)
        elif isinstance(act, Retry):
            self.retries[act.key] = act.reason

    # -- the process -------------------------------------------------------------

    async def run(self) -> None:
        self.datapath.set_config(self.config.ztunnel_outbound, self.config.ztunnel_inbound)
        self.datapath.set_ztunnel_addresses(self.config.ztunnel_addresses)
        if self.config.ztunnel_cgroup is not None:
            self.datapath.attach_ztunnel(self.config.ztunnel_cgroup)
        if self.config.feed_socket is not None:
            # the first snapshot before serving it: the ztunnel never sees an empty one
            first = self.update_snapshot(self.source.current())
            self.feed = FeedServer(self.config.feed_socket, self.config.node, first)
            await self.feed.start()
        if self.config.flow_history is not None:
            try:
                await self._open_history(self.config.flow_history)
            except HistoryError as e:  # the mesh runs on without it; `ambit flows --since` says so
                log.error("%s; running without a flow history", e)
        admin: HttpServer | None = None
        if self.config.admin:
            admin = HttpServer("agent admin", self.admin_routes())
            await admin.start(*self.config.admin)
        metrics: HttpServer | None = None
        if self.config.metrics:
            metrics = HttpServer("agent metrics", {"/metrics": self.admin_routes()["/metrics"]})
            await metrics.start(*self.config.metrics)
        try:
            await asyncio.gather(
                self._tasks.spawn("follow", self._follow()),
                self._tasks.spawn("events", self._events()),
                self._tasks.spawn("ztunnel-watch", self._watch_ztunnel()),
                self._tasks.spawn("waypoint-requests", self._watch_waypoints()),
            )
        finally:
            if admin is not None:
                await admin.close()
            if metrics is not None:
                await metrics.close()
            await self.close()

    async def _follow(self) -> None:
        changes = self.source.changes()
        latest: list[ClusterState] = []

        async def pull() -> None:
            async for state in changes:
                latest.append(state)
                self._wake.set()

        self._tasks.spawn("source", pull())
        while not self._stop:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_INTERVAL if self.retries else 30)
            self._wake.clear()
            if latest:
                state = latest[-1]
                latest.clear()
                self._state = state
                snap = self.update_snapshot(state)
                if self.feed is not None:
                    await self.feed.publish(snap)
            if self._state is not None:
                # Netlink and BPF syscalls block; pyroute2 also refuses to run inside a running loop.
                await asyncio.to_thread(self.reconcile, self._state)

    async def _events(self) -> None:
        while not self._stop:
            events = await asyncio.to_thread(self.datapath.poll_events, 200)
            by_ip = {p.ip: p.key for p in self._pods.values() if p.ip}
            for ev in events:
                self.flows.ingest(ev, by_ip.get)
            if self.history is not None:
                self._record_drops(events)

    async def _watch_ztunnel(self) -> None:
        """Keep the ztunnel's readiness and connection records (for /status and /flows)."""
        host, port = self.config.ztunnel_admin
        asked = 0.0
        pause = 1.0
        while not self._stop:
            try:
                if time.monotonic() - asked >= 1.0:  # when looking more often: connections only
                    asked = time.monotonic()
                    status, ready = await get_json(host, port, "/healthz/ready")
                    info = ready if isinstance(ready, dict) else {}
                    self.ztunnel_ready = (status == 200, "" if status == 200 else str(info.get("reason", ready)))
                    self.ztunnel_serving = status == 200 or bool(info.get("serving"))
                    self.ztunnel_waiting = frozenset(str(i) for i in info.get("waiting_for_certificates") or ())
                status, conns = await get_json(host, port, f"/connections?closed_after={self._closed_after}")
                if status == 200 and isinstance(conns, dict):
                    items = [c for c in conns.get("items") or () if isinstance(c, dict)]
                    pause = self._take_connections(conns, items, pause)
            except (OSError, ValueError, TimeoutError) as e:
                self.ztunnel_ready = (False, f"ztunnel admin {host}:{port} unreachable: {e}")
                self.ztunnel_serving = False
                self.ztunnel_waiting = frozenset()
            await asyncio.sleep(pause)

    # -- the flow history ----------------------------------------------------------

    async def _open_history(self, path: Path) -> None:
        cfg = self.config
        history = FlowHistory(path, max_bytes=cfg.flow_history_max_bytes, max_age=cfg.flow_history_max_age)
        await asyncio.to_thread(history.open)
        # What an earlier agent wrote already: the ztunnel and the waypoints still list it.
        self._ztunnel_cursor.seen = set(await asyncio.to_thread(history.recent_keys, "conn"))
        for key in await asyncio.to_thread(history.recent_keys, "request"):
            instance, _, seq = key.rpartition(":")
            if seq.isdigit():
                self._request_seeds[instance] = max(self._request_seeds.get(instance, 0), int(seq))
        self.history = history
        log.info("flow history in %s (at most %d MiB, %gh)", path, cfg.flow_history_max_bytes // 2**20,
                 cfg.flow_history_max_age / 3600)

    def _meta(self, uid: str) -> dict[str, Any] | None:
        """What the history keeps of a destination workload (to judge its flows once it is gone)."""
        w = self.snapshot.workload(uid) if self.snapshot is not None else None
        if w is None:
            return None
        return {"labels": dict(w.labels), "services": list(w.services), "waypoint": w.waypoint}

    def _take_connections(self, reply: dict[str, Any], items: list[dict[str, Any]], pause: float) -> float:
        """The ztunnel's live records and those closed since the last look: /flows shows the live
        ones and the newest closed; the history gets each closed one once. Returns the pause
        before the next look."""
        instance = str(reply.get("instance") or "")
        if instance != self._ztunnel_instance:  # a (re)started ztunnel numbers from 1 again
            self._ztunnel_instance, self._closed_after = instance, 0
            self._closed.clear()
        last = reply.get("closed_last")
        closed = [c for c in items if c.get("state") in CLOSED_STATES]
        if isinstance(last, int):
            self._closed_after = last
        self._closed.extend(closed)
        self.ztunnel_conns = [*(c for c in items if c.get("state") not in CLOSED_STATES), *self._closed]
        return self._record_closed(items, pause)

    def _record_closed(self, conns: list[dict[str, Any]], pause: float) -> float:
        """Write the ztunnel's newly closed connections to the history; the pause before the next
        look: short enough, at the rate they close, that its ring of closed records (2048) does
        not turn over in between (50 ms after a miss; up to 1 s when quiet)."""
        if self.history is None:
            return 1.0
        lost = self._ztunnel_cursor.lost
        new = self._ztunnel_cursor.take(conns)
        if new:
            self.history.add(conn_row(r, self.config.node, self._meta) for r in new)
        if self._ztunnel_cursor.lost > lost:
            return 0.05
        rate = len(new) / max(pause, 0.05)
        # back to the quiet pace gradually: traffic that paused for a moment comes back at its rate
        return min(1.0, max(0.05, 512 / rate) if rate else 1.0, pause * 1.5)

    def _record_drops(self, events: list[Any]) -> None:
        assert self.history is not None
        drops = [ev for ev in events if ev.kind.startswith("drop")]
        if not drops:
            return
        pods = self._state.pods.values() if self._state is not None else self._pods.values()
        by_ip = {p.ip: p.key for p in pods if p.ip}
        now = time.time()
        self.history.add(
            drop_row(ev.kind, ev.src, ev.sport, ev.dst, ev.dport, self.config.node, now, by_ip.get,
                     DROP_POLICY.get(ev.kind, ev.kind))
            for ev in drops if self._drops.first(ev.kind, ev.src, ev.sport, ev.dst, ev.dport, now))

    def _local_waypoints(self) -> dict[str, Pod]:
        """The pods on this node that report the requests they decide, by address: the
        waypoints', and the ingress gateways' (pods of an ambit-ingress Gateway, running as its
        service account)."""
        if self.snapshot is None:
            return {}
        local = {p.ip: p for p in self._pods.values() if p.ip}
        out = {a for wp in self.snapshot.waypoints.values() for a in wp.addresses if a in local}
        state = self._state
        if state is not None:
            out |= {p.ip for gw in state.gateways.values() if gw.is_ingress for p in state.serving_pods(gw)
                    if p.ip in local and p.phase == "Running"}
        return {ip: local[ip] for ip in sorted(out)}

    async def _watch_waypoints(self) -> None:
        """Collect the requests the node's waypoints decided (each once) into the history."""
        while not self._stop:
            if self.history is not None:
                pods = self._local_waypoints()
                for ip in set(self._request_cursors) - set(pods):
                    del self._request_cursors[ip]
                for ip, pod in pods.items():
                    try:
                        await self._collect_requests(ip, pod)
                    except (OSError, ValueError, TimeoutError, NetnsError) as e:
                        log.debug("waypoint at %s: /requests: %s", ip, e)
            await asyncio.sleep(1.0)

    async def _collect_requests(self, ip: str, pod: Pod) -> None:
        """One look at a proxy pod's numbered request records. They are served on the pod's
        loopback only (its admin listener): they name who called what, so no other pod may
        read them, and from the network the agent and a pod's traffic relayed by this node's
        ztunnel come from the same address. The agent enters the pod's network namespace."""
        assert self.history is not None
        netns = self.runtime.netns_path(pod)
        if netns is None:
            return
        cur = self._request_cursors.setdefault(ip, RequestCursor())
        path, port = f"/requests?after={cur.after}", self.config.waypoint_admin_port

        def ask() -> tuple[int, Any]:
            sock = nsops.connect_at(netns, "127.0.0.1", port, 2.0)
            return request_on(sock, "127.0.0.1", "GET", path)

        status, body = await asyncio.to_thread(ask)
        if status != 200 or not isinstance(body, dict):
            return
        instance = str(body.get("instance") or "")
        if instance != cur.instance and instance in self._request_seeds:
            cur.instance, cur.after = instance, self._request_seeds.pop(instance)
        items = cur.take(body)
        if items:
            self.history.add(request_row(r, self.config.node, instance, self._meta) for r in items)

    async def _history_route(self, method: str, query: dict[str, str]) -> Response:
        """`ambit flows --since`: the node's recorded flows (`aggregate=1`: replayable facts
        with counts, for `ambit policy simulate` and `suggest`)."""
        h = self.history
        if h is None:
            return Response.json({"error": f"the agent of {self.config.node} keeps no flow history "
                                  "(run it with --flow-history PATH)"}, 404)
        try:
            flt = Filter.from_query(query)
            limit = int(query.get("limit", "1000"))
        except (HistoryError, ValueError) as e:
            return Response.json({"error": str(e)}, 400)
        out: dict[str, Any] = {"node": self.config.node}
        if query.get("aggregate"):
            out["items"] = await asyncio.to_thread(h.aggregate, flt)
        else:
            out["items"], out["truncated"] = await asyncio.to_thread(h.query, flt, max(1, limit))
        out["history"] = await asyncio.to_thread(h.summary)
        out["lost"] = {"ztunnel": self._ztunnel_cursor.lost,
                       "waypoints": sum(c.lost for c in self._request_cursors.values())}
        return Response.json(out)

    async def _denials_route(self, method: str, query: dict[str, str]) -> Response:
        """`ambit flows --denied --by-source`: denials per source in the recent window and before."""
        h = self.history
        if h is None:
            return Response.json({"error": f"the agent of {self.config.node} keeps no flow history "
                                  "(run it with --flow-history PATH)"}, 404)
        try:
            window, since = float(query.get("window", "300")), float(query.get("since", "86400"))
        except ValueError:
            return Response.json({"error": "use ?window=SECONDS&since=SECONDS"}, 400)
        now = time.time()
        counts = await asyncio.to_thread(h.denials, now - since, now - window)
        oldest = await asyncio.to_thread(h.oldest)
        baseline = max(0.0, (now - window) - max(now - since, oldest if oldest is not None else now))
        return Response.json({"node": self.config.node, "now": now, "window_seconds": window,
                              "baseline_seconds": baseline, "items": [c.__dict__ for c in counts]})

    def objects_view(self) -> dict[str, Any]:
        """The compiled snapshot in force and the cluster objects it was compiled from: what
        `ambit policy simulate` applies a proposal to."""
        snap, state = self.snapshot, self._snapshot_of
        if snap is None or state is None:
            raise AgentError("no cluster state compiled yet")
        return {"node": self.config.node,
                "snapshot": [[k, ns, n, v] for (k, ns, n), v in encode_snapshot(snap).items()],
                "objects": list(state.objects.values())}

    def joined_flows(self) -> list[dict[str, Any]]:
        # Every pod of the cluster, not only this node's: peers of dropped flows live elsewhere.
        pods = self._state.pods.values() if self._state is not None else self._pods.values()
        pod_by_ip = {p.ip: p.key for p in pods if p.ip}
        return join_flows(self.flows.snapshot(), self.ztunnel_conns, time.monotonic_ns(), pod_by_ip, time.time())

    def status_view(self) -> dict[str, Any]:
        """`ambit status`: for each enrolled pod, is its traffic really going to the ztunnel?"""
        kernel: dict[int, dict[str, Any]] = {}
        counts: dict[int, DropCounts] = {}
        with contextlib.suppress(AgentError):
            kernel = self.datapath.pods()
            counts = self.datapath.drop_counts()
        ready, reason = self.ztunnel_ready
        via_ztunnel: dict[str, int] = {}
        for rec in self.ztunnel_conns:
            if rec.get("direction") == "outbound" and rec.get("src_workload"):
                via_ztunnel[rec["src_workload"]] = via_ztunnel.get(rec["src_workload"], 0) + 1
        pods = []
        for key, a in sorted(self.actual.items()):
            if not a.enrolled:
                continue
            attached: dict[str, bool] = {}
            uncovered: list[Path] = []
            kernel_ports: dict[int, KernelMode] = {}
            with contextlib.suppress(AgentError):
                attached = self.datapath.pod_attached(a.cgroup)
                uncovered = self.datapath.uncovered_subcgroups(a.cgroup)
                kernel_ports = self.datapath.port_modes(a.ip) if a.ip else {}
            k = kernel.get(a.cgroup_ids[0]) if a.cgroup_ids else None
            in_sync = (k is not None and k["enrolled"] and k["mode"] == a.mode
                       and kernel_ports == dict(a.port_modes))
            all_attached = bool(attached) and all(attached.values()) and not uncovered
            c = counts.get(a.cgroup_ids[0]) if a.cgroup_ids else None
            redirected = all_attached and in_sync and self.ztunnel_serving
            identity = self._identity(key)
            problem = None
            if not all_attached:
                missing = [n for n, ok in attached.items() if not ok] or ([] if attached else ["all programs"])
                missing += [f"sub-cgroup {p}" for p in uncovered]
                problem = f"not attached: {', '.join(missing)}"
            elif not in_sync:
                problem = "the kernel's pod map differs from the cluster state (the agent will rewrite it)"
            elif not self.ztunnel_serving:
                problem = f"ztunnel not serving: {reason}"
            elif identity in self.ztunnel_waiting:
                problem = (f"redirected; the ztunnel is waiting for a certificate for {identity} (is the CA "
                           "reachable?): its mesh connections fail until one is issued, none go out in plaintext")
            elif key in self.retries:
                problem = self.retries[key]
            pods.append({
                "pod": key, "ip": a.ip, "mode": a.mode, "port_modes": {str(p): m for p, m in a.port_modes},
                "attached": all_attached, "programs": attached, "subcgroups_uncovered": [str(p) for p in uncovered],
                "maps_in_sync": in_sync, "redirected": redirected,
                "bypass_drops": (c.egress + c.ingress + c.inbound_strict) if c else 0,
                "connections_via_ztunnel": via_ztunnel.get(key, 0), "problem": problem,
            })
        pending = [{"pod": k, "problem": v} for k, v in sorted(self.retries.items()) if k not in self.actual]
        return {
            "node": self.config.node,
            "pods": pods,
            "pending": pending,
            "ztunnel": {"ready": ready, "reason": reason},
            "healthy": ready and all(p["redirected"] for p in pods) and not pending,
        }

    def _identity(self, key: str) -> str:
        pod = self._pods.get(key)
        if pod is None:
            return ""
        return f"spiffe://{self.config.trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}"

    def admin_routes(self) -> Routes:
        def view(fn: Any) -> Any:
            return lambda method, query: Response.json(fn())

        return {
            "/healthz": (("GET",), view(lambda: {"ok": True, "pods": len(self.actual), "retries": self.retries})),
            "/pods": (("GET",), view(lambda: [self._pod_view(k) for k in sorted(set(self.actual) | set(self.retries))])),
            "/status": (("GET",), view(self.status_view)),
            "/flows": (("GET",), view(lambda: {"items": self.joined_flows()})),
            "/flows/kernel": (("GET",), view(lambda: {"items": self.flows.snapshot()})),
            "/bypass": (("GET",), view(self._bypass_view)),
            "/flows/history": (("GET",), self._history_route),
            "/flows/denials": (("GET",), self._denials_route),
            "/objects": (("GET",), view(self.objects_view)),
            "/metrics": (("GET",), lambda method, query: Response(
                200, AgentMetrics(self.metrics_view).render(), METRICS_CONTENT_TYPE)),
        }

    def metrics_view(self) -> NodeView:
        """What /metrics reports: the kernel's bypass drops per pod, and the node's redirection."""
        rows = [(b["pod"], b["egress"], b["ingress"], b["inbound_strict"]) for b in self._bypass_view()]
        return NodeView(node=self.config.node, drops=pod_drops(rows),
                        redirected=sum(1 for a in self.actual.values() if a.attached),
                        retrying=len(self.retries), ztunnel_ready=self.ztunnel_ready[0])

    def _bypass_view(self) -> list[dict[str, Any]]:
        counts = self.datapath.drop_counts()
        out = []
        for key, a in sorted(self.actual.items()):
            c = counts.get(a.cgroup_ids[0]) if a.cgroup_ids else None
            out.append({"pod": key, "egress": c.egress if c else 0, "ingress": c.ingress if c else 0,
                        "inbound_strict": c.inbound_strict if c else 0})
        return out

    def _pod_view(self, key: str) -> dict[str, Any]:
        a = self.actual.get(key)
        view: dict[str, Any] = {"pod": key, "retry": self.retries.get(key)}
        if a is not None:
            attached: dict[str, bool] = {}
            with contextlib.suppress(AgentError):
                attached = self.datapath.pod_attached(a.cgroup)
            view.update(cgroup=str(a.cgroup), ip=a.ip, enrolled=a.enrolled, mode=a.mode,
                        attached=a.attached and bool(attached) and all(attached.values()), programs=attached)
        return view

    async def close(self) -> None:
        """Stop tasks and release handles; programs stay attached and maps pinned (fail closed)."""
        self._stop = True
        await self._tasks.close()
        if self.feed is not None:
            await self.feed.stop()
        self.source.close()
        self.datapath.close()
        if self.history is not None:
            await asyncio.to_thread(self.history.close)
