"""What ambit enforces of each accepted policy, and where: per object and per field.

Pure. ambit accepts every policy Istio's validation accepts, including shapes no ambit
proxy (or no proxy on a given path) can evaluate. Nothing of it is silently dropped, and
nothing fails open: each part is

- `enforced`: as written, at L4 by the ztunnel and at a waypoint alike;
- `waypoint`: as written where a waypoint decides (HTTP attributes, JWTs); a workload
  without one is judged by its ztunnel, which cannot see them, stricter than written (an
  ALLOW rule that needs them never matches; a DENY rule ignores them and matches more);
- `stricter`: evaluated by no ambit proxy, handled stricter than written everywhere (the
  same two rules; a CUSTOM policy's rules deny where its provider cannot be asked; a JWT
  rule without usable keys refuses the tokens it checks);
- `no-effect`: about something ambit does not have (a ServiceEntry, a gateway class that
  is no waypoint's), so it applies to no traffic.

An object's `status` is its least enforced part (`partial` when some of its targets have
no effect and others do); `policy_status` computes it from the compiled policy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ambit.cluster import INGRESS_CLASS
from ambit.policy.jwks import JwksError, parse_jwks
from ambit.policy.match import (
    WAYPOINT_CLASSES,
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRequestAuthn,
    CompiledRule,
    Entry,
    FieldMatch,
    JwtRule,
    PortMatch,
)

How = Literal["enforced", "waypoint", "stricter", "no-effect"]
Status = Literal["enforced", "waypoint", "stricter", "partial", "no-effect"]
# Statuses of objects of which some part is enforced by no ambit proxy as written: what
# `ambit_policies_not_fully_enforced` counts. (`waypoint` parts are enforced as written
# wherever a waypoint decides, as in Istio ambient.)
NOT_FULLY_ENFORCED: tuple[Status, ...] = ("stricter", "partial", "no-effect")
_RANK = {"enforced": 0, "waypoint": 1, "stricter": 2, "partial": 3, "no-effect": 4}


@dataclass(frozen=True)
class FieldStatus:
    """One part of a policy (a field path as written) and what ambit does with it."""

    path: str
    how: How
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.path, "how": self.how, "detail": self.detail}


@dataclass(frozen=True)
class PolicyStatus:
    status: Status
    summary: str  # one sentence, for `ambit policies`
    fields: tuple[FieldStatus, ...]
    dry_run: bool = False

    @property
    def fully_enforced(self) -> bool:
        return self.status not in NOT_FULLY_ENFORCED


def policy_status(p: CompiledPolicy, root_namespace: str) -> PolicyStatus:
    """What ambit enforces of `p`, per field, and the object's status."""
    if isinstance(p, CompiledAuthz):
        return _authz(p, root_namespace)
    if isinstance(p, CompiledPeerAuthn):
        return _peer_authn(p, root_namespace)
    return _request_authn(p, root_namespace)


def _object(fields: list[FieldStatus], summaries: dict[How, str], default: str,
            dry_run: bool = False) -> PolicyStatus:
    """The object's status from its parts: the least enforced; targets are `partial` unless all
    of them have no effect (then the whole object has none)."""
    targets = [f for f in fields if ".targetRef" in f.path]
    dead = [f for f in targets if f.how == "no-effect"]
    if targets and len(dead) == len(targets):
        status: Status = "no-effect"
        summary = dead[0].detail
    else:
        worst: Status = "enforced"
        summary = default
        for f in fields:
            s: Status = "partial" if f.how == "no-effect" else f.how
            if _RANK[s] > _RANK[worst]:
                worst, summary = s, (f"{f.path}: {f.detail}" if s == "partial" else summaries.get(f.how, f.detail))
        status = worst
    if dry_run:
        summary = "dry-run: evaluated and logged, never enforced" + ("" if status == "enforced" else f"; {summary}")
    return PolicyStatus(status, summary, tuple(fields), dry_run)


# ---------------------------------------------------------------------------
# AuthorizationPolicy


