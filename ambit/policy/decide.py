"""Decisions: an L4 connection at the ztunnel, an HTTP request at a waypoint, the mTLS mode.

Pure functions of their arguments (facts about the connection or request and a
`PolicySet`), so they are tested by tables. Order: STRICT mTLS, the waypoint, CUSTOM,
DENY, then ALLOW (default deny once one applies), else allow.

A CUSTOM rule that matches asks its provider (an external authorizer) where the deciding
proxy can: a waypoint configured with it gets `Decision.custom` to ask before it lets
the request through; anywhere else the rule denies. Dry-run policies never decide:
what each would have decided is in `Decision.dry_run`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ambit.policy.facts import (
    AnyOf,
    ConnectionFacts,
    CustomCheck,
    Decision,
    DryRun,
    HttpFacts,
)
from ambit.policy.index import PolicySet
from ambit.policy.jwt import RequestAuth
from ambit.policy.match import (
    _HEADER_KEY,
    CompiledAuthz,
    CompiledRule,
    Entry,
    FieldMatch,
    IpAddress,
    _attr_words,
    claim_path,
)
from ambit.policy.mtls import mtls_policy

if TYPE_CHECKING:
    pass

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
            return ident.principal if ident else None
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
            # The client's address as the mesh verified it, never X-Forwarded-For: the
            # client writes that header itself. (Istio reads it only with numTrustedProxies,
            # which ambit does not offer.)
            return _ip_or_none(f.src_ip)
        if attr == "request.host":
            return h.host or self.header("host")
        if attr == "request.method":
            return h.method
        if attr == "request.path":
            return h.path
        m = _HEADER_KEY.match(attr)
        if m:
            return self.header(m.group(1))
        if attr.startswith("request.auth."):
            return _auth_attr(attr, h.auth)
        # connection.sni: the waypoint terminates no TLS of the client's.
        return None

    def header(self, name: str) -> str | None:
        low = name.lower()
        if low.startswith(":") and self.http is not None:
            # request.experimental.inline.headers[:authority] and friends: HTTP/2 pseudo-headers
            return {":authority": self.http.host or self.header("host"), ":method": self.http.method,
                    ":path": self.http.path}.get(low) or None
        for k, v in self.http.headers.items() if self.http else ():
            if k.lower() == low:
                return v
        return None


def _auth_attr(attr: str, auth: RequestAuth | None) -> object:
    """`request.auth.*` as Istio reads them; None for a request without a (valid) token."""
    if auth is None:
        return None
    if attr == "request.auth.principal":
        return auth.principal
    if attr == "request.auth.audiences":
        return AnyOf(auth.audiences)
    if attr == "request.auth.presenter":
        return auth.presenter or None
    v: object = auth.claims
    for name in claim_path(attr):
        if not isinstance(v, Mapping) or name not in v:
            return None
        v = v[name]
    if isinstance(v, str):
        return v
    if isinstance(v, list | tuple):
        # Istio matches a list claim (groups, scopes) when one of its strings matches.
        return AnyOf(x for x in v if isinstance(x, str))
    return None  # numbers, booleans and objects match no string, as in Istio


def _ip_or_none(s: str | None) -> IpAddress | None:
    if not s:
        return None
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def _show(v: object) -> str:
    if isinstance(v, AnyOf):
        return "[" + ", ".join(v) + "]"
    if isinstance(v, tuple):
        return "/".join(str(x) for x in v)
    return str(v)


def _first_hit(fm: FieldMatch, value: object) -> int | None:
    exact = fm.exact
    if exact is not None:
        # Empty strings never match, as in the slow path.
        return exact.get(value) if value != "" else None
    for i, m in enumerate(fm.values):
        if m.matches(value):
            return i
    return None


def _match_field(fm: FieldMatch, attrs: _Attrs) -> str | None:
    """Explanation when the field matches, None when it does not."""
    value = attrs.get(fm.attr)
    hit: int | None = None
    if isinstance(value, AnyOf):
        for v in value:
            hit = _first_hit(fm, v)
            if hit is not None:
                value = v
                break
    else:
        hit = _first_hit(fm, value)
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
    """Explanation when the entry matches; fields this proxy cannot evaluate are skipped (a
    caller that must not match more than written checks `CompiledRule.blind_fields` first)."""
    parts = []
    for fm in e.fields:
        if (fm.l7 and l4_only) or fm.unsupported:
            continue
        why = _match_field(fm, attrs)
        if why is None:
            return None
        parts.append(why)
    if not parts:
        return (f"{e.path} has only HTTP fields, ignored at L4" if l4_only
                else f"{e.path} has only fields ambit cannot evaluate, ignored")
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


def _blind_words(r: CompiledRule, l4: bool) -> str:
    """Why fields of `r` are not evaluated here."""
    blind = r.blind_fields(l4)
    if l4:
        return f"HTTP fields ({', '.join(blind)}) that the ztunnel cannot see"
    return f"fields no ambit proxy evaluates ({', '.join(blind)})"


def _evaluate(
    applicable: Sequence[CompiledAuthz], attrs: _Attrs, l4: bool, subject: str,
    providers: Collection[str] = (),
) -> Decision:
    notes: list[str] = []
    custom: list[CustomCheck] = []
    # 0. CUSTOM (Istio asks it first): a matching rule asks the policy's provider where this
    # proxy can (a waypoint configured with it); anywhere else the rule denies, as Istio's
    # waypoints deny for a provider they do not know. Unevaluated fields are ignored, so a
    # CUSTOM rule matches more, never less.
    for p in applicable:
        if p.action != "CUSTOM":
            continue
        for r in p.rules:
            why = _match_rule(r, attrs, l4_only=l4)
            if why is None:
                continue
            if r.blind_fields(l4):
                notes.append(f"{p.ref} rule {r.index} uses {_blind_words(r, l4)}; they were ignored, "
                             "so it matches more than written")
            if not l4 and p.provider in providers:
                custom.append(CustomCheck(p.provider, p.ref, r.index, why))
                break
            where = ("the ztunnel cannot ask an external authorizer" if l4
                     else f"its provider {p.provider!r} is not configured at this waypoint")
            return Decision(
                False, "DENY", p.ref, r.index,
                f"denied by CUSTOM policy {p.ref} rule {r.index}: {why}; {where}, so its rules deny",
                tuple(notes),
            )
    d = _evaluate_deny_allow(applicable, attrs, l4, subject, notes)
    if custom and d.allowed:
        return replace(d, custom=tuple(custom))
    return d


def _evaluate_deny_allow(
    applicable: Sequence[CompiledAuthz], attrs: _Attrs, l4: bool, subject: str, notes: list[str]
) -> Decision:
    # 1. DENY: any matching rule denies. Fields this proxy cannot evaluate (at L4 the HTTP
    # ones) are ignored, so a DENY written for HTTP denies more, never less (as Istio's ztunnel).
    for p in applicable:
        if p.action != "DENY":
            continue
        for r in p.rules:
            why = _match_rule(r, attrs, l4_only=l4)
            if why is not None:
                if r.blind_fields(l4):
                    notes.append(
                        f"{p.ref} rule {r.index} uses {_blind_words(r, l4)}; they were ignored, "
                        "so it denies more than written"
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
            if r.unsupported_fields:
                notes.append(
                    f"{p.ref} rule {r.index} needs fields no ambit proxy evaluates "
                    f"({', '.join(r.unsupported_fields)}), so it cannot allow"
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
    if via_waypoint:
        # the peer is a waypoint that serves dst (its own, or one of a Service it backs); it
        # evaluated the dry-run policies too
        return Decision(
            True, "ALLOW", None, None,
            f"allowed: arrived through {f'waypoint {dst.waypoint}' if dst.waypoint else 'its service waypoint'}, "
            f"which enforces {dst.uid}'s policies",
        )
    if dst.waypoint:
        return Decision(
            False, "DENY", None, None,
            f"denied: {dst.uid} uses waypoint {dst.waypoint}; connections must come through it",
        )
    attrs = _Attrs(facts, None)
    d = _evaluate(policies.applicable(dst), attrs, l4=True, subject=dst.uid)
    return _with_dry_run(d, policies, attrs, l4=True, providers=())


def authorize_http(
    facts: ConnectionFacts, http: HttpFacts, policies: PolicySet, *, providers: Collection[str] = ()
) -> Decision:
    """Decide one HTTP request at a waypoint, with the original client's identity in `facts`.

    Every policy that selects the destination (mesh, namespace, selector,
    targetRefs to its Service or to the waypoint) applies with all its fields.
    `providers`: the extension providers this waypoint can ask; a matching CUSTOM rule of
    one of them is returned in `Decision.custom` (the caller asks it), of any other denies.
    """
    attrs = _Attrs(facts, http)
    d = _evaluate(
        policies.applicable(facts.dst, at_waypoint=True), attrs, l4=False, subject=facts.dst.uid,
        providers=providers,
    )
    return _with_dry_run(d, policies, attrs, l4=False, providers=providers)


def authorize_opaque(facts: ConnectionFacts, policies: PolicySet, *, providers: Collection[str] = ()) -> Decision:
    """Decide a connection at a waypoint that is not HTTP (or was not HTTP soon enough to tell).

    It goes through only when nothing that judges requests applies: no rule with HTTP
    fields, no RequestAuthentication (its token checks and header cleaning would be
    skipped), and no matching CUSTOM rule (its provider judges requests). Otherwise the
    policies decide it as a request without HTTP attributes.
    """
    need = [f"{p.ref} rule {r.index}" for p in policies.applicable(facts.dst, at_waypoint=True)
            for r in p.rules if r.l7_fields]
    need += [r.where for r in policies.jwt_rules(facts.dst)]
    if need:
        return Decision(False, "DEFAULT", None, None,
                        f"not HTTP, and rules that need HTTP apply ({', '.join(need)}): the connection is denied")
    d = authorize_http(facts, HttpFacts("", "", ""), policies, providers=providers)
    if d.allowed and d.custom:
        c = d.custom[0]
        return replace(d, allowed=False, action="DENY", policy=c.policy, rule=c.rule, custom=(),
                       reason=f"not HTTP, and CUSTOM {c.policy} rule {c.rule} matched: its provider "
                              f"{c.provider} judges requests only, so the connection is denied")
    return d


def _with_dry_run(
    d: Decision, policies: PolicySet, attrs: _Attrs, *, l4: bool, providers: Collection[str]
) -> Decision:
    """`d` with what each dry-run policy in scope would have decided: the decision had it been
    enforced alongside the enforced ones (its providers are not asked)."""
    dst = attrs.facts.dst
    dry = policies.applicable_dry_run(dst, at_waypoint=not l4)
    if not dry:
        return d
    every = policies.applicable_all(dst, at_waypoint=not l4)
    out = []
    for p in dry:
        w = _evaluate([q for q in every if not q.dry_run or q is p], attrs, l4, dst.uid, providers)
        out.append(DryRun(p.ref, w.rule if w.policy == p.ref else None, "allow" if w.allowed else "deny",
                          w.reason))
    return replace(d, dry_run=tuple(out))


def check(
    facts: ConnectionFacts,
    policies: PolicySet,
    *,
    http: HttpFacts | None = None,
    via_waypoint: bool = False,
    providers: Collection[str] | None = None,
) -> Decision:
    """`ambit policy check`: decide where the mesh would. A destination with a waypoint is
    judged as its waypoint judges (with `http`, all fields; without, as an empty request, so
    HTTP-only rules do not match); one without is judged by its ztunnel at L4, and `http` is
    ignored with a note, since no proxy on the path sees HTTP. `providers`: the extension
    providers the waypoint has; None (not known here, e.g. asked of a ztunnel): a matching
    CUSTOM rule is reported in `custom`, with a note that it denies if the waypoint lacks it."""
    dst = facts.dst
    if dst.waypoint and not via_waypoint:
        mtls = authorize(facts, policies, via_waypoint=True)
        if not mtls.allowed:
            return mtls  # refused before any waypoint logic (STRICT mTLS)
        named = {p.provider for p in policies.applicable(dst, at_waypoint=True) if p.action == "CUSTOM"}
        d = authorize_http(facts, http or HttpFacts("", "", ""), policies,
                           providers=named if providers is None else providers)
        notes = [f"judged at waypoint {dst.waypoint}, which enforces {dst.uid}'s policies"]
        if providers is None and d.custom:
            notes.append(f"the waypoint asks {', '.join(sorted({c.provider for c in d.custom}))} if it has them "
                         "configured; if it has not, their CUSTOM rules deny")
        return replace(d, notes=(*notes, *d.notes))
    d = authorize(facts, policies, via_waypoint=via_waypoint)
    if http is not None and (http.method or http.path or http.host):
        note = f"{dst.uid} has no waypoint: the method/path/host were not evaluated (L4 only)"
        return replace(d, notes=(*d.notes, note))
    return d

