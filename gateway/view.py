"""Everything one gateway serves, compiled from the cluster state: `GatewayView`. Pure.

From a `ClusterState` and the previous view: the Gateway (listeners, certificates,
annotations), the HTTPRoutes attached to it per listener, the RateLimitPolicies, and
the gateway's own identity (its pods' service account). An HTTPRoute or
RateLimitPolicy that does not compile keeps its last good version in force (named in
`errors`), as the agent does with policies; a Gateway whose annotations do not compile
keeps its last good version too.

The gateway's policies are Istio's, scoped by the policy engine as for a waypoint: the
gateway is a `Workload` (`subject`) of its namespace with its pods' labels,
`waypoint` set to the Gateway's name and `gateway_class` to its class, so an
AuthorizationPolicy or RequestAuthentication applies to it when it is mesh-wide, of its
namespace, selects its pods' labels, has `targetRefs` to the Gateway, or (from the root
namespace) to its GatewayClass `ambit-ingress`, as Istio applies them to an ingress
gateway. A GatewayClass target of the waypoint classes never selects it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ambit.cluster import GATEWAY_NAME_LABEL, ClusterState
from ambit.snapshot import Workload
from ambit.spiffe import SpiffeError, SpiffeId
from gateway.listeners import CompiledGateway, compile_gateway
from gateway.ratelimit import CompiledRateLimit, compile_rate_limit
from gateway.routes import CompiledRoute, compile_route
from gateway.spec import SpecError


@dataclass(frozen=True)
class GatewayView:
    namespace: str
    name: str
    gateway: CompiledGateway | None  # None: no Gateway of class ambit-ingress by that name
    routes: Mapping[str, tuple[CompiledRoute, ...]] = field(default_factory=dict)  # by listener name
    rate_limits: tuple[CompiledRateLimit, ...] = ()
    identity: SpiffeId | None = None
    subject: Workload | None = None  # the gateway as policies see it
    errors: tuple[str, ...] = ()
    compiled: Mapping[str, CompiledRoute | CompiledRateLimit] = field(default_factory=dict)  # last good, by key
    version: int = 0

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


def build_view(cluster: ClusterState, namespace: str, name: str, *, trust_domain: str = "cluster.local",
               previous: GatewayView | None = None) -> GatewayView:
    """The view of Gateway `namespace/name` in `cluster` (see the module docstring)."""
    errors: list[str] = []
    prev = previous.compiled if previous is not None else {}
    compiled: dict[str, CompiledRoute | CompiledRateLimit] = {}
    for obj in sorted(cluster.routes, key=lambda o: o.key):
        try:
            compiled[obj.key] = compile_route(obj) if obj.kind == "HTTPRoute" else compile_rate_limit(obj)
        except SpecError as e:
            last = prev.get(obj.key)
            if last is not None:
                compiled[obj.key] = last
                errors.append(f"{e} (keeping the last good version in force)")
            else:
                errors.append(f"{e} (not applied: no earlier valid version)")
    version = (previous.version if previous is not None else 0) + 1
    gw = cluster.gateways.get((namespace, name))
    if gw is None or not gw.is_ingress:
        what = "no Gateway" if gw is None else f"Gateway class {gw.class_name!r}, not ambit-ingress,"
        errors.append(f"{what} {namespace}/{name}: the gateway serves nothing")
        return GatewayView(namespace, name, None, errors=tuple(errors), compiled=MappingProxyType(compiled),
                           version=version)
    try:
        cgw: CompiledGateway | None = compile_gateway(gw, cluster.secrets)
    except SpecError as e:
        cgw = previous.gateway if previous is not None else None
        errors.append(f"{e} ({'keeping the last good version' if cgw else 'not applied'})")
    if cgw is None:
        return GatewayView(namespace, name, None, errors=tuple(errors), compiled=MappingProxyType(compiled),
                           version=version)
    errors.extend(cgw.errors)
    routes = [c for c in compiled.values() if isinstance(c, CompiledRoute)]
    by_listener: dict[str, tuple[CompiledRoute, ...]] = {}
    for lst in gw.listeners:
        by_listener[lst.name] = tuple(r for r in routes if r.attaches_to(gw, lst))
    limits = tuple(c for c in compiled.values() if isinstance(c, CompiledRateLimit)
                   and any(k == "HTTPRoute" or (c.namespace, n) == (namespace, name) for k, n in c.targets))
    # the gateway's identity is the service account named after its Gateway, as a waypoint's
    # (ambit.snapshot); a pod of its label running as another account is not the gateway
    pods = cluster.serving_pods(gw)
    for p in cluster.gateway_pods(gw):
        if p.service_account != name:
            errors.append(f"Gateway {gw.key}: pod {p.key} carries its label but runs as service account "
                          f"{p.service_account!r}, not {name!r}: it does not serve the gateway")
    identity = subject = None
    if pods:
        try:
            identity = SpiffeId.for_workload(trust_domain, namespace, name)
        except SpiffeError as e:
            errors.append(f"Gateway {gw.key}: no valid SPIFFE ID for its service account ({e})")
    if identity is not None:
        pod = pods[0]
        labels = {**pod.meta.labels, GATEWAY_NAME_LABEL: name}
        subject = Workload(uid=f"{namespace}/{name}", name=name, namespace=namespace,
                           service_account=identity.service_account, ip=pod.ip or "", node=pod.node_name,
                           node_address=None, labels=MappingProxyType(labels), identity=identity, waypoint=name,
                           enrolled=False, gateway_class=gw.class_name)
    return GatewayView(namespace, name, cgw, MappingProxyType(by_listener), limits, identity, subject,
                       tuple(errors), MappingProxyType(compiled), version)