def _targets(p: CompiledAuthz | CompiledRequestAuthn, root: str) -> list[FieldStatus]:
    out: list[FieldStatus] = []
    for i, ref in enumerate(p.target_refs):
        path = f"spec.targetRefs[{i}]"
        if ref.kind == "Service":
            out.append(FieldStatus(path, "enforced", (
                f"the endpoints of Service {ref.name}: at their waypoint when they use one, else by their "
                "ztunnel at L4 (Istio enforces a Service target only at a waypoint: stricter)")))
        elif ref.kind == "Gateway":
            out.append(FieldStatus(path, "enforced", f"traffic through waypoint {ref.name}, at that waypoint"))
        elif ref.kind == "GatewayClass":
            if p.namespace != root:
                out.append(FieldStatus(path, "no-effect", (
                    f"a GatewayClass target applies only from the root namespace {root} (as in Istio)")))
            elif ref.name in WAYPOINT_CLASSES:
                out.append(FieldStatus(path, "enforced", "every waypoint, at the waypoint (never an ingress gateway)"))
            elif ref.name == INGRESS_CLASS:
                out.append(FieldStatus(path, "enforced", f"every ingress gateway (class {INGRESS_CLASS})"))
            else:
                out.append(FieldStatus(path, "no-effect", (
                    f"no ambit gateway has class {ref.name} (waypoints are {' or '.join(WAYPOINT_CLASSES)}, "
                    f"ingress gateways {INGRESS_CLASS})")))
        else:
            out.append(FieldStatus(path, "no-effect", (
                f"ServiceEntry {ref.name}: ambit does not model ServiceEntries, so the traffic to its hosts is "
                "not told apart and this target applies to nothing (traffic to hosts outside the mesh passes "
                "through without this policy)")))
    return out


def _blind(action: str, index: int, where: str) -> str:
    """What becomes of rule `index` where a field of it cannot be evaluated (`where`)."""
    if action == "ALLOW":
        return f"{where}: rule {index} never matches there (allows less: stricter)"
    if action == "AUDIT":
        return f"{where}: rule {index} ignores it (AUDIT never decides)"
    verb = "denies" if action == "DENY" else "matches (and denies)"
    return f"{where}: it is ignored, so rule {index} {verb} whatever its other fields match (stricter)"


def _field(p: CompiledAuthz, rule: CompiledRule, e: Entry, f: FieldMatch) -> FieldStatus:
    path = f"{e.path}.{f.name}"
    if f.unsupported:
        what = ("the TLS SNI of the client's own connection" if f.attr == "connection.sni"
                else "Envoy filter metadata: ambit runs no Envoy filters")
        return FieldStatus(path, "stricter", _blind(p.action, rule.index, f"not evaluated by ambit ({what})"))
    if f.l7:
        return FieldStatus(path, "waypoint", "enforced at a waypoint; " + _blind(
            p.action, rule.index, "a workload without one is judged by its ztunnel, which cannot see it"))
    if any(isinstance(m, PortMatch) and m.port == 0 for m in f.values):
        zero = "matches nothing" if not f.negate else "excludes nothing"
        return FieldStatus(path, "enforced", f"at L4 and at a waypoint; port 0 is no connection's, so it {zero}")
    return FieldStatus(path, "enforced", "at L4 (ztunnel) and at a waypoint")


