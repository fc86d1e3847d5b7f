"""Validation and compilation of `AuthorizationPolicy`, `PeerAuthentication` and
`RequestAuthentication`, read verbatim.

Pure. `compile_policy` validates an object strictly (every error names the
object, the field path and, where it can, what was meant) and compiles it into
the matchers of `ambit.policy.match`. The field checks all kinds share are in
`ambit.policy.fields`; RequestAuthentication's JWT rules in `ambit.policy.requestauthn`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

from ambit.cluster import PolicyObject
from ambit.policy.fields import (
    _enum_error,
    _known,
    _labels,
    _mapping,
    _nets,
    _port,
    _ports,
    _str_list,
    _string,
    _target_refs,
    _type_name,
    _Where,
)
from ambit.policy.match import (
    _CLAIM_KEY,
    _ENVOY_FILTER_KEY,
    _HEADER_KEY,
    ACTIONS,
    ALWAYS_REJECT_ANNOTATION,
    API_VERSIONS,
    DRY_RUN_ANNOTATION,
    L4_WHEN_KEYS,
    L7_WHEN_KEYS,
    MTLS_MODES,
    UNSUPPORTED_WHEN_KEYS,
    Action,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRule,
    Entry,
    FieldMatch,
    HostMatch,
    Matcher,
    MtlsMode,
    PathMatch,
    ServiceAccountMatch,
    StringMatch,
)
from ambit.policy.requestauthn import _compile_request_authn

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
