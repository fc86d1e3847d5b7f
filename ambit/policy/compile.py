"""Validation and compilation of `AuthorizationPolicy`, `PeerAuthentication` and
`RequestAuthentication`, read verbatim.

Pure. `compile_policy` validates an object strictly (every error names the
object, the field path and, where it can, what was meant) and compiles it into
the matchers of `ambit.policy.match`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from ambit.cluster import PolicyObject
from ambit.policy.jwt import JwksError, parse_jwks
from ambit.policy.match import (
    _CLAIM_KEY,
    _ENVOY_FILTER_KEY,
    _HEADER_KEY,
    ACTIONS,
    ALWAYS_REJECT_ANNOTATION,
    API_VERSIONS,
    DRY_RUN_ANNOTATION,
    GATEWAY_GROUP,
    ISTIO_NETWORKING_GROUP,
    L4_WHEN_KEYS,
    L7_WHEN_KEYS,
    MTLS_MODES,
    UNSUPPORTED_WHEN_KEYS,
    Action,
    ClaimToHeader,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRequestAuthn,
    CompiledRule,
    Entry,
    FieldMatch,
    HeaderLocation,
    HostMatch,
    JwtRule,
    Matcher,
    MtlsMode,
    NetMatch,
    PathMatch,
    PolicyError,
    PortMatch,
    ServiceAccountMatch,
    StringMatch,
    TargetRef,
)

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
        for i, s in enumerate(items):
            _check_path_template(w, f"{path}[{i}]", s)
        return tuple(PathMatch.parse(s) for s in items)
    if kind == "sa":
        # Istio's limits: at most 16, no wildcards, at most 320 characters each.
        if len(items) > 16:
            raise w.error(path, f"at most 16 service accounts (got {len(items)})")
        out: list[Matcher] = []
        for i, s in enumerate(items):
            parts = s.split("/")
            if len(parts) > 2 or not all(parts):
                raise w.error(f"{path}[{i}]", f"{s!r} is not <namespace>/<service-account> or <service-account>")
            if "*" in s:
                raise w.error(f"{path}[{i}]", f"{s!r}: wildcards are not allowed in service accounts")
            if len(s) > 320:
                raise w.error(f"{path}[{i}]", "longer than 320 characters")
            ns, sa = (parts[0], parts[1]) if len(parts) == 2 else (policy_ns, parts[0])
            out.append(ServiceAccountMatch(s, ns, sa))
        return tuple(out)
    return tuple(StringMatch.parse(s) for s in items)


# RFC 3986's pchar without "/": what a literal segment of a path template may hold.
_PATH_LITERAL = re.compile(r"^[a-zA-Z0-9\-._~%!$&'()+,;:@=]+$")


def _check_path_template(w: _Where, path: str, value: str) -> None:
    """Istio's rules for `paths`: `{*}` matches one segment and `{**}` the rest; `{**}` is the
    last operator; no other braces anywhere; in a template, every other segment is a literal."""
    template = "{*}" in value or "{**}" in value
    seen_rest = False
    for seg in value.strip("/").split("/"):
        if seg in ("{*}", "{**}"):
            if seen_rest:
                raise w.error(path, f"{value!r}: {{**}} must be the last operator of a path template")
            seen_rest = seg == "{**}"
            continue
        if "{" in seg or "}" in seg:
            raise w.error(path, f"{value!r}: braces are only allowed as whole segments {{*}} or {{**}}")
        if template and not _PATH_LITERAL.match(seg):
            raise w.error(path, f"{value!r}: segment {seg!r} of a path template is not a literal "
                                "(letters, digits and -._~%!$&'()+,;:@=)")


# source fields Istio does not take in a CUSTOM policy's rules (the external authorizer is
# asked before the peer's identity is matched)
_NOT_WITH_CUSTOM = ("principals", "notPrincipals", "namespaces", "notNamespaces", "serviceAccounts",
                    "notServiceAccounts", "requestPrincipals", "notRequestPrincipals")
_NOT_WITH_CUSTOM_KEYS = ("source.namespace", "source.serviceAccount", "source.principal")


def _entry(
    w: _Where,
    path: str,
    raw: object,
    wrapper: str,
    table: Mapping[str, tuple[str, bool, bool, str]],
    policy_ns: str,
    action: str = "ALLOW",
) -> Entry:
    outer = _mapping(w, path, raw)
    _known(w, path, outer, (wrapper,))
    if outer.get(wrapper) is None:
        raise w.error(f"{path}.{wrapper}", f"`{wrapper}` is required and must not be empty")
    inner_path = f"{path}.{wrapper}"
    inner = _mapping(w, inner_path, outer[wrapper])
    _known(w, inner_path, inner, tuple(table))
    if wrapper == "source":
        present = {k for k, v in inner.items() if v}
        if present & {"serviceAccounts", "notServiceAccounts"} and present & {
            "principals", "notPrincipals", "namespaces", "notNamespaces"
        }:
            raise w.error(inner_path, "set serviceAccounts (or notServiceAccounts) without principals or "
                                      "namespaces (or their not-forms) in the same source, as Istio requires")
        if action == "CUSTOM":
            for name in _NOT_WITH_CUSTOM:
                if inner.get(name) is not None:
                    raise w.error(f"{inner_path}.{name}", "not supported in a CUSTOM policy's rules (as in Istio)")
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


def _condition(w: _Where, path: str, raw: object, policy_ns: str, action: str = "ALLOW") -> Entry:
    c = _mapping(w, path, raw)
    _known(w, path, c, ("key", "values", "notValues"))
    key = c.get("key")
    if not isinstance(key, str) or not key:
        raise w.error(f"{path}.key", "`key` is required (e.g. source.ip, request.headers[x-user])")
    header = _HEADER_KEY.match(key)
    unsupported = False
    if key in L4_WHEN_KEYS:
        l7 = False
    elif key in L7_WHEN_KEYS or header or _CLAIM_KEY.match(key):
        l7 = True
    elif key in UNSUPPORTED_WHEN_KEYS or _ENVOY_FILTER_KEY.match(key):
        l7 = unsupported = True
    else:
        raise w.error(
            f"{path}.key",
            f"unknown condition key {key!r}; supported: "
            f"{', '.join(sorted(L4_WHEN_KEYS | L7_WHEN_KEYS | UNSUPPORTED_WHEN_KEYS))}, request.headers[<name>], "
            "request.experimental.inline.headers[<name>], request.auth.claims[<name>], "
            "experimental.envoy.filters.<filter>[<key>]",
        )
    if action == "CUSTOM" and (key in _NOT_WITH_CUSTOM_KEYS or key.startswith("request.auth.")):
        raise w.error(f"{path}.key", f"{key} is not supported in a CUSTOM policy's rules (as in Istio)")
    attr = key
    if header:
        attr = f"request.headers[{header.group(1).lower()}]"
    elif key == "source.serviceAccount":
        attr = "source.service_account"
    kind = {"source.ip": "ip", "remote.ip": "ip", "destination.ip": "ip", "destination.port": "port",
            "source.serviceAccount": "sa"}.get(key, "str")
    fields = []
    for name, negate in (("values", False), ("notValues", True)):
        if c.get(name) is None:
            continue
        vals = _values(w, f"{path}.{name}", c[name], kind, policy_ns)
        if vals:
            fields.append(FieldMatch(name, attr, negate, l7, vals, unsupported))
    if not fields:
        raise w.error(path, f"condition on {key!r} needs `values` or `notValues`")
    return Entry(path, tuple(fields))


def _entries(
    w: _Where, path: str, raw: object, wrapper: str, table: Mapping[str, tuple[str, bool, bool, str]], ns: str,
    action: str,
) -> tuple[Entry, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise w.error(path, f"expected a list, got {_type_name(raw)}")
    if not raw:
        raise w.error(path, f"`{path.rsplit('.', 1)[-1]}` must not be an empty list; remove it to match any")
    return tuple(_entry(w, f"{path}[{i}]", e, wrapper, table, ns, action) for i, e in enumerate(raw))


def _rule(w: _Where, path: str, index: int, raw: object, ns: str, action: str) -> CompiledRule:
    if raw is None:
        raise w.error(path, "empty list item; write `- {}` for a rule that matches everything")
    r = _mapping(w, path, raw)
    _known(w, path, r, ("from", "to", "when"))
    when_raw = r.get("when")
    conditions: tuple[Entry, ...] = ()
    if when_raw is not None:
        if not isinstance(when_raw, list):
            raise w.error(f"{path}.when", f"expected a list, got {_type_name(when_raw)}")
        conditions = tuple(_condition(w, f"{path}.when[{i}]", c, ns, action) for i, c in enumerate(when_raw))
    return CompiledRule(
        index=index,
        sources=_entries(w, f"{path}.from", r.get("from"), "source", _SOURCE_FIELDS, ns, action),
        operations=_entries(w, f"{path}.to", r.get("to"), "operation", _OPERATION_FIELDS, ns, action),
        conditions=conditions,
    )


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


def compile_policy(obj: PolicyObject) -> CompiledPolicy:
    """Validate one AuthorizationPolicy, PeerAuthentication or RequestAuthentication and compile it.

    Raises PolicyError naming the object and the field path of the first problem.
    """
    w = _Where(obj)
    if obj.api_version not in API_VERSIONS:
        raise w.error("apiVersion", f"{obj.api_version!r} is not one of {', '.join(API_VERSIONS)}")
    ns = obj.meta.namespace
    spec = _mapping(w, "spec", obj.spec if obj.spec is not None else {})
    annotations = obj.meta.annotations
    if ALWAYS_REJECT_ANNOTATION in annotations:
        raise w.error(f"metadata.annotations.{ALWAYS_REJECT_ANNOTATION}",
                      "this annotation asks for the object to be rejected (as Istio does)")
    if DRY_RUN_ANNOTATION in annotations and obj.kind != "AuthorizationPolicy":
        raise w.error(f"metadata.annotations.{DRY_RUN_ANNOTATION}",
                      "only an AuthorizationPolicy can be dry-run (as in Istio); remove the annotation")
    if obj.kind == "AuthorizationPolicy":
        return _compile_authz(w, obj, ns, spec)
    if obj.kind == "PeerAuthentication":
        return _compile_peer_authn(w, obj, ns, spec)
    if obj.kind == "RequestAuthentication":
        return _compile_request_authn(w, obj, ns, spec)
    raise w.error(
        "kind", "not a policy kind; expected AuthorizationPolicy, PeerAuthentication or RequestAuthentication"
    )


def _compile_authz(w: _Where, obj: PolicyObject, ns: str, spec: Mapping[str, Any]) -> CompiledAuthz:
    _known(w, "spec", spec, ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))
    action = spec.get("action")
    if action is None:
        action = "ALLOW"
    if action not in ACTIONS:
        raise w.error("spec.action", _enum_error(action, ACTIONS))
    provider = ""
    if spec.get("provider") is not None:
        if action != "CUSTOM":
            raise w.error("spec.provider", "`provider` is only valid with action CUSTOM")
        pm = _mapping(w, "spec.provider", spec["provider"])
        _known(w, "spec.provider", pm, ("name",))
        provider = _string(w, "spec.provider.name", pm.get("name"))
    dry_run = _dry_run(w, obj.meta.annotations, action)
    labels = _labels(w, "spec.selector", spec["selector"]) if spec.get("selector") is not None else None
    refs = _target_refs(w, spec, ns)
    if refs and spec.get("selector") is not None:
        raise w.error("spec.selector", "set either selector or targetRefs, not both")
    rules_raw = spec.get("rules")
    rules: tuple[CompiledRule, ...] = ()
    if rules_raw is not None:
        if not isinstance(rules_raw, list):
            raise w.error("spec.rules", f"expected a list, got {_type_name(rules_raw)}")
        rules = tuple(_rule(w, f"spec.rules[{i}]", i, r, ns, action) for i, r in enumerate(rules_raw))
    if action in ("DENY", "CUSTOM") and not rules:
        # Istio refuses these: they could never match. (An ALLOW without rules allows nothing.)
        raise w.error("spec.rules", f"a {action} policy without rules never applies; add a rule "
                                    "(`rules: [{}]` matches every request)")
    if action == "CUSTOM" and not provider:
        raise w.error("spec.provider.name", "a CUSTOM policy names its extension provider (provider: {name: ...})")
    return CompiledAuthz(
        namespace=ns,
        name=obj.meta.name,
        api_version=obj.api_version,
        action=cast(Action, action),
        match_labels=labels,
        target_refs=refs,
        rules=rules,
        resource_version=obj.meta.resource_version,
        provider=provider,
        dry_run=dry_run,
    )


# Go's strconv.ParseBool, which Istio reads the dry-run annotation with
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def _dry_run(w: _Where, annotations: Mapping[str, str], action: str) -> bool:
    if DRY_RUN_ANNOTATION not in annotations:
        return False
    path = f"metadata.annotations.{DRY_RUN_ANNOTATION}"
    if action not in ("ALLOW", "DENY"):
        raise w.error(path, f"dry-run works with ALLOW and DENY policies only (as in Istio), not {action}")
    value = annotations[DRY_RUN_ANNOTATION]
    if value not in _BOOLS:
        raise w.error(path, f"{value!r} is not a boolean (write \"true\" or \"false\")")
    return _BOOLS[value]


def _mode(w: _Where, path: str, raw: object) -> MtlsMode:
    if raw is None:
        return "UNSET"
    m = _mapping(w, path, raw)
    _known(w, path, m, ("mode",))
    mode = m.get("mode")
    if mode is None:
        return "UNSET"
    if mode not in MTLS_MODES:
        raise w.error(f"{path}.mode", _enum_error(mode, MTLS_MODES))
    return cast(MtlsMode, mode)


def _compile_peer_authn(
    w: _Where, obj: PolicyObject, ns: str, spec: Mapping[str, Any]
) -> CompiledPeerAuthn:
    _known(w, "spec", spec, ("selector", "mtls", "portLevelMtls"))
    labels = _labels(w, "spec.selector", spec["selector"]) if spec.get("selector") is not None else None
    mode = _mode(w, "spec.mtls", spec.get("mtls"))
    ports: dict[int, MtlsMode] = {}
    plm = spec.get("portLevelMtls")
    if plm is not None:
        plm = _mapping(w, "spec.portLevelMtls", plm)
        if not plm:
            raise w.error("spec.portLevelMtls", "must not be empty when present (as in Istio); remove it")
        if labels is None:
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
# RequestAuthentication

_JWT_RULE_FIELDS = (
    "issuer", "audiences", "jwks", "jwksUri", "fromHeaders", "fromParams", "fromCookies",
    "forwardOriginalToken", "outputPayloadToHeader", "outputClaimToHeaders", "spaceDelimitedClaims", "timeout",
)
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
# RFC 9110's token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


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


def _header_name(w: _Where, path: str, v: object) -> str:
    name = _string(w, path, v, required=True)
    if not _HEADER_NAME.match(name):
        raise w.error(path, f"{name!r} is not an HTTP header name")
    return name.lower()


def _list(w: _Where, path: str, v: object) -> list[Any]:
    """A list, or none (null or absent)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise w.error(path, f"expected a list, got {_type_name(v)}")
    return v


