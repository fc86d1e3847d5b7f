"""Validation and compilation of `AuthorizationPolicy`, `PeerAuthentication` and
`RequestAuthentication`, read verbatim.

Pure. `compile_policy` validates an object strictly (every error names the
object, the field path and, where it can, what was meant) and compiles it into
the matchers of `ambit.policy.match`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from ambit.cluster import PolicyObject
from ambit.policy.jwt import JwksError, parse_jwks
from ambit.policy.match import (
    _CLAIM_KEY,
    _HEADER_KEY,
    ACTIONS,
    API_VERSIONS,
    GATEWAY_GROUP,
    L4_WHEN_KEYS,
    L7_WHEN_KEYS,
    MTLS_MODES,
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
    """Validate one AuthorizationPolicy, PeerAuthentication or RequestAuthentication and compile it.

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
# RequestAuthentication

_JWT_RULE_FIELDS = (
    "issuer", "audiences", "jwks", "jwksUri", "fromHeaders", "fromParams", "fromCookies",
    "forwardOriginalToken", "outputPayloadToHeader", "outputClaimToHeaders", "spaceDelimitedClaims",
)
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
    if uri.startswith("file://"):
        file = uri[len("file://"):]
    elif uri.startswith("/"):
        file = uri
    elif uri.split("://", 1)[0] in ("http", "https"):
        raise w.error(
            path,
            f"{uri!r}: ambit does not fetch keys over HTTP(S); it reads jwksUri from a file on the "
            "waypoint's node (an absolute path or a file:// URL). Put the keys inline in `jwks`, "
            "or mount them as a file",
        )
    else:
        file = ""
    if not file.startswith("/") or "\0" in file:
        raise w.error(path, f"{uri!r} is not an absolute file path or a file:///... URL")
    return file


def _jwt_rule(w: _Where, path: str, index: int, raw: object, policy: str) -> JwtRule:
    r = _mapping(w, path, raw)
    if "timeout" in r:
        raise w.error(
            f"{path}.timeout",
            "timeout applies to fetching jwksUri over HTTP; ambit reads jwksUri from a file, so "
            "there is nothing to time out: remove it",
        )
    _known(w, path, r, _JWT_RULE_FIELDS)
    issuer = _string(w, f"{path}.issuer", r.get("issuer"), required=True)
    audiences = _strings(w, f"{path}.audiences", r.get("audiences"))
    jwks = _string(w, f"{path}.jwks", r.get("jwks"))
    jwks_uri = _string(w, f"{path}.jwksUri", r.get("jwksUri"))
    if jwks and jwks_uri:
        raise w.error(f"{path}.jwksUri", "set either jwks (the keys inline) or jwksUri (a file), not both")
    if not jwks and not jwks_uri:
        raise w.error(
            path,
            "`jwks` (a JWK Set, inline) or `jwksUri` (a file with one) is required; ambit does not "
            "discover keys from the issuer's OpenID configuration",
        )
    if jwks:
        try:
            parse_jwks(jwks)
        except JwksError as e:
            raise w.error(f"{path}.jwks", str(e)) from None
    jwks_path = _jwks_path(w, f"{path}.jwksUri", jwks_uri) if jwks_uri else ""
    headers: list[HeaderLocation] = []
    for i, h in enumerate(_list(w, f"{path}.fromHeaders", r.get("fromHeaders"))):
        hp = f"{path}.fromHeaders[{i}]"
        hm = _mapping(w, hp, h)
        _known(w, hp, hm, ("name", "prefix"))
        headers.append(HeaderLocation(_header_name(w, f"{hp}.name", hm.get("name")),
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
