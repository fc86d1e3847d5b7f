"""The set of policies in force, indexed for per-connection lookups (`PolicySet`).

Pure. Which policies apply to a workload (mesh, namespace, selector, targetRefs:
AuthorizationPolicies and RequestAuthentications alike; dry-run AuthorizationPolicies
apart, since they are evaluated but never enforced), and one summary row per policy,
with what ambit enforces of it and where (`ambit.policy.status`), for `ambit policies`
and the admin endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from ambit.cluster import PolicyObject, selects
from ambit.policy.compile import compile_policy
from ambit.policy.match import (
    DEFAULT_ROOT_NAMESPACE,
    WAYPOINT_CLASSES,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRequestAuthn,
    JwtRule,
)
from ambit.policy.status import PolicyStatus, policy_status

if TYPE_CHECKING:
    from ambit.snapshot import Workload

# ---------------------------------------------------------------------------
# the set of policies in force


def _selects(labels: Mapping[str, str] | None, wl_labels: Mapping[str, str]) -> bool:
    return labels is not None and selects(labels, wl_labels)


_Scoped = TypeVar("_Scoped", CompiledAuthz, CompiledRequestAuthn)


def _of_class(dst: Workload, class_name: str, at_waypoint: bool) -> bool:
    """Whether a GatewayClass targetRef selects `dst` where it is judged: a Gateway's own
    proxy (the ingress gateway) by its own class only; a workload at its waypoint by the
    waypoint classes. A policy written for waypoints never reaches the ingress gateway."""
    if dst.gateway_class is not None:
        return class_name == dst.gateway_class
    return at_waypoint and class_name in WAYPOINT_CLASSES


def _by_ns(policies: Iterable[_Scoped]) -> Mapping[str, tuple[_Scoped, ...]]:
    out: dict[str, list[_Scoped]] = {}
    for p in policies:
        out.setdefault(p.namespace, []).append(p)
    return {k: tuple(v) for k, v in out.items()}


def _applicable_to(
    by_ns: Mapping[str, tuple[_Scoped, ...]], root: str, dst: Workload, services: tuple[str, ...],
    at_waypoint: bool,
) -> list[_Scoped]:
    """Istio's scoping, shared by AuthorizationPolicy and RequestAuthentication: mesh-wide (root
    namespace, no selector), the workload's namespace, selector-scoped (a selector in the root
    namespace selects across namespaces), and targetRefs to one of its Services (or, at its
    waypoint, to that waypoint, or from the root namespace to the waypoints' GatewayClass; a
    ServiceEntry target selects no workload). Order: mesh, namespace, then by name."""
    out: list[_Scoped] = []
    candidates = by_ns.get(root, ())
    if dst.namespace != root:
        candidates = candidates + by_ns.get(dst.namespace, ())
    for p in candidates:
        if p.target_refs:
            for ref in p.target_refs:
                if ref.kind == "GatewayClass":
                    if p.namespace == root and _of_class(dst, ref.name, at_waypoint):
                        out.append(p)
                        break
                    continue
                if p.namespace != dst.namespace:
                    continue
                if ref.kind == "Service" and f"{ref.namespace}/{ref.name}" in services:
                    out.append(p)
                    break
                if ref.kind == "Gateway" and at_waypoint and dst.waypoint == ref.name:
                    out.append(p)
                    break
        elif p.match_labels is None:
            if p.namespace in (root, dst.namespace):
                out.append(p)
        elif _selects(p.match_labels, dst.labels):
            out.append(p)
    return out


@dataclass(frozen=True)
class PolicySet:
    """Every compiled policy in force, indexed for per-connection lookups."""

    authz: tuple[CompiledAuthz, ...] = ()
    peer_authn: tuple[CompiledPeerAuthn, ...] = ()
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    request_authn: tuple[CompiledRequestAuthn, ...] = ()

    @classmethod
    def build(
        cls, objs: Iterable[PolicyObject | CompiledPolicy], root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> PolicySet:
        """Compile raw objects (already compiled ones pass through); raises PolicyError on the first bad one."""
        authz: list[CompiledAuthz] = []
        pa: list[CompiledPeerAuthn] = []
        ra: list[CompiledRequestAuthn] = []
        for o in objs:
            c = o if isinstance(o, CompiledAuthz | CompiledPeerAuthn | CompiledRequestAuthn) else compile_policy(o)
            if isinstance(c, CompiledAuthz):
                authz.append(c)
            elif isinstance(c, CompiledRequestAuthn):
                ra.append(c)
            else:
                pa.append(c)
        # Sorted by (namespace, name): evaluation and explanations never depend on input order.
        authz.sort(key=lambda p: (p.namespace, p.name))
        pa.sort(key=lambda p: (p.namespace, p.name))
        ra.sort(key=lambda p: (p.namespace, p.name))
        return cls(tuple(authz), tuple(pa), root_namespace, tuple(ra))

    @property
    def compiled(self) -> tuple[CompiledPolicy, ...]:
        """Every compiled policy, of every kind (what the agent keeps on disk and feeds)."""
        return (*self.authz, *self.peer_authn, *self.request_authn)

    @cached_property
    def _authz_by_ns(self) -> Mapping[str, tuple[CompiledAuthz, ...]]:
        return _by_ns(self.authz)

    @cached_property
    def _request_authn_by_ns(self) -> Mapping[str, tuple[CompiledRequestAuthn, ...]]:
        return _by_ns(self.request_authn)

    @cached_property
    def by_key(self) -> Mapping[str, CompiledPolicy]:
        """Compiled policies by `PolicyObject.key` (`Kind/ns/name`)."""
        return {p.key: p for p in self.compiled}

    def applicable(self, dst: Workload, *, at_waypoint: bool = False) -> list[CompiledAuthz]:
        """AuthorizationPolicies enforced on `dst`: mesh-wide, its namespace's, selector-scoped
        (a selector in the root namespace selects across namespaces), and targetRefs to one of its
        Services (or, at its waypoint, to that waypoint). Order: mesh, namespace, then by name.
        Dry-run policies are left out (`applicable_dry_run`)."""
        return list(self._scoped(dst, at_waypoint)[1])

    def applicable_dry_run(self, dst: Workload, *, at_waypoint: bool = False) -> list[CompiledAuthz]:
        """The dry-run AuthorizationPolicies (`istio.io/dry-run: "true"`) scoped to `dst`."""
        return list(self._scoped(dst, at_waypoint)[2])

    def applicable_all(self, dst: Workload, *, at_waypoint: bool = False) -> list[CompiledAuthz]:
        """Both, in evaluation order: what a dry-run evaluation slots its policy into."""
        return list(self._scoped(dst, at_waypoint)[0])

    def _scoped(self, dst: Workload, at_waypoint: bool) -> tuple[
        tuple[CompiledAuthz, ...], tuple[CompiledAuthz, ...], tuple[CompiledAuthz, ...]
    ]:
        """(all, enforced, dry-run) AuthorizationPolicies scoped to `dst`."""
        services: tuple[str, ...] = tuple(getattr(dst, "services", ()))
        key = (dst.namespace, frozenset(dst.labels.items()), services, dst.waypoint, dst.gateway_class, at_waypoint)
        hit = self._applicable_cache.get(key)
        if hit is None:
            every = tuple(self._applicable(dst, services, at_waypoint))
            hit = (every, tuple(p for p in every if not p.dry_run), tuple(p for p in every if p.dry_run))
            # Bounded by the distinct (namespace, labels, services) shapes in the cluster.
            self._applicable_cache[key] = hit
        return hit

    @cached_property
    def _applicable_cache(self) -> dict[object, tuple[
        tuple[CompiledAuthz, ...], tuple[CompiledAuthz, ...], tuple[CompiledAuthz, ...]
    ]]:
        return {}

    def _applicable(
        self, dst: Workload, services: tuple[str, ...], at_waypoint: bool
    ) -> list[CompiledAuthz]:
        return _applicable_to(self._authz_by_ns, self.root_namespace, dst, services, at_waypoint)

    def applicable_request_authn(self, dst: Workload, *, at_waypoint: bool = True) -> list[CompiledRequestAuthn]:
        """RequestAuthentications that apply to `dst`, scoped as AuthorizationPolicies are
        (`applicable`); at its waypoint by default, the only place JWTs are checked."""
        if not self.request_authn:
            return []
        services: tuple[str, ...] = tuple(getattr(dst, "services", ()))
        return _applicable_to(self._request_authn_by_ns, self.root_namespace, dst, services, at_waypoint)

    def jwt_rules(self, dst: Workload, *, at_waypoint: bool = True) -> tuple[JwtRule, ...]:
        """Every JWT rule in force for `dst` (from all its RequestAuthentications, merged as
        Istio merges them), sorted by issuer: what `ambit.policy.jwt.authenticate` takes."""
        services: tuple[str, ...] = tuple(getattr(dst, "services", ()))
        key = (dst.namespace, frozenset(dst.labels.items()), services, dst.waypoint, dst.gateway_class, at_waypoint)
        hit = self._jwt_rules_cache.get(key)
        if hit is None:
            rules = [r for p in self.applicable_request_authn(dst, at_waypoint=at_waypoint) for r in p.rules]
            hit = tuple(sorted(rules, key=lambda r: (r.issuer, r.policy, r.index)))
            self._jwt_rules_cache[key] = hit  # bounded like `_applicable_cache`
        return hit

    @cached_property
    def _jwt_rules_cache(self) -> dict[object, tuple[JwtRule, ...]]:
        return {}

    @cached_property
    def statuses(self) -> Mapping[str, PolicyStatus]:
        """What ambit enforces of each policy, and where, by `PolicyObject.key`."""
        return {p.key: policy_status(p, self.root_namespace) for p in self.compiled}

    def summary(self) -> list[dict[str, Any]]:
        """One row per policy, for `ambit policies` and the admin endpoint; `status` says what
        ambit enforces of it (`enforced`, `waypoint`, `stricter`, `partial`, `no-effect`) and
        `enforcement` how, per field."""
        rows: list[dict[str, Any]] = []
        for p in self.authz:
            if p.target_refs:
                scope = "targetRefs: " + ", ".join(f"{r.kind}/{r.name}" for r in p.target_refs)
            else:
                scope = self._scope(p)
            row: dict[str, Any] = {
                "kind": p.kind,
                "namespace": p.namespace,
                "name": p.name,
                "action": p.action,
                "scope": scope,
                "rules": len(p.rules),
                "http_rules": [r.index for r in p.rules if r.l7_fields],
            }
            if p.provider:
                row["provider"] = p.provider
            if p.dry_run:
                row["dry_run"] = True
            rows.append(self._with_status(row, p))
        for q in self.peer_authn:
            rows.append(self._with_status(
                {
                    "kind": q.kind,
                    "namespace": q.namespace,
                    "name": q.name,
                    "mode": q.mode,
                    "scope": self._scope(q),
                    "port_modes": {str(k): v for k, v in sorted(q.port_modes.items())},
                }, q))
        for ra in self.request_authn:
            if ra.target_refs:
                scope = "targetRefs: " + ", ".join(f"{r.kind}/{r.name}" for r in ra.target_refs)
            else:
                scope = self._scope(ra)
            rows.append(self._with_status(
                {
                    "kind": ra.kind,
                    "namespace": ra.namespace,
                    "name": ra.name,
                    "scope": scope,
                    "rules": len(ra.rules),
                    "issuers": [r.issuer for r in ra.rules],
                }, ra))
        return rows

    def _with_status(self, row: dict[str, Any], p: CompiledPolicy) -> dict[str, Any]:
        st = self.statuses[p.key]
        row["status"] = st.status
        row["status_summary"] = st.summary
        row["enforcement"] = [f.to_dict() for f in st.fields]
        return row

    def _scope(self, p: CompiledPolicy) -> str:
        if p.match_labels is not None:
            return "selector: " + ",".join(f"{k}={v}" for k, v in sorted(p.match_labels.items()))
        return "mesh" if p.namespace == self.root_namespace else "namespace"