def _strings(w: _Where, path: str, v: object) -> tuple[str, ...]:
    """A list of non-empty strings, or none (null or absent)."""
    return () if v is None else tuple(_str_list(w, path, v))


def _jwks_path(w: _Where, path: str, uri: str) -> str:
    """The file a jwksUri names; "" for an http(s) URL, which ambit does not fetch (Istio takes
    only those; a file path is ambit's own addition). A rule without keys refuses every token
    it checks (401, "Jwks remote fetch is failed", as Envoy when the fetch fails)."""
    if uri.startswith("file://"):
        file = uri[len("file://"):]
    elif uri.startswith("/"):
        file = uri
    elif uri.split("://", 1)[0] in ("http", "https"):
        return ""
    else:
        file = ""
    if not file.startswith("/") or "\0" in file:
        raise w.error(path, f"{uri!r} is not an http(s) URL, an absolute file path or a file:///... URL")
    return file


def _check_jwks(w: _Where, path: str, text: str) -> None:
    """Refuse what Istio refuses (not a JWK Set); accept, unused, the keys ambit will not use
    (shared secrets and private keys: tokens they would verify are refused)."""
    try:
        parse_jwks(text)
        return
    except JwksError as e:
        error = e
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise w.error(path, str(error)) from None
    usable = [k for k in keys if not (isinstance(k, dict) and (k.get("kty") == "oct" or "d" in k))]
    if len(usable) == len(keys):
        raise w.error(path, str(error)) from None
    if usable:
        try:
            parse_jwks(json.dumps({"keys": usable}))
        except JwksError as e:
            raise w.error(path, str(e)) from None


