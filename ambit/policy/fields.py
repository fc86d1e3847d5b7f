"""The field checks every policy kind's compilation shares: where in an object an error is
(`_Where`, naming the object and the field path), types, ports, networks, selectors and
targetRefs. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from ambit.cluster import PolicyObject
from ambit.policy.match import (
    GATEWAY_GROUP,
    ISTIO_NETWORKING_GROUP,
    NetMatch,
    PolicyError,
    PortMatch,
    TargetRef,
)


class _Where:
    """Names the object in errors: `AuthorizationPolicy shop/deny-legacy: spec.rules[0]...: why`."""

    def __init__(self, obj: PolicyObject) -> None:
        self.obj = f"{obj.kind} {obj.meta.namespace}/{obj.meta.name}"

    def error(self, path: str, why: str) -> PolicyError:
        return PolicyError(f"{self.obj}: {path}: {why}")


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(v), type(v).__name__
    )


def _mapping(w: _Where, path: str, v: object) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise w.error(path, f"expected a mapping, got {_type_name(v)}")
    return v


def _known(w: _Where, path: str, m: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for k in m:
        if k not in allowed:
            hint = _close_match(str(k), allowed)
            raise w.error(
                f"{path}.{k}" if path else str(k),
                f"unknown field{hint}; {_where_kind(path)} accepts {', '.join(allowed)}",
            )


def _where_kind(path: str) -> str:
    return path.rsplit(".", 1)[-1].split("[")[0] or "this object"


def _close_match(name: str, allowed: Sequence[str]) -> str:
    low = name.lower()
    for a in allowed:
        if a.lower() == low or a.lower().rstrip("s") == low.rstrip("s"):
            return f" (did you mean {a!r}?)"
    return ""


def _enum_error(v: object, allowed: Sequence[str]) -> str:
    msg = f"{v!r} is not one of {', '.join(allowed)}"
    if isinstance(v, bool):
        msg += " (YAML reads unquoted on/off/yes/no as booleans; write one of the values above)"
    return msg


def _str_list(w: _Where, path: str, v: object) -> list[str]:
    if not isinstance(v, list):
        raise w.error(path, f"expected a list of strings, got {_type_name(v)}")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise w.error(f"{path}[{i}]", f"expected a string, got {_type_name(item)}")
        if not item:
            raise w.error(f"{path}[{i}]", "empty string")
        out.append(item)
    return out


def _string(w: _Where, path: str, v: object, *, required: bool = False) -> str:
    if v is None:
        if required:
            raise w.error(path, f"`{_where_kind(path)}` is required")
        return ""
    if not isinstance(v, str):
        raise w.error(path, f"expected a string, got {_type_name(v)}")
    if required and not v:
        raise w.error(path, "must not be empty")
    return v


def _port(w: _Where, path: str, v: object, *, lowest: int = 1) -> int:
    # The CRD types ports as strings ("8080"); plain YAML integers are accepted too.
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise w.error(path, f"{v!r} is not a port number")
    s = str(v).strip()
    if not s.isascii() or not s.isdigit():
        raise w.error(path, f"{v!r} is not a port number (expected {lowest}-65535)")
    n = int(s)
    if not lowest <= n <= 65535:
        raise w.error(path, f"port {n} is out of range {lowest}-65535")
    return n


def _ports(w: _Where, path: str, v: object) -> tuple[PortMatch, ...]:
    # Istio accepts 0 in AuthorizationPolicy ports (no connection has it: `ports: ["0"]`
    # matches nothing, `notPorts: ["0"]` excludes nothing).
    if not isinstance(v, list):
        raise w.error(path, f"expected a list of ports, got {_type_name(v)}")
    return tuple(PortMatch(str(p), _port(w, f"{path}[{i}]", p, lowest=0)) for i, p in enumerate(v))


def _net(w: _Where, path: str, raw: str) -> NetMatch:
    try:
        return NetMatch(raw, ipaddress.ip_network(raw.strip(), strict=False))
    except ValueError:
        raise w.error(
            path, f"{raw!r} is not an IP address or CIDR (e.g. 10.1.0.0/16 or 10.1.0.7)"
        ) from None


def _nets(w: _Where, path: str, v: object) -> tuple[NetMatch, ...]:
    return tuple(_net(w, f"{path}[{i}]", s) for i, s in enumerate(_str_list(w, path, v)))


def _labels(w: _Where, path: str, v: object) -> Mapping[str, str] | None:
    sel = _mapping(w, path, v)
    _known(w, path, sel, ("matchLabels",))
    ml = sel.get("matchLabels")
    if ml is None:
        return None
    ml = _mapping(w, f"{path}.matchLabels", ml)
    out: dict[str, str] = {}
    for k, val in ml.items():
        if not isinstance(val, str | int | float) or isinstance(val, bool):
            raise w.error(f"{path}.matchLabels.{k}", f"expected a string, got {_type_name(val)}")
        if not str(k):
            raise w.error(f"{path}.matchLabels", "a label key must not be empty")
        if "*" in str(k) or "*" in str(val):
            raise w.error(f"{path}.matchLabels.{k}", "wildcards (*) are not supported in a selector")
        out[str(k)] = str(val)
    return out or None


# (kind, group) a targetRef may name, as Istio's validation takes them ("core" is group "").
# A Service applies to its endpoints; a Gateway to traffic through that waypoint; a GatewayClass
# (from the root namespace) to every waypoint of that class; a ServiceEntry to traffic to its
# hosts, which ambit does not model (the policy is accepted and shown as having no effect).
_TARGET_KINDS = (("Service", "core"), ("ServiceEntry", ISTIO_NETWORKING_GROUP), ("Gateway", GATEWAY_GROUP),
                 ("GatewayClass", GATEWAY_GROUP))


def _group_words(group: str) -> str:
    return '""' if group == "core" else group


def _target_refs(w: _Where, spec: Mapping[str, Any], ns: str) -> tuple[TargetRef, ...]:
    raws: list[tuple[str, object]] = []
    if spec.get("targetRef") is not None:
        if spec.get("targetRefs") is not None:
            raise w.error("spec.targetRef", "set either targetRef or targetRefs, not both")
        raws.append(("spec.targetRef", spec["targetRef"]))
    if spec.get("targetRefs") is not None:
        lst = spec["targetRefs"]
        if not isinstance(lst, list):
            raise w.error("spec.targetRefs", f"expected a list, got {_type_name(lst)}")
        raws.extend((f"spec.targetRefs[{i}]", r) for i, r in enumerate(lst))
    out = []
    for path, raw in raws:
        ref = _mapping(w, path, raw)
        _known(w, path, ref, ("group", "kind", "name", "namespace"))
        kind, group, name = ref.get("kind"), ref.get("group") or "", ref.get("name")
        if not isinstance(name, str) or not name:
            raise w.error(f"{path}.name", "`name` is required")
        if (kind, group or "core") not in _TARGET_KINDS:
            raise w.error(
                f"{path}.kind",
                f"target {group or 'core'}/{kind} is not one Istio takes: "
                + ", ".join(f"kind {k} (group {_group_words(g)})" for k, g in _TARGET_KINDS),
            )
        ref_ns = ref.get("namespace")
        if ref_ns not in (None, "", ns):
            raise w.error(f"{path}.namespace", f"must be the policy's own namespace {ns!r} (got {ref_ns!r})")
        out.append(TargetRef(str(kind), ns, name))
    return tuple(out)
