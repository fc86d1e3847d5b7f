"""Istio's security API, read verbatim: validation, compilation and pure evaluation.

Owns `AuthorizationPolicy` and `PeerAuthentication` (`security.istio.io/v1` and
`v1beta1`): `compile_policy` validates an object strictly (every error names the
object and the field path) and compiles it into matchers that are cheap to run;
`authorize` decides an L4 connection at the ztunnel, `authorize_http` an HTTP
request at a waypoint, `mtls_mode` the effective PeerAuthentication mode. All
decisions are pure functions of their arguments, so they are tested by tables.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from ztunnel import ZtunnelError

if TYPE_CHECKING:
    from agent.cluster.model import PolicyObject
    from ztunnel.identity.spiffe import SpiffeId
    from ztunnel.state import Workload

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
DEFAULT_ROOT_NAMESPACE = "istio-system"
GATEWAY_GROUP = "gateway.networking.k8s.io"

# `when` keys a ztunnel can evaluate without parsing HTTP (same set as istiod
# sends to ztunnel); every other key is an HTTP attribute.
L4_WHEN_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
# Every other key Istio accepts. `request.auth.*` need a RequestAuthentication
# (JWT), which ambit has not: such values never match, their not-forms always do.
L7_WHEN_KEYS = frozenset(
    {
        "remote.ip",
        "connection.sni",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    }
)
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]+)\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims\[[^\]]+\](\[[^\]]+\])*$")

Action = Literal["ALLOW", "DENY", "AUDIT"]


class PolicyError(ZtunnelError):
    """A policy object is invalid; the message names the object (kind ns/name) and the field."""


# ---------------------------------------------------------------------------
# matchers: one compiled value each, `raw` kept for explanations


@dataclass(frozen=True)
class StringMatch:
    """Istio's string forms: exact, `prefix*`, `*suffix`, and `*` (presence: any non-empty value)."""

    kind: Literal["exact", "prefix", "suffix", "presence"]
    value: str
    raw: str
    ignore_case: bool = False

    @classmethod
    def parse(cls, raw: str, ignore_case: bool = False) -> StringMatch:
        v = raw.lower() if ignore_case else raw
        if v == "*":
            return cls("presence", "", raw, ignore_case)
        if v.startswith("*"):
            return cls("suffix", v[1:], raw, ignore_case)
        if v.endswith("*"):
            return cls("prefix", v[:-1], raw, ignore_case)
        return cls("exact", v, raw, ignore_case)

    def matches(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if self.ignore_case:
            value = value.lower()
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        if self.kind == "suffix":
            return value.endswith(self.value)
        return True


@dataclass(frozen=True)
class HostMatch:
    """`hosts`: case-insensitive string forms, tried with and without the `:port` suffix."""

    inner: StringMatch

    @property
    def raw(self) -> str:
        return self.inner.raw

    def matches(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if self.inner.matches(value):
            return True
        host, sep, port = value.rpartition(":")
        # "[::1]:80" and "a:80" carry a port; a bare IPv6 literal does not.
        return bool(sep) and port.isdigit() and not host.endswith(":") and self.inner.matches(host)


@dataclass(frozen=True)
class PathMatch:
    """`paths`: exact, `/prefix*`, `*suffix`, `*`, or a template with `{*}` / `{**}` segments."""

    raw: str
    string: StringMatch | None
    pattern: re.Pattern[str] | None

    @classmethod
    def parse(cls, raw: str) -> PathMatch:
        if "{*}" in raw or "{**}" in raw:
            out = []
            for part in re.split(r"(\{\*\*\}|\{\*\})", raw):
                if part == "{*}":
                    out.append(r"[^/]+")
                elif part == "{**}":
                    out.append(r".*")
                else:
                    out.append(re.escape(part))
            return cls(raw, None, re.compile("".join(out)))
        return cls(raw, StringMatch.parse(raw), None)

    def matches(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        # Istio matches the path without its query string.
        value = value.split("?", 1)[0]
        if self.pattern is not None:
            return self.pattern.fullmatch(value) is not None
        assert self.string is not None
        return self.string.matches(value)


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class NetMatch:
    """`ipBlocks` and IP conditions: a CIDR, or a single IP as a /32 or /128."""

    raw: str
    network: IpNetwork

    def matches(self, value: object) -> bool:
        if not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return value.version == self.network.version and value in self.network


@dataclass(frozen=True)
class PortMatch:
    raw: str
    port: int

    def matches(self, value: object) -> bool:
        return value == self.port


@dataclass(frozen=True)
class ServiceAccountMatch:
    """`serviceAccounts`: `ns/sa`, or a bare `sa` in the policy's namespace."""

    raw: str
    namespace: str
    service_account: str

    def matches(self, value: object) -> bool:
        return value == (self.namespace, self.service_account)


Matcher = StringMatch | HostMatch | PathMatch | NetMatch | PortMatch | ServiceAccountMatch

# attribute -> words used in explanations
_ATTR_WORDS = {
    "source.principal": "source principal",
    "source.namespace": "source namespace",
    "source.service_account": "source service account",
    "source.ip": "source IP",
    "remote.ip": "remote IP",
    "request.auth.principal": "request principal",
    "destination.ip": "destination IP",
    "destination.port": "destination port",
    "request.host": "host",
    "request.method": "method",
    "request.path": "path",
    "connection.sni": "SNI",
}


def _attr_words(attr: str) -> str:
    m = _HEADER_KEY.match(attr)
    if m:
        return f"header {m.group(1).lower()}"
    return _ATTR_WORDS.get(attr, attr)


@dataclass(frozen=True)
class FieldMatch:
    """One field of an entry, e.g. `notPrincipals`: any value matching (or none, when negated)."""

    name: str  # as written: "principals", "notPorts", "values"
    attr: str  # the attribute it reads: "source.principal", "destination.port", ...
    negate: bool
    l7: bool  # needs HTTP parsing (a waypoint) to be evaluated
    values: tuple[Matcher, ...]

    @cached_property
    def exact(self) -> Mapping[object, int] | None:
        """value -> first index, when every value is an exact match: one dict lookup per field."""
        out: dict[object, int] = {}
        for i, m in enumerate(self.values):
            if isinstance(m, PortMatch):
                key: object = m.port
            elif isinstance(m, StringMatch) and m.kind == "exact" and not m.ignore_case:
                key = m.value
            elif isinstance(m, ServiceAccountMatch):
                key = (m.namespace, m.service_account)
            else:
                return None
            out.setdefault(key, i)
        return out


@dataclass(frozen=True)
class Entry:
    """One `from[i].source`, `to[i].operation` or `when[i]`: all its fields must match."""

    path: str  # "from[0].source"
    fields: tuple[FieldMatch, ...]

    @property
    def l7_fields(self) -> tuple[str, ...]:
        return tuple(f"{self.path}.{f.name}" for f in self.fields if f.l7)


@dataclass(frozen=True)
class CompiledRule:
    """`rules[index]`: every present clause must match; each of `from`/`to` is an OR of entries."""

    index: int
    sources: tuple[Entry, ...] | None  # None: no `from`, any source
    operations: tuple[Entry, ...] | None  # None: no `to`, any operation
    conditions: tuple[Entry, ...]  # `when`: all must match

    @cached_property
    def l7_fields(self) -> tuple[str, ...]:
        out: list[str] = []
        for group in (self.sources or (), self.operations or (), self.conditions):
            for e in group:
                out.extend(e.l7_fields)
        return tuple(out)


@dataclass(frozen=True)
class TargetRef:
    kind: str  # "Service" | "Gateway"
    namespace: str
    name: str


class _Named:
    """The names every compiled policy answers to."""

    namespace: str
    name: str
    kind: str

    @property
    def ref(self) -> str:
        """`ns/name`, as decisions and logs name it."""
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """Same key as `PolicyObject.key`."""
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CompiledAuthz(_Named):
    """A valid AuthorizationPolicy, ready to evaluate."""

    namespace: str
    name: str
    api_version: str
    action: Action
    match_labels: Mapping[str, str] | None = field(hash=False)  # None: no selector
    target_refs: tuple[TargetRef, ...]
    rules: tuple[CompiledRule, ...]
    resource_version: str = ""

    kind = "AuthorizationPolicy"


@dataclass(frozen=True)
class CompiledPeerAuthn(_Named):
    """A valid PeerAuthentication."""

    namespace: str
    name: str
    api_version: str
    match_labels: Mapping[str, str] | None = field(hash=False)
    mode: str  # one of MTLS_MODES
    port_modes: Mapping[int, str] = field(hash=False)
    resource_version: str = ""

    kind = "PeerAuthentication"


CompiledPolicy = CompiledAuthz | CompiledPeerAuthn


# ---------------------------------------------------------------------------
# validation and compilation


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


def _port(w: _Where, path: str, v: object) -> int:
    # The CRD types ports as strings ("8080"); plain YAML integers are accepted too.
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise w.error(path, f"{v!r} is not a port number")
    s = str(v).strip()
    if not s.isdigit():
        raise w.error(path, f"{v!r} is not a port number (expected 1-65535)")
    n = int(s)
    if not 1 <= n <= 65535:
        raise w.error(path, f"port {n} is out of range 1-65535")
    return n


def _ports(w: _Where, path: str, v: object) -> tuple[PortMatch, ...]:
    if not isinstance(v, list):
        raise w.error(path, f"expected a list of ports, got {_type_name(v)}")
    return tuple(PortMatch(str(p), _port(w, f"{path}[{i}]", p)) for i, p in enumerate(v))


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
        out[str(k)] = str(val)
    return out or None


# field name -> (attribute, negated, L7, kind of value)
_SOURCE_FIELDS: dict[str, tuple[str, bool, bool, str]] = {
    "principals": ("source.principal", False, False, "str"),
    "notPrincipals": ("source.principal", True, False, "str"),
    "requestPrincipals": ("request.auth.principal", False, True, "str"),
    "notRequestPrincipals": ("request.auth.principal", True, True, "str"),
    "namespaces": ("source.namespace", False, False, "str"),
    "notNamespaces": ("source.namespace", True, False, "str"),
    "ipBlocks": ("source.ip", False, False, "ip"),
    "notIpBlocks": ("source.ip", True, False, "ip"),
    "remoteIpBlocks": ("remote.ip", False, True, "ip"),
    "notRemoteIpBlocks": ("remote.ip", True, True, "ip"),
    "serviceAccounts": ("source.service_account", False, False, "sa"),
    "notServiceAccounts": ("source.service_account", True, False, "sa"),
}
_OPERATION_FIELDS: dict[str, tuple[str, bool, bool, str]] = {
    "hosts": ("request.host", False, True, "host"),
    "notHosts": ("request.host", True, True, "host"),
    "ports": ("destination.port", False, False, "port"),
    "notPorts": ("destination.port", True, False, "port"),
    "methods": ("request.method", False, True, "str"),
    "notMethods": ("request.method", True, True, "str"),
    "paths": ("request.path", False, True, "path"),
    "notPaths": ("request.path", True, True, "path"),
}


def _values(w: _Where, path: str, v: object, kind: str, policy_ns: str) -> tuple[Matcher, ...]:
    if kind == "port":
        return _ports(w, path, v)
    if kind == "ip":
        return _nets(w, path, v)
    items = _str_list(w, path, v)
    if kind == "host":
        return tuple(HostMatch(StringMatch.parse(s, ignore_case=True)) for s in items)
    if kind == "path":
        return tuple(PathMatch.parse(s) for s in items)
    if kind == "sa":
        out: list[Matcher] = []
        for i, s in enumerate(items):
            parts = s.split("/")
            if len(parts) > 2 or not all(parts):
                raise w.error(f"{path}[{i}]", f"{s!r} is not <namespace>/<service-account> or <service-account>")
            ns, sa = (parts[0], parts[1]) if len(parts) == 2 else (policy_ns, parts[0])
            out.append(ServiceAccountMatch(s, ns, sa))
        return tuple(out)
    return tuple(StringMatch.parse(s) for s in items)


def _entry(
    w: _Where,
    path: str,
    raw: object,
    wrapper: str,
    table: Mapping[str, tuple[str, bool, bool, str]],
    policy_ns: str,
) -> Entry:
    outer = _mapping(w, path, raw)
    _known(w, path, outer, (wrapper,))
    if outer.get(wrapper) is None:
        raise w.error(f"{path}.{wrapper}", f"`{wrapper}` is required and must not be empty")
    inner_path = f"{path}.{wrapper}"
    inner = _mapping(w, inner_path, outer[wrapper])
    _known(w, inner_path, inner, tuple(table))
    fields = []
    for name, (attr, negate, l7, kind) in table.items():
        if name not in inner or inner[name] is None:
            continue
        vals = _values(w, f"{inner_path}.{name}", inner[name], kind, policy_ns)
        if vals:
            fields.append(FieldMatch(name, attr, negate, l7, vals))
    if not fields:
        raise w.error(inner_path, f"`{wrapper}` must set at least one field ({', '.join(table)})")
    return Entry(inner_path, tuple(fields))


def _condition(w: _Where, path: str, raw: object) -> Entry:
    c = _mapping(w, path, raw)
    _known(w, path, c, ("key", "values", "notValues"))
    key = c.get("key")
    if not isinstance(key, str) or not key:
        raise w.error(f"{path}.key", "`key` is required (e.g. source.ip, request.headers[x-user])")
    header = _HEADER_KEY.match(key)
    if key in L4_WHEN_KEYS:
        l7 = False
    elif key in L7_WHEN_KEYS or header or _CLAIM_KEY.match(key):
        l7 = True
    else:
        raise w.error(
            f"{path}.key",
            f"unknown condition key {key!r}; supported: {', '.join(sorted(L4_WHEN_KEYS | L7_WHEN_KEYS))}, "
            "request.headers[<name>], request.auth.claims[<name>]",
        )
    attr = f"request.headers[{header.group(1).lower()}]" if header else key
    if attr.startswith("request.auth.claims"):
        attr = "request.auth.claims"
    kind = {"source.ip": "ip", "remote.ip": "ip", "destination.ip": "ip", "destination.port": "port"}.get(
        key, "str"
    )
    fields = []
    for name, negate in (("values", False), ("notValues", True)):
        if c.get(name) is None:
            continue
        vals = _values(w, f"{path}.{name}", c[name], kind, "")
        if vals:
            fields.append(FieldMatch(name, attr, negate, l7, vals))
    if not fields:
        raise w.error(path, f"condition on {key!r} needs `values` or `notValues`")
    return Entry(path, tuple(fields))


def _entries(
    w: _Where, path: str, raw: object, wrapper: str, table: Mapping[str, tuple[str, bool, bool, str]], ns: str
) -> tuple[Entry, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise w.error(path, f"expected a list, got {_type_name(raw)}")
    if not raw:
        raise w.error(path, f"`{path.rsplit('.', 1)[-1]}` must not be an empty list; remove it to match any")
    return tuple(_entry(w, f"{path}[{i}]", e, wrapper, table, ns) for i, e in enumerate(raw))


def _rule(w: _Where, path: str, index: int, raw: object, ns: str) -> CompiledRule:
    if raw is None:
        raise w.error(path, "empty list item; write `- {}` for a rule that matches everything")
    r = _mapping(w, path, raw)
    _known(w, path, r, ("from", "to", "when"))
    when_raw = r.get("when")
    conditions: tuple[Entry, ...] = ()
    if when_raw is not None:
        if not isinstance(when_raw, list):
            raise w.error(f"{path}.when", f"expected a list, got {_type_name(when_raw)}")
        conditions = tuple(_condition(w, f"{path}.when[{i}]", c) for i, c in enumerate(when_raw))
    return CompiledRule(
        index=index,
        sources=_entries(w, f"{path}.from", r.get("from"), "source", _SOURCE_FIELDS, ns),
        operations=_entries(w, f"{path}.to", r.get("to"), "operation", _OPERATION_FIELDS, ns),
        conditions=conditions,
    )


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
        supported = (kind == "Service" and group in ("", "core")) or (
            kind == "Gateway" and group == GATEWAY_GROUP
        )
        if not supported:
            raise w.error(
                f"{path}.kind",
                f"target {group or 'core'}/{kind} is not supported; ambit supports kind Service "
                f"(group \"\") and kind Gateway (group {GATEWAY_GROUP}, a waypoint)",
            )
        ref_ns = ref.get("namespace")
        if ref_ns not in (None, "", ns):
            raise w.error(f"{path}.namespace", f"must be the policy's own namespace {ns!r} (got {ref_ns!r})")
        out.append(TargetRef(str(kind), ns, name))
    return tuple(out)


def compile_policy(obj: PolicyObject) -> CompiledPolicy:
    """Validate one AuthorizationPolicy or PeerAuthentication and compile it.

    Raises PolicyError naming the object and the field path of the first problem.
    """
    w = _Where(obj)
    if obj.api_version not in API_VERSIONS:
        raise w.error("apiVersion", f"{obj.api_version!r} is not one of {', '.join(API_VERSIONS)}")
    ns = obj.meta.namespace
    spec = _mapping(w, "spec", obj.spec if obj.spec is not None else {})
    if obj.kind == "AuthorizationPolicy":
        return _compile_authz(w, obj, ns, spec)
    if obj.kind == "PeerAuthentication":
        return _compile_peer_authn(w, obj, ns, spec)
    raise w.error("kind", "not a policy kind; expected AuthorizationPolicy or PeerAuthentication")


def _compile_authz(w: _Where, obj: PolicyObject, ns: str, spec: Mapping[str, Any]) -> CompiledAuthz:
    _known(w, "spec", spec, ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))
    action = spec.get("action")
    if action is None:
        action = "ALLOW"
    if action not in ACTIONS:
        raise w.error("spec.action", _enum_error(action, ACTIONS))
    if action == "CUSTOM":
        # Istio's ztunnel also refuses CUSTOM; ambit has no external authorizer,
        # and silently skipping the policy would leave traffic unguarded.
        raise w.error(
            "spec.action",
            "CUSTOM (external authorization) is not supported by ambit; use ALLOW or DENY",
        )
    if spec.get("provider") is not None:
        raise w.error("spec.provider", "`provider` is only valid with action CUSTOM")
    labels = _labels(w, "spec.selector", spec["selector"]) if spec.get("selector") is not None else None
    refs = _target_refs(w, spec, ns)
    if refs and spec.get("selector") is not None:
        raise w.error("spec.selector", "set either selector or targetRefs, not both")
    rules_raw = spec.get("rules")
    rules: tuple[CompiledRule, ...] = ()
    if rules_raw is not None:
        if not isinstance(rules_raw, list):
            raise w.error("spec.rules", f"expected a list, got {_type_name(rules_raw)}")
        rules = tuple(_rule(w, f"spec.rules[{i}]", i, r, ns) for i, r in enumerate(rules_raw))
    return CompiledAuthz(
        namespace=ns,
        name=obj.meta.name,
        api_version=obj.api_version,
        action="DENY" if action == "DENY" else "AUDIT" if action == "AUDIT" else "ALLOW",
        match_labels=labels,
        target_refs=refs,
        rules=rules,
        resource_version=obj.meta.resource_version,
    )


def _mode(w: _Where, path: str, raw: object) -> str:
    if raw is None:
        return "UNSET"
    m = _mapping(w, path, raw)
    _known(w, path, m, ("mode",))
    mode = m.get("mode")
    if mode is None:
        return "UNSET"
    if mode not in MTLS_MODES:
        raise w.error(f"{path}.mode", _enum_error(mode, MTLS_MODES))
    return str(mode)


def _compile_peer_authn(
    w: _Where, obj: PolicyObject, ns: str, spec: Mapping[str, Any]
) -> CompiledPeerAuthn:
    _known(w, "spec", spec, ("selector", "mtls", "portLevelMtls"))
    labels = _labels(w, "spec.selector", spec["selector"]) if spec.get("selector") is not None else None
    mode = _mode(w, "spec.mtls", spec.get("mtls"))
    ports: dict[int, str] = {}
    plm = spec.get("portLevelMtls")
    if plm is not None:
        plm = _mapping(w, "spec.portLevelMtls", plm)
        if plm and labels is None:
            raise w.error(
                "spec.portLevelMtls",
                "portLevelMtls needs a workload selector (Istio ignores it on namespace and mesh policies)",
            )
        for k, v in plm.items():
            path = f"spec.portLevelMtls.{k}"
            ports[_port(w, path, k)] = _mode(w, path, v)
    return CompiledPeerAuthn(
        namespace=ns,
        name=obj.meta.name,
        api_version=obj.api_version,
        match_labels=labels,
        mode=mode,
        port_modes=ports,
        resource_version=obj.meta.resource_version,
    )


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


# ---------------------------------------------------------------------------
# facts and decisions


@dataclass(frozen=True)
class ConnectionFacts:
    """What the ztunnel knows about an inbound connection (identity from the verified certificate)."""

    src_ip: str
    src_identity: SpiffeId | None
    dst: Workload
    dst_port: int
    mtls: bool


@dataclass(frozen=True)
class HttpFacts:
    """One HTTP request at a waypoint. `headers` names are matched case-insensitively."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Decision:
    """Which policy and rule decided, and a sentence saying why."""

    allowed: bool
    action: str  # "ALLOW" | "DENY" | "DEFAULT"
    policy: str | None  # "ns/name"
    rule: int | None
    reason: str
    # Things an operator should know that did not decide the outcome, e.g. rules
    # skipped because they need HTTP attributes and no waypoint enforces them.
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "action": self.action,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "notes": list(self.notes),
        }


class _Attrs:
    """Lazily computed attributes of one connection/request; shared across all rules."""

    def __init__(self, facts: ConnectionFacts, http: HttpFacts | None) -> None:
        self.facts = facts
        self.http = http
        self._cache: dict[str, object] = {}

    def get(self, attr: str) -> object:
        if attr in self._cache:
            return self._cache[attr]
        v = self._compute(attr)
        self._cache[attr] = v
        return v

    def _compute(self, attr: str) -> object:
        f, h = self.facts, self.http
        ident = f.src_identity
        if attr == "source.principal":
            return f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}" if ident else None
        if attr == "source.namespace":
            return ident.namespace if ident else None
        if attr == "source.service_account":
            return (ident.namespace, ident.service_account) if ident else None
        if attr == "source.ip":
            return _ip_or_none(f.src_ip)
        if attr == "destination.ip":
            return _ip_or_none(f.dst.ip)
        if attr == "destination.port":
            return f.dst_port
        if h is None:
            return None
        if attr == "remote.ip":
            # The original client as the first X-Forwarded-For hop, else the peer.
            xff = self.header("x-forwarded-for")
            first = xff.split(",")[0].strip() if xff else ""
            return _ip_or_none(first) or _ip_or_none(f.src_ip)
        if attr == "request.host":
            return h.host or self.header("host")
        if attr == "request.method":
            return h.method
        if attr == "request.path":
            return h.path
        m = _HEADER_KEY.match(attr)
        if m:
            return self.header(m.group(1))
        # request.auth.* (no JWT authentication in ambit) and connection.sni.
        return None

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.http.headers.items() if self.http else ():
            if k.lower() == low:
                return v
        return None


def _ip_or_none(s: str | None) -> IpAddress | None:
    if not s:
        return None
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def _show(v: object) -> str:
    if isinstance(v, tuple):
        return "/".join(str(x) for x in v)
    return str(v)


def _match_field(fm: FieldMatch, attrs: _Attrs) -> str | None:
    """Explanation when the field matches, None when it does not."""
    value = attrs.get(fm.attr)
    hit: int | None = None
    exact = fm.exact
    if exact is not None:
        # Empty strings never match, as in the slow path.
        hit = exact.get(value) if value != "" else None
    else:
        for i, m in enumerate(fm.values):
            if m.matches(value):
                hit = i
                break
    if hit is not None:
        if fm.negate:
            return None
        return f"{_attr_words(fm.attr)} {_show(value)} matches {fm.name}[{hit}]"
    if not fm.negate:
        return None
    if value is None:
        return f"no {_attr_words(fm.attr)}, so {fm.name} does not exclude it"
    return f"{_attr_words(fm.attr)} {_show(value)} is not in {fm.name}"


def _match_entry(e: Entry, attrs: _Attrs, l4_only: bool) -> str | None:
    parts = []
    for fm in e.fields:
        if fm.l7 and l4_only:
            continue
        why = _match_field(fm, attrs)
        if why is None:
            return None
        parts.append(why)
    if not parts:
        return f"{e.path} has only HTTP fields, ignored at L4"
    return " and ".join(parts)


def _match_rule(r: CompiledRule, attrs: _Attrs, l4_only: bool) -> str | None:
    parts = []
    for group in (r.sources, r.operations):
        if group is None:
            continue
        for e in group:
            why = _match_entry(e, attrs, l4_only)
            if why is not None:
                parts.append(why)
                break
        else:
            return None
    for e in r.conditions:
        why = _match_entry(e, attrs, l4_only)
        if why is None:
            return None
        parts.append(why)
    return "; ".join(parts) if parts else "the rule is empty and matches every connection"


def _refs(ps: Sequence[CompiledAuthz]) -> str:
    return ", ".join(p.ref for p in ps)


def _evaluate(
    applicable: Sequence[CompiledAuthz], attrs: _Attrs, l4: bool, subject: str
) -> Decision:
    notes: list[str] = []
    # 1. DENY: any matching rule denies. At L4 a rule's HTTP parts are ignored,
    # so a DENY written for HTTP denies more, never less (as Istio's ztunnel).
    for p in applicable:
        if p.action != "DENY":
            continue
        for r in p.rules:
            why = _match_rule(r, attrs, l4_only=l4)
            if why is not None:
                if l4 and r.l7_fields:
                    notes.append(
                        f"{p.ref} rule {r.index} uses HTTP fields ({', '.join(r.l7_fields)}) "
                        "that the ztunnel cannot see; they were ignored, so it denies more than written"
                    )
                return Decision(
                    False, "DENY", p.ref, r.index,
                    f"denied by DENY policy {p.ref} rule {r.index}: {why}", tuple(notes),
                )
    # 2. ALLOW: once any ALLOW policy applies, one of its rules must match.
    allows = [p for p in applicable if p.action == "ALLOW"]
    if not allows:
        audit = [p for p in applicable if p.action == "AUDIT"]
        if audit:
            notes.append(f"AUDIT policies {_refs(audit)} apply; AUDIT only logs and never decides")
        denies = [p for p in applicable if p.action == "DENY"]
        if denies:
            why = (f"allowed: no DENY policy matched ({len(denies)} appl{'ies' if len(denies) == 1 else 'y'}: "
                   f"{_refs(denies)}) and no ALLOW policy applies to {subject}")
        else:
            why = f"allowed: no ALLOW or DENY policy applies to {subject}"
        return Decision(True, "DEFAULT", None, None, why, tuple(notes))
    for p in allows:
        for r in p.rules:
            if l4 and r.l7_fields:
                # An ALLOW rule that needs HTTP cannot match at L4: stricter, never looser.
                notes.append(
                    f"{p.ref} rule {r.index} needs HTTP fields ({', '.join(r.l7_fields)}) and no "
                    "waypoint enforces it, so it cannot allow"
                )
                continue
            why = _match_rule(r, attrs, l4_only=l4)
            if why is not None:
                return Decision(
                    True, "ALLOW", p.ref, r.index,
                    f"allowed by ALLOW policy {p.ref} rule {r.index}: {why}", tuple(notes),
                )
        if not p.rules:
            notes.append(f"{p.ref} has no rules: it allows nothing")
    n = len(allows)
    noun = "policy applies" if n == 1 else "policies apply"
    skipped = sum(1 for p in allows for r in p.rules if l4 and r.l7_fields)
    hint = ""
    if skipped:
        hint = (
            f" ({skipped} ALLOW rule{'s need' if skipped > 1 else ' needs'} HTTP attributes; "
            "give the destination a waypoint to enforce them)"
        )
    return Decision(
        False, "DEFAULT", None, None,
        f"no ALLOW policy matched: {n} ALLOW {noun} ({_refs(allows)}) and none matched{hint}",
        tuple(notes),
    )


def authorize(facts: ConnectionFacts, policies: PolicySet, *, via_waypoint: bool = False) -> Decision:
    """Decide an inbound connection at the destination's ztunnel (L4).

    Order: STRICT mTLS (a plaintext connection to a STRICT port is refused), then
    the destination's waypoint (if it has one, only connections from that waypoint
    are admitted: the waypoint enforces every policy with the client's identity;
    `via_waypoint=True` says the verified peer is that waypoint), then DENY, then
    ALLOW (default deny once one applies), else allow.
    """
    dst = facts.dst
    if not facts.mtls:
        mode, pa = mtls_policy(dst, facts.dst_port, policies)
        if mode == "STRICT":
            src = f"PeerAuthentication {pa}" if pa else "the mesh default"
            return Decision(
                False, "DENY", pa, None,
                f"plaintext connection refused: {src} requires STRICT mTLS on {dst.uid} port {facts.dst_port}",
            )
    if dst.waypoint:
        if via_waypoint:
            return Decision(
                True, "ALLOW", None, None,
                f"allowed: arrived through waypoint {dst.waypoint}, which enforces {dst.uid}'s policies",
            )
        return Decision(
            False, "DENY", None, None,
            f"denied: {dst.uid} uses waypoint {dst.waypoint}; connections must come through it",
        )
    attrs = _Attrs(facts, None)
    return _evaluate(policies.applicable(dst), attrs, l4=True, subject=dst.uid)


def authorize_http(facts: ConnectionFacts, http: HttpFacts, policies: PolicySet) -> Decision:
    """Decide one HTTP request at a waypoint, with the original client's identity in `facts`.

    Every policy that selects the destination (mesh, namespace, selector,
    targetRefs to its Service or to the waypoint) applies with all its fields.
    """
    attrs = _Attrs(facts, http)
    return _evaluate(
        policies.applicable(facts.dst, at_waypoint=True), attrs, l4=False, subject=facts.dst.uid
    )


def mtls_policy(dst: Workload, port: int, policies: PolicySet) -> tuple[str, str | None]:
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
    mode, by = "PERMISSIVE", None
    for level in (mesh, ns_level, workload):
        if level is not None and level.mode != "UNSET":
            mode, by = level.mode, level.ref
    if workload is not None:
        pm = workload.port_modes.get(port, "UNSET")
        if pm != "UNSET":
            mode, by = pm, workload.ref
    return mode, by


def mtls_port_modes(dst: Workload, policies: PolicySet) -> tuple[str, dict[int, str]]:
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


def mtls_mode(dst: Workload, port: int, policies: PolicySet) -> str:
    """Effective PeerAuthentication mode on `dst`'s (workload) `port`: "STRICT", "PERMISSIVE" or
    "DISABLE". Workload selector > namespace > mesh (root namespace) > PERMISSIVE; UNSET inherits.
    The ztunnel treats DISABLE like PERMISSIVE (Istio ambient cannot disable mTLS)."""
    return mtls_policy(dst, port, policies)[0]


def check(
    facts: ConnectionFacts,
    policies: PolicySet,
    *,
    http: HttpFacts | None = None,
    via_waypoint: bool = False,
) -> Decision:
    """`ambit policy check`: decide where the mesh would. A destination with a waypoint is
    judged as its waypoint judges (with `http`, all fields; without, as an empty request, so
    HTTP-only rules do not match); one without is judged by its ztunnel at L4, and `http` is
    ignored with a note, since no proxy on the path sees HTTP."""
    dst = facts.dst
    if dst.waypoint and not via_waypoint:
        mtls = authorize(facts, policies, via_waypoint=True)
        if not mtls.allowed:
            return mtls  # refused before any waypoint logic (STRICT mTLS)
        d = authorize_http(facts, http or HttpFacts("", "", ""), policies)
        note = f"judged at waypoint {dst.waypoint}, which enforces {dst.uid}'s policies"
        return Decision(d.allowed, d.action, d.policy, d.rule, d.reason, (note, *d.notes))
    d = authorize(facts, policies, via_waypoint=via_waypoint)
    if http is not None and (http.method or http.path or http.host):
        note = f"{dst.uid} has no waypoint: the method/path/host were not evaluated (L4 only)"
        return Decision(d.allowed, d.action, d.policy, d.rule, d.reason, (*d.notes, note))
    return d