def _jwt_rule(w: _Where, path: str, index: int, raw: object, policy: str) -> JwtRule:
    r = _mapping(w, path, raw)
    _known(w, path, r, _JWT_RULE_FIELDS)
    timeout = r.get("timeout")
    if timeout is not None and not (isinstance(timeout, str) and _DURATION.match(timeout)):
        # Accepted and unused: ambit fetches no keys over the network.
        raise w.error(f"{path}.timeout", f"{timeout!r} is not a duration in seconds (e.g. 5s or 1.5s)")
    issuer = _string(w, f"{path}.issuer", r.get("issuer"))
    audiences = _strings(w, f"{path}.audiences", r.get("audiences"))
    jwks = _string(w, f"{path}.jwks", r.get("jwks"))
    jwks_uri = _string(w, f"{path}.jwksUri", r.get("jwksUri"))
    if not issuer and not jwks_uri:
        raise w.error(f"{path}.issuer", "`issuer` is required (or at least a `jwksUri`, as Istio takes it)")
    if jwks:
        _check_jwks(w, f"{path}.jwks", jwks)
    # Inline keys win over a jwksUri (Istio says to set only one).
    jwks_path = _jwks_path(w, f"{path}.jwksUri", jwks_uri) if jwks_uri and not jwks else ""
    headers: list[HeaderLocation] = []
    for i, h in enumerate(_list(w, f"{path}.fromHeaders", r.get("fromHeaders"))):
        hp = f"{path}.fromHeaders[{i}]"
        hm = _mapping(w, hp, h)
        _known(w, hp, hm, ("name", "prefix"))
        # Istio only asks for a non-empty name (one that is no header name never finds a token).
        headers.append(HeaderLocation(_string(w, f"{hp}.name", hm.get("name"), required=True).lower(),
                                      _string(w, f"{hp}.prefix", hm.get("prefix"))))
    forward = r.get("forwardOriginalToken")
    if forward is not None and not isinstance(forward, bool):
        raise w.error(f"{path}.forwardOriginalToken", f"expected true or false, got {forward!r}")
    payload_header = ""
    if r.get("outputPayloadToHeader") not in (None, ""):
        payload_header = _header_name(w, f"{path}.outputPayloadToHeader", r["outputPayloadToHeader"])
    claim_headers: list[ClaimToHeader] = []
    for i, c in enumerate(_list(w, f"{path}.outputClaimToHeaders", r.get("outputClaimToHeaders"))):
        cp = f"{path}.outputClaimToHeaders[{i}]"
        cm = _mapping(w, cp, c)
        _known(w, cp, cm, ("header", "claim"))
        claim_headers.append(ClaimToHeader(_header_name(w, f"{cp}.header", cm.get("header")),
                                           _string(w, f"{cp}.claim", cm.get("claim"), required=True)))
    return JwtRule(
        policy=policy,
        index=index,
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        jwks_uri=jwks_uri,
        jwks_path=jwks_path,
        from_headers=tuple(headers),
        from_params=_strings(w, f"{path}.fromParams", r.get("fromParams")),
        from_cookies=_strings(w, f"{path}.fromCookies", r.get("fromCookies")),
        forward_original_token=bool(forward),
        output_payload_to_header=payload_header,
        output_claim_to_headers=tuple(claim_headers),
        space_delimited_claims=_strings(w, f"{path}.spaceDelimitedClaims", r.get("spaceDelimitedClaims")),
    )


def _compile_request_authn(
    w: _Where, obj: PolicyObject, ns: str, spec: Mapping[str, Any]
) -> CompiledRequestAuthn:
    _known(w, "spec", spec, ("selector", "targetRef", "targetRefs", "jwtRules"))
    labels = _labels(w, "spec.selector", spec["selector"]) if spec.get("selector") is not None else None
    refs = _target_refs(w, spec, ns)
    if refs and spec.get("selector") is not None:
        raise w.error("spec.selector", "set either selector or targetRefs, not both")
    policy = f"{ns}/{obj.meta.name}"
    rules = tuple(
        _jwt_rule(w, f"spec.jwtRules[{i}]", i, r, policy)
        for i, r in enumerate(_list(w, "spec.jwtRules", spec.get("jwtRules")))
    )
    return CompiledRequestAuthn(
        namespace=ns,
        name=obj.meta.name,
        api_version=obj.api_version,
        match_labels=labels,
        target_refs=refs,
        rules=rules,
        resource_version=obj.meta.resource_version,
    )
