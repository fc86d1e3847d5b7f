"""Where the gateway sends a request for a backend Service, and which backend of a rule. Pure.

The gateway enters the mesh as a source ztunnel would (ztunnel/outbound.py,
`plan_outbound`): over HBONE with its own identity, to the Service's waypoint when the
Service uses one for service traffic (the waypoint picks the endpoint and enforces the
backend's policies), else to an endpoint's node, or to that endpoint's waypoint when the
pod uses one for workload traffic. A waypoint that is missing or not running refuses the
request (fail closed, as the ztunnel does). Endpoints outside the mesh are not dialed: the
gateway only hands traffic to workloads that can check its identity.

Weighted backendRefs are picked with smooth weighted round robin (nginx's): exact
proportions over every sum of weights, spread evenly, and deterministic, so weights hold
within a few requests rather than on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ambit.snapshot import ServiceInfo, Snapshot
from ambit.spiffe import SpiffeId
from gateway.routes import BackendRef


@dataclass(frozen=True)
class Hop:
    """One HBONE stream to open: to `address`:`port` presenting `peer` (its identity), CONNECT
    `authority`."""

    via: Literal["waypoint", "node"]
    address: str
    port: int  # 0: the peer's HBONE port (15008, or the config's override for that node)
    peer: SpiffeId
    authority: str
    service: str  # ns/name
    workload: str | None  # ns/name of the endpoint (None: the waypoint picks)
    waypoint: str | None = None  # ns/name

    def describe(self) -> str:
        if self.via == "waypoint":
            return f"{self.service} through waypoint {self.waypoint} ({self.address})"
        return f"{self.service} endpoint {self.workload} on {self.address}"


class Unreachable(Exception):
    """No HBONE hop for a backend; the message says why (answered 503)."""


def service_named(snap: Snapshot, namespace: str, name: str) -> ServiceInfo | None:
    for svc in snap.services.values():
        if svc.namespace == namespace and svc.name == name:
            return svc
    return None


def plan_hop(snap: Snapshot, backend: BackendRef, pick: int) -> Hop:
    """The hop for a request to `backend` (`pick` chooses among endpoints or waypoint pods).
    Raises Unreachable."""
    svc = service_named(snap, backend.namespace, backend.name)
    if svc is None:
        raise Unreachable(f"backend Service {backend.uid} does not exist (or has no cluster IP)")
    if backend.port not in svc.ports:
        raise Unreachable(f"backend Service {backend.uid} has no port {backend.port}")
    authority = f"{svc.vip}:{backend.port}"
    wp = snap.waypoint(svc.namespace, svc.waypoint)
    if wp is not None and wp.takes("service"):
        if not wp.ready or wp.identity is None:
            why = "does not exist" if not wp.exists else "has no running pod"
            raise Unreachable(f"backend Service {backend.uid} uses waypoint {wp.uid}, which {why}: refused")
        return Hop("waypoint", wp.addresses[pick % len(wp.addresses)], 15008, wp.identity, authority,
                   svc.uid, None, wp.uid)
    eps = [(w, t) for w, t in snap.service_endpoints(svc.vip, backend.port) if w.ip]
    if not eps:
        raise Unreachable(f"backend Service {backend.uid} has no ready endpoints")
    w, target = eps[pick % len(eps)]
    if not w.enrolled:
        raise Unreachable(f"endpoint {w.uid} of {backend.uid} is not in the mesh: the gateway hands requests "
                          "only to enrolled workloads")
    authority = f"{w.ip}:{target}"
    wwp = snap.waypoint(w.namespace, w.waypoint)
    if wwp is not None and wwp.takes("workload"):
        if not wwp.ready or wwp.identity is None:
            raise Unreachable(f"endpoint {w.uid} uses waypoint {wwp.uid}, which is not running: refused")
        return Hop("waypoint", wwp.addresses[pick % len(wwp.addresses)], 15008, wwp.identity, authority,
                   svc.uid, w.uid, wwp.uid)
    addr = w.node_address or snap.nodes.get(w.node)
    if not addr:
        raise Unreachable(f"endpoint {w.uid} runs on node {w.node}, whose address is unknown")
    return Hop("node", addr, 0, w.identity, authority, svc.uid, w.uid)


class WeightedPicker:
    """Smooth weighted round robin over a rule's backendRefs (weight 0: never)."""

    def __init__(self, backends: tuple[BackendRef, ...]) -> None:
        self.backends = backends
        self._current = [0] * len(backends)
        self._total = sum(b.weight for b in backends)

    def pick(self) -> BackendRef:
        if self._total <= 0:
            raise Unreachable("every backendRef has weight 0")
        best = 0
        for i, b in enumerate(self.backends):
            self._current[i] += b.weight
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= self._total
        return self.backends[best]
