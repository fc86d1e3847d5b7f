"""The compiled node snapshot on the wire: what the agent feeds its ztunnel, and keeps on disk.

Pure. `encode_snapshot` turns a `Snapshot` into JSON-ready objects keyed like
cluster objects (kind, namespace, name), so the feed can send only what changed
(feed.proto's StateUpdate); `decode_snapshot` rebuilds the same `Snapshot`
without validating or compiling anything again: the agent compiled each policy
once, and the ztunnel, the kernel maps and the CLI all read that result.

Compiled values travel in a small tagged JSON form: a dataclass as
`{"$": "<class>", <field>: ...}` (only the classes listed here decode, so the
wire cannot name arbitrary types), a mapping as `{"$map": [[k, v], ...]}` (keys
may be ports), a network as `{"$net": "10.0.0.0/8"}`, a pattern as
`{"$re": "..."}`, a tuple as a list. Written by hand because no serialisation
library round-trips frozen dataclasses with these field types without a schema
per class; the allowlist keeps decoding as safe as JSON.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ambit import AmbitError
from ambit.policy import (
    DEFAULT_ROOT_NAMESPACE,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRequestAuthn,
    PolicySet,
)
from ambit.policy import match as m
from ambit.snapshot import ServiceInfo, Snapshot, WaypointInfo, Workload
from ambit.spiffe import SpiffeId

ObjectKey = tuple[str, str, str]
# the kinds of the snapshot's parts on the feed
META, WORKLOAD, SERVICE, NODE, POLICY, WAYPOINT = (
    "SnapshotMeta", "Workload", "Service", "Node", "CompiledPolicy", "Waypoint")

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Workload, ServiceInfo, WaypointInfo, SpiffeId, CompiledAuthz, CompiledPeerAuthn, m.CompiledRule, m.Entry,
        m.FieldMatch, m.TargetRef, m.StringMatch, m.HostMatch, m.PathMatch, m.NetMatch, m.PortMatch,
        m.ServiceAccountMatch, CompiledRequestAuthn, m.JwtRule, m.HeaderLocation, m.ClaimToHeader,
    )
}


class WireError(AmbitError):
    """A snapshot on the wire (or on disk) cannot be decoded; names the part and why."""


def encode_value(v: Any) -> Any:
    """A compiled value as tagged JSON (see the module docstring)."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        name = type(v).__name__
        if _TYPES.get(name) is not type(v):
            raise WireError(f"{name} is not a snapshot type")
        out: dict[str, Any] = {"$": name}
        for f in dataclasses.fields(v):
            if f.init:
                out[f.name] = encode_value(getattr(v, f.name))
        return out
    if isinstance(v, tuple | list):
        return [encode_value(x) for x in v]
    if isinstance(v, Mapping):
        return {"$map": [[encode_value(k), encode_value(x)] for k, x in v.items()]}
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return {"$net": str(v)}
    if isinstance(v, re.Pattern):
        return {"$re": v.pattern}
    raise WireError(f"cannot encode a {type(v).__name__} in a snapshot")


def decode_value(v: Any) -> Any:
    """The inverse of `encode_value`; WireError on anything it did not produce."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, list):
        return tuple(decode_value(x) for x in v)
    if not isinstance(v, dict):
        raise WireError(f"unexpected {type(v).__name__} in a snapshot")
    if "$" in v:
        cls = _TYPES.get(str(v["$"]))
        if cls is None:
            raise WireError(f"unknown snapshot type {v['$']!r}")
        kwargs = {k: decode_value(x) for k, x in v.items() if k != "$"}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError, AmbitError) as e:
            raise WireError(f"a {cls.__name__} does not decode: {e}") from e
    if "$map" in v:
        return MappingProxyType({decode_value(k): decode_value(x) for k, x in v["$map"]})
    if "$net" in v:
        return ipaddress.ip_network(v["$net"])
    if "$re" in v:
        return re.compile(v["$re"])
    raise WireError(f"untagged object in a snapshot: {sorted(v)}")


def encode_snapshot(snap: Snapshot) -> dict[ObjectKey, dict[str, Any]]:
    """The snapshot as objects keyed (kind, namespace, name); each one JSON-ready."""
    out: dict[ObjectKey, dict[str, Any]] = {
        (META, "", "meta"): {
            "node": snap.node, "trust_domain": snap.trust_domain, "version": snap.version,
            "root_namespace": snap.policies.root_namespace, "errors": list(snap.errors),
        },
    }
    for w in snap.workloads.values():
        out[(WORKLOAD, w.namespace, w.name)] = encode_value(w)
    for s in snap.services.values():
        out[(SERVICE, s.namespace, s.name)] = encode_value(s)
    for name, addr in snap.nodes.items():
        out[(NODE, "", name)] = {"address": addr}
    for wp in snap.waypoints.values():
        out[(WAYPOINT, wp.namespace, wp.name)] = encode_value(wp)
    for p in snap.policies.compiled:
        out[(POLICY, p.namespace, p.key)] = encode_value(p)
    return out


def decode_policies(objects: Mapping[ObjectKey, Mapping[str, Any]]) -> list[CompiledPolicy]:
    out: list[CompiledPolicy] = []
    for (kind, _, name), obj in objects.items():
        if kind != POLICY:
            continue
        p = decode_value(dict(obj))
        if not isinstance(p, CompiledAuthz | CompiledPeerAuthn | CompiledRequestAuthn):
            raise WireError(f"{kind} {name} is a {type(p).__name__}, not a compiled policy")
        out.append(p)
    return out


def decode_snapshot(objects: Mapping[ObjectKey, Mapping[str, Any]]) -> Snapshot:
    """The `Snapshot` that `encode_snapshot` was given; WireError naming what does not decode."""
    meta = objects.get((META, "", "meta"))
    if meta is None:
        raise WireError("the snapshot has no SnapshotMeta/meta object")
    workloads: dict[str, Workload] = {}
    services: dict[str, ServiceInfo] = {}
    nodes: dict[str, str] = {}
    waypoints: dict[str, WaypointInfo] = {}
    for (kind, ns, name), obj in objects.items():
        where = f"{kind} {ns}/{name}"
        try:
            if kind == WORKLOAD:
                w = decode_value(dict(obj))
                if not isinstance(w, Workload):
                    raise WireError(f"{where} is not a Workload")
                workloads[w.ip] = w
            elif kind == SERVICE:
                s = decode_value(dict(obj))
                if not isinstance(s, ServiceInfo):
                    raise WireError(f"{where} is not a Service")
                services[s.vip] = s
            elif kind == NODE:
                nodes[name] = str(obj["address"])
            elif kind == WAYPOINT:
                wp = decode_value(dict(obj))
                if not isinstance(wp, WaypointInfo):
                    raise WireError(f"{where} is not a Waypoint")
                waypoints[wp.uid] = wp
        except (KeyError, TypeError) as e:
            raise WireError(f"{where}: {e}") from e
    try:
        root = str(meta.get("root_namespace") or DEFAULT_ROOT_NAMESPACE)
        return Snapshot(
            node=str(meta["node"]),
            trust_domain=str(meta["trust_domain"]),
            workloads=MappingProxyType(workloads),
            services=MappingProxyType(services),
            nodes=MappingProxyType(nodes),
            policies=PolicySet.build(decode_policies(objects), root_namespace=root),
            errors=tuple(str(e) for e in meta.get("errors") or ()),
            version=int(meta["version"]),
            waypoints=MappingProxyType(waypoints),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"SnapshotMeta/meta: {e}") from e
