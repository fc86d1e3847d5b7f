"""A node's compiled view of the cluster: the immutable `Snapshot`.

Pure. `build_snapshot` turns a `ClusterState` into what the data path looks up
per connection (workloads by IP, services by VIP, node addresses, compiled
policies). An invalid policy object is reported in `Snapshot.errors` with object
and field, and its last good compiled version (from the previous snapshot) stays
in force. The agent builds it once per change and programs the kernel from it;
its ztunnel receives the same snapshot over the feed and never compiles again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from ambit.cluster import ClusterState
from ambit.policy import (
    DEFAULT_ROOT_NAMESPACE,
    CompiledPolicy,
    PolicyError,
    PolicySet,
    compile_policy,
)
from ambit.spiffe import SpiffeError, SpiffeId

_GONE_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Workload:
    """A pod with an IP, as the data path sees it."""

    uid: str  # "ns/name"
    name: str
    namespace: str
    service_account: str
    ip: str
    node: str
    node_address: str | None
    # Mappings are left out of the hash so Workloads (and facts holding them) stay hashable.
    labels: Mapping[str, str] = field(hash=False)
    identity: SpiffeId
    waypoint: str | None  # the Gateway of its namespace whose waypoint it uses (then only it may call)
    enrolled: bool
    # "ns/name" of the Services selecting this pod (for targetRefs policies).
    services: tuple[str, ...] = ()
    # Set only for a Gateway's own proxy as policies see it (the ingress gateway's subject):
    # that Gateway's class. A GatewayClass targetRef then selects it by this class alone,
    # never by the waypoint classes.
    gateway_class: str | None = None


@dataclass(frozen=True)
class ServiceInfo:
    namespace: str
    name: str
    vip: str
    ports: Mapping[int, int] = field(hash=False)  # service port -> target port
    endpoints: tuple[str, ...]  # workload uids, sorted
    waypoint: str | None = None  # the waypoint (a Gateway of its namespace) the Service uses

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WaypointInfo:
    """A waypoint: a Gateway of class ambit-waypoint and the pods that serve it."""

    namespace: str
    name: str
    waypoint_for: str  # service | workload | all
    identity: SpiffeId | None  # of its pods' service account (None: no pod yet)
    addresses: tuple[str, ...]  # IPs of its running pods; empty: not ready (traffic is refused)
    exists: bool = True  # False: named by a use-waypoint label, but no such Gateway

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ready(self) -> bool:
        return self.exists and bool(self.addresses) and self.identity is not None

    def takes(self, kind: str) -> bool:
        """Does it take traffic addressed to a `service` (VIP) or a `workload` (pod IP)?"""
        return self.waypoint_for in (kind, "all")


@dataclass(frozen=True)
class Snapshot:
    """One consistent view for the data path; never mutated, replaced whole."""

    node: str
    trust_domain: str
    workloads: Mapping[str, Workload] = field(hash=False)  # by IP
    services: Mapping[str, ServiceInfo] = field(hash=False)  # by VIP
    nodes: Mapping[str, str] = field(hash=False)  # node name -> address
    policies: PolicySet
    errors: tuple[str, ...] = ()
    version: int = 0
    waypoints: Mapping[str, WaypointInfo] = field(hash=False, default_factory=dict)  # by "ns/name"

    @classmethod
    def empty(
        cls, node: str = "", trust_domain: str = "cluster.local", root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> Snapshot:
        return cls(node, trust_domain, {}, {}, {}, PolicySet(root_namespace=root_namespace))

    @cached_property
    def _by_uid(self) -> Mapping[str, Workload]:
        return {w.uid: w for w in self.workloads.values()}

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self.workloads.get(ip)

    def workload(self, uid: str) -> Workload | None:
        """By `ns/name`."""
        return self._by_uid.get(uid)

    def local_workloads(self) -> list[Workload]:
        """Workloads scheduled on this snapshot's node, by uid."""
        return sorted((w for w in self.workloads.values() if w.node == self.node), key=lambda w: w.uid)

    def waypoint(self, namespace: str, name: str | None) -> WaypointInfo | None:
        return self.waypoints.get(f"{namespace}/{name}") if name else None

    def service_by_vip(self, ip: str) -> ServiceInfo | None:
        return self.services.get(ip)

    def service_endpoints(self, vip: str, port: int) -> list[tuple[Workload, int]]:
        """Endpoints of the service at `vip` for service `port`, as (workload, target port).

        Empty when `vip` is no service, the service does not expose `port`, or it has no endpoints.
        """
        svc = self.services.get(vip)
        if svc is None or port not in svc.ports:
            return []
        target = svc.ports[port]
        out = []
        for uid in svc.endpoints:
            w = self._by_uid.get(uid)
            if w is not None:
                out.append((w, target))
        return out

    def resolve(self, ip: str, port: int, pick: int = 0) -> tuple[Workload, int] | None:
        """Where a connection to `ip:port` goes: a workload IP as is, a VIP to one of its
        endpoints (`pick` modulo their number, so callers can spread load), else None."""
        w = self.workloads.get(ip)
        if w is not None:
            return w, port
        eps = self.service_endpoints(ip, port)
        if not eps:
            return None
        return eps[pick % len(eps)]