def _authz(p: CompiledAuthz, root: str) -> PolicyStatus:
    fields = _targets(p, root)
    if p.action == "CUSTOM":
        fields.append(FieldStatus("spec.provider", "stricter", (
            f"provider {p.provider!r} is asked per request by a waypoint configured with it "
            "(--extension-provider); at a ztunnel, and at a waypoint without it, the rules deny "
            "what they match (as Istio does when the provider is not configured)")))
    elif p.action == "AUDIT":
        fields.append(FieldStatus("spec.action", "enforced", "AUDIT never decides; ambit notes it in decisions"))
    for r in p.rules:
        for group in (r.sources or (), r.operations or (), r.conditions):
            for e in group:
                fields.extend(_field(p, r, e, f) for f in e.fields)
    if p.action == "ALLOW" and not p.rules:
        fields.append(FieldStatus("spec.rules", "enforced", "no rules: allows nothing (denies what it selects)"))
    summaries: dict[How, str] = {
        "waypoint": "HTTP fields enforced at a waypoint; where a workload has none, its ztunnel enforces "
                    "the rest, stricter",
        "stricter": ("CUSTOM: its provider is asked at waypoints that have it, elsewhere its rules deny"
                     if p.action == "CUSTOM" else "fields no ambit proxy evaluates are handled stricter "
                     "than written"),
    }
    if any(f.how == "stricter" and f.path != "spec.provider" for f in fields) and p.action == "CUSTOM":
        summaries["stricter"] += "; fields no ambit proxy evaluates are handled stricter"
    return _object(fields, summaries, "enforced at L4 and at waypoints, as written", p.dry_run)


# ---------------------------------------------------------------------------
# PeerAuthentication, RequestAuthentication


def _peer_authn(p: CompiledPeerAuthn, root: str) -> PolicyStatus:
    fields: list[FieldStatus] = []
    if p.match_labels is not None and p.namespace == root:
        fields.append(FieldStatus("spec.selector", "no-effect",
                                  "a selector policy in the root namespace is ignored (as in Istio)"))
        return PolicyStatus("no-effect", fields[0].detail, tuple(fields))
    modes = [("spec.mtls.mode", p.mode), *((f"spec.portLevelMtls.{k}", v) for k, v in sorted(p.port_modes.items()))]
    for path, mode in modes:
        if mode == "DISABLE":
            fields.append(FieldStatus(path, "enforced", (
                "DISABLE: plaintext is accepted, as with PERMISSIVE (Istio ambient cannot disable mTLS either)")))
        elif mode != "UNSET":
            fields.append(FieldStatus(path, "enforced", f"{mode}: by the ztunnel and the kernel (eBPF)"))
    return PolicyStatus("enforced", "enforced by the ztunnel and the kernel, as written", tuple(fields))


def _keys(rule: JwtRule) -> str | None:
    """Why the rule has no keys to verify with, or None when it has (or reads a file)."""
    if rule.jwks:
        try:
            parse_jwks(rule.jwks)
        except JwksError as e:
            return f"its inline keys are not used ({e})"
        return None
    if rule.jwks_path:
        return None
    if rule.jwks_uri:
        return f"ambit does not fetch keys over HTTP(S) ({rule.jwks_uri}); mount them as a file or inline them"
    return "no keys: ambit does not discover keys from the issuer's OpenID configuration"


def _request_authn(p: CompiledRequestAuthn, root: str) -> PolicyStatus:
    fields = _targets(p, root)
    for r in p.rules:
        path = f"spec.jwtRules[{r.index}]"
        why = _keys(r)
        if not r.issuer:
            fields.append(FieldStatus(f"{path}.issuer", "stricter", (
                "no issuer: ambit matches tokens to rules by issuer, so every token this rule would take is "
                "refused (401 Jwt issuer is not configured)")))
        if why is not None:
            fields.append(FieldStatus(f"{path}.jwks" if r.jwks else f"{path}.jwksUri", "stricter", (
                f"{why}: tokens from {r.issuer or 'this rule'} are refused (401 Jwks remote fetch is failed, as "
                "Envoy answers when it cannot get keys); requests without a token are not affected")))
        else:
            if r.jwks and r.jwks_uri:
                fields.append(FieldStatus(f"{path}.jwksUri", "enforced", "ignored: the inline jwks are used"))
            fields.append(FieldStatus(path, "waypoint", f"tokens from {r.issuer} are checked at a waypoint"))
    if not p.rules:
        fields.append(FieldStatus("spec.jwtRules", "enforced", "no rules: no token is accepted or refused"))
    summaries: dict[How, str] = {
        "waypoint": "JWTs are checked at a waypoint (a workload without one has no HTTP to check)",
        "stricter": "some tokens cannot be verified by ambit and are refused",
    }
    return _object(fields, summaries, "JWTs are checked at a waypoint")
