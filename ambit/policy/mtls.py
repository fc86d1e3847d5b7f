"""The effective PeerAuthentication mode of a workload's port: workload selector, then
namespace, then mesh (root namespace), then PERMISSIVE; UNSET inherits. Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ambit.policy.facts import EffectiveMtlsMode
from ambit.policy.index import PolicySet, _selects
from ambit.policy.match import MtlsMode

if TYPE_CHECKING:
    from ambit.snapshot import Workload


def mtls_policy(dst: Workload, port: int, policies: PolicySet) -> tuple[EffectiveMtlsMode, str | None]:
    """Like `mtls_mode`, also naming the PeerAuthentication (`ns/name`) that decided (None: the default)."""
    root = policies.root_namespace
    mesh = ns_level = workload = None
    # Istio takes the oldest policy at each level; objects here carry no creation
    # time, so the first by name wins, which is at least deterministic.
    for p in policies.peer_authn:
        if p.match_labels is None:
            if p.namespace == root and mesh is None:
                mesh = p
            elif p.namespace == dst.namespace and p.namespace != root and ns_level is None:
                ns_level = p
        elif (
            # Selector policies in the root namespace are ignored, as in Istio.
            p.namespace == dst.namespace
            and p.namespace != root
            and workload is None
            and _selects(p.match_labels, dst.labels)
        ):
            workload = p
    mode: EffectiveMtlsMode = "PERMISSIVE"
    by: str | None = None
    for level in (mesh, ns_level, workload):
        if level is not None and level.mode != "UNSET":
            mode, by = level.mode, level.ref
    if workload is not None:
        pm: MtlsMode = workload.port_modes.get(port, "UNSET")
        if pm != "UNSET":
            mode, by = pm, workload.ref
    return mode, by


def mtls_port_modes(
    dst: Workload, policies: PolicySet
) -> tuple[EffectiveMtlsMode, dict[int, EffectiveMtlsMode]]:
    """`dst`'s workload-wide mode and the ports whose mode differs from it (portLevelMtls),
    as `mtls_mode` decides each: what the kernel needs to drop or capture plaintext per port."""
    default = mtls_mode(dst, 0, policies)
    ports: set[int] = set()
    for p in policies.peer_authn:
        if p.port_modes and p.namespace == dst.namespace and _selects(p.match_labels, dst.labels):
            ports.update(p.port_modes)
    out = {}
    for port in sorted(ports):
        m = mtls_mode(dst, port, policies)
        if m != default:
            out[port] = m
    return default, out


def mtls_mode(dst: Workload, port: int, policies: PolicySet) -> EffectiveMtlsMode:
    """Effective PeerAuthentication mode on `dst`'s (workload) `port`: "STRICT", "PERMISSIVE" or
    "DISABLE". Workload selector > namespace > mesh (root namespace) > PERMISSIVE; UNSET inherits.
    The ztunnel treats DISABLE like PERMISSIVE (Istio ambient cannot disable mTLS)."""
    return mtls_policy(dst, port, policies)[0]