def _workloads(
    cluster: ClusterState, trust_domain: str, errors: list[str]
) -> dict[str, Workload]:
    node_addr = {n.name: n.address for n in cluster.nodes.values()}
    services_of: dict[str, list[str]] = {}
    for svc in cluster.services.values():
        for p in cluster.service_endpoints(svc):
            services_of.setdefault(p.key, []).append(svc.key)
    out: dict[str, Workload] = {}
    for pod in sorted(cluster.pods.values(), key=lambda p: p.key):
        if not pod.ip or pod.phase in _GONE_PHASES:
            continue
        try:
            identity = SpiffeId.for_workload(trust_domain, pod.namespace, pod.service_account)
        except SpiffeError as e:
            errors.append(f"Pod {pod.key}: spec.serviceAccountName: no valid SPIFFE ID ({e}); pod left out")
            continue
        if pod.ip in out:
            other = out[pod.ip]
            errors.append(f"Pod {pod.key}: status.podIP {pod.ip} is also used by Pod {other.uid}; pod left out")
            continue
        waypoint = cluster.waypoint_for(pod)
        out[pod.ip] = Workload(
            uid=pod.key,
            name=pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            ip=pod.ip,
            node=pod.node_name,
            node_address=node_addr.get(pod.node_name),
            labels=MappingProxyType(dict(pod.meta.labels)),
            identity=identity,
            waypoint=waypoint or None,
            enrolled=cluster.is_enrolled(pod),
            services=tuple(sorted(services_of.get(pod.key, ()))),
        )
    return out


def _services(cluster: ClusterState, workloads: Mapping[str, Workload]) -> dict[str, ServiceInfo]:
    uids = {w.uid for w in workloads.values()}
    out: dict[str, ServiceInfo] = {}
    for svc in sorted(cluster.services.values(), key=lambda s: s.key):
        if not svc.cluster_ip:
            continue  # headless: clients reach pods by their own IPs
        eps = tuple(sorted(p.key for p in cluster.service_endpoints(svc) if p.key in uids))
        out[svc.cluster_ip] = ServiceInfo(
            namespace=svc.meta.namespace,
            name=svc.meta.name,
            vip=svc.cluster_ip,
            ports=MappingProxyType({p.port: p.target_port for p in svc.ports}),
            endpoints=eps,
            waypoint=cluster.service_waypoint(svc),
        )
    return out


def _waypoints(cluster: ClusterState, trust_domain: str, workloads: Mapping[str, Workload],
               services: Mapping[str, ServiceInfo], errors: list[str]) -> dict[str, WaypointInfo]:
    """Every waypoint Gateway, and every waypoint a label names that does not exist (so the
    data path can say why it refuses: fail closed, never around the waypoint)."""
    out: dict[str, WaypointInfo] = {}
    for gw in sorted(cluster.gateways.values(), key=lambda g: g.key):
        if not gw.is_waypoint:
            continue
        # The waypoint's identity is the service account named after its Gateway (Istio's
        # convention), never whatever a pod carrying the Gateway's label runs as: a pod
        # labelled by mistake or by malice gets neither the identity nor the traffic.
        pods = cluster.gateway_pods(gw)
        for p in pods:
            if p.service_account != gw.meta.name:
                errors.append(f"Gateway {gw.key}: pod {p.key} carries its label but runs as service account "
                              f"{p.service_account!r}, not {gw.meta.name!r}: it does not serve the waypoint")
        identity = None
        try:
            identity = SpiffeId.for_workload(trust_domain, gw.meta.namespace, gw.meta.name)
        except SpiffeError as e:
            errors.append(f"Gateway {gw.key}: no valid SPIFFE ID for its service account ({e})")
        addrs = tuple(sorted(p.ip for p in cluster.serving_pods(gw) if p.ip and p.phase == "Running"
                             and identity is not None))
        out[gw.key] = WaypointInfo(gw.meta.namespace, gw.meta.name, gw.waypoint_for, identity, addrs)
    named = {(w.namespace, w.waypoint) for w in workloads.values() if w.waypoint}
    named |= {(s.namespace, s.waypoint) for s in services.values() if s.waypoint}
    for ns, name in sorted(named):
        if f"{ns}/{name}" not in out:
            out[f"{ns}/{name}"] = WaypointInfo(ns, name, "all", None, (), exists=False)
    return out


def build_snapshot(
    cluster: ClusterState,
    node: str,
    *,
    trust_domain: str = "cluster.local",
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    previous: Snapshot | None = None,
) -> Snapshot:
    """The snapshot for `node`. Pure; never raises on bad policy objects (see `errors`)."""
    errors: list[str] = []
    workloads = _workloads(cluster, trust_domain, errors)
    services = _services(cluster, workloads)
    waypoints = _waypoints(cluster, trust_domain, workloads, services, errors)
    nodes = {n.name: n.address for n in cluster.nodes.values() if n.address}
    prev = previous.policies.by_key if previous is not None else {}
    compiled: list[CompiledPolicy] = []
    for obj in sorted(cluster.policies, key=lambda o: o.key):
        try:
            compiled.append(compile_policy(obj))
        except PolicyError as e:
            last_good = prev.get(obj.key)
            if last_good is not None:
                errors.append(f"{e} (keeping the last good version in force)")
                compiled.append(last_good)
            else:
                errors.append(f"{e} (not applied: no earlier valid version)")
    return Snapshot(
        node=node,
        trust_domain=trust_domain,
        workloads=MappingProxyType(workloads),
        services=MappingProxyType(services),
        nodes=MappingProxyType(nodes),
        policies=PolicySet.build(compiled, root_namespace=root_namespace),
        errors=tuple(errors),
        version=(previous.version + 1) if previous is not None else 1,
        waypoints=MappingProxyType(waypoints),
    )
