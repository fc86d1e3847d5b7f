"""The set of policies in force, indexed for per-connection lookups (`PolicySet`).

Pure. Which policies apply to a workload (mesh, namespace, selector, targetRefs),
and one summary row per policy for `ambit policies` and the admin endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ambit.cluster import PolicyObject
from ambit.policy.compile import compile_policy
from ambit.policy.match import (
    DEFAULT_ROOT_NAMESPACE,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
)

if TYPE_CHECKING:
    from ambit.snapshot import Workload

# ---------------------------------------------------------------------------
# the set of policies in force


def _selects(labels: Mapping[str, str] | None, wl_labels: Mapping[str, str]) -> bool:
    return labels is not None and all(wl_labels.get(k) == v for k, v in labels.items())


@dataclass(frozen=True)
class PolicySet:
    """Every compiled policy in force, indexed for per-connection lookups."""

    authz: tuple[CompiledAuthz, ...] = ()
    peer_authn: tuple[CompiledPeerAuthn, ...] = ()
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    @classmethod
    def build(
        cls, objs: Iterable[PolicyObject | CompiledPolicy], root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> PolicySet:
        """Compile raw objects (already compiled ones pass through); raises PolicyError on the first bad one."""
        authz: list[CompiledAuthz] = []
        pa: list[CompiledPeerAuthn] = []
        for o in objs:
            c = o if isinstance(o, CompiledAuthz | CompiledPeerAuthn) else compile_policy(o)
            if isinstance(c, CompiledAuthz):
                authz.append(c)
            else:
                pa.append(c)
        # Sorted by (namespace, name): evaluation and explanations never depend on input order.
        authz.sort(key=lambda p: (p.namespace, p.name))
        pa.sort(key=lambda p: (p.namespace, p.name))
        return cls(tuple(authz), tuple(pa), root_namespace)

    @cached_property
    def _authz_by_ns(self) -> Mapping[str, tuple[CompiledAuthz, ...]]:
        out: dict[str, list[CompiledAuthz]] = {}
        for p in self.authz:
            out.setdefault(p.namespace, []).append(p)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def by_key(self) -> Mapping[str, CompiledPolicy]:
        """Compiled policies by `PolicyObject.key` (`Kind/ns/name`)."""
        out: dict[str, CompiledPolicy] = {p.key: p for p in self.authz}
        out.update({p.key: p for p in self.peer_authn})
        return out

    def applicable(self, dst: Workload, *, at_waypoint: bool = False) -> list[CompiledAuthz]:
        """AuthorizationPolicies that apply to `dst`: mesh-wide, its namespace's, selector-scoped
        (a selector in the root namespace selects across namespaces), and targetRefs to one of its
        Services (or, at its waypoint, to that waypoint). Order: mesh, namespace, then by name."""
        services: tuple[str, ...] = tuple(getattr(dst, "services", ()))
        key = (dst.namespace, frozenset(dst.labels.items()), services, dst.waypoint, at_waypoint)
        hit = self._applicable_cache.get(key)
        if hit is None:
            hit = tuple(self._applicable(dst, services, at_waypoint))
            # Bounded by the distinct (namespace, labels, services) shapes in the cluster.
            self._applicable_cache[key] = hit
        return list(hit)

    @cached_property
    def _applicable_cache(self) -> dict[object, tuple[CompiledAuthz, ...]]:
        return {}

    def _applicable(
        self, dst: Workload, services: tuple[str, ...], at_waypoint: bool
    ) -> list[CompiledAuthz]:
        root = self.root_namespace
        out: list[CompiledAuthz] = []
        candidates = self._authz_by_ns.get(root, ())
        if dst.namespace != root:
            candidates = candidates + self._authz_by_ns.get(dst.namespace, ())
        for p in candidates:
            if p.target_refs:
                if p.namespace != dst.namespace:
                    continue
                for ref in p.target_refs:
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

    def summary(self) -> list[dict[str, Any]]:
        """One row per policy, for `ambit policies` and the admin endpoint."""
        rows: list[dict[str, Any]] = []
        for p in self.authz:
            if p.target_refs:
                scope = "targetRefs: " + ", ".join(f"{r.kind}/{r.name}" for r in p.target_refs)
            else:
                scope = self._scope(p)
            rows.append(
                {
                    "kind": p.kind,
                    "namespace": p.namespace,
                    "name": p.name,
                    "action": p.action,
                    "scope": scope,
                    "rules": len(p.rules),
                    "http_rules": [r.index for r in p.rules if r.l7_fields],
                }
            )
        for q in self.peer_authn:
            rows.append(
                {
                    "kind": q.kind,
                    "namespace": q.namespace,
                    "name": q.name,
                    "mode": q.mode,
                    "scope": self._scope(q),
                    "port_modes": {str(k): v for k, v in sorted(q.port_modes.items())},
                }
            )
        return rows

    def _scope(self, p: CompiledPolicy) -> str:
        if p.match_labels is not None:
            return "selector: " + ",".join(f"{k}={v}" for k, v in sorted(p.match_labels.items()))
        return "mesh" if p.namespace == self.root_namespace else "namespace"

