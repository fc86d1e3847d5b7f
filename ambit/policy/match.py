"""The compiled form of Istio's security policies: matchers, rules and compiled objects.

Pure. Every value a policy can name compiles into one small matcher that keeps
its `raw` text for explanations; `CompiledAuthz`, `CompiledPeerAuthn` and
`CompiledRequestAuthn` (with its `JwtRule`s) are what `compile_policy` produces
and what the index, the decisions and `ambit.policy.jwt` read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, get_args

from ambit import AmbitError
from ambit.cluster import WAYPOINT_CLASS

# What a compiled AuthorizationPolicy does. CUSTOM asks its `provider` (an external
# authorizer) at a waypoint that has it configured; anywhere else its rules deny.
Action = Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"]
# PeerAuthentication's mTLS modes, as written; UNSET inherits from the level above.
MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
ACTIONS: tuple[str, ...] = get_args(Action)
MTLS_MODES: tuple[MtlsMode, ...] = get_args(MtlsMode)
DEFAULT_ROOT_NAMESPACE = "istio-system"
GATEWAY_GROUP = "gateway.networking.k8s.io"
ISTIO_NETWORKING_GROUP = "networking.istio.io"
# The GatewayClasses whose gateways are waypoints: ambit's own, and Istio's name for it, so a
# mesh-wide `targetRefs: [{kind: GatewayClass, name: istio-waypoint}]` works unchanged.
WAYPOINT_CLASSES = (WAYPOINT_CLASS, "istio-waypoint")
# `metadata.annotations` Istio reads on policies
DRY_RUN_ANNOTATION = "istio.io/dry-run"
ALWAYS_REJECT_ANNOTATION = "istio.io/always-reject"

# `when` keys a ztunnel can evaluate without parsing HTTP (same set as istiod
# sends to ztunnel); every other key is an HTTP attribute.
L4_WHEN_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "source.serviceAccount", "destination.ip",
     "destination.port"}
)
# Every other key Istio accepts. `request.auth.*` are the facts of the request's JWT,
# verified at the waypoint against the RequestAuthentications in force
# (`ambit.policy.jwt`); a request without a token has none of them, so their
# `values` never match and their `notValues` always do.
L7_WHEN_KEYS = frozenset(
    {
        "remote.ip",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    }
)
# Keys Istio accepts that no ambit proxy can evaluate: the TLS SNI of the client's own
# connection (a waypoint sees the client's traffic inside HBONE, and Istio's ztunnel does
# not read it either), and Envoy filters' dynamic metadata (ambit runs no Envoy filters).
# A rule that uses one is handled stricter than written (see FieldMatch.unsupported).
UNSUPPORTED_WHEN_KEYS = frozenset({"connection.sni"})
_HEADER_KEY = re.compile(r"^request\.(?:experimental\.inline\.)?headers\[([^\[\]]+)\]$")
_ENVOY_FILTER_KEY = re.compile(r"^experimental\.envoy\.filters\.[^\[]*\[.+\]$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims\[[^\]]+\](\[[^\]]+\])*$")
_CLAIM_PART = re.compile(r"\[([^\]]+)\]")


def claim_path(key: str) -> tuple[str, ...]:
    """`request.auth.claims[a][b]` -> ("a", "b"): the nested claim a condition names."""
    return tuple(_CLAIM_PART.findall(key))


class PolicyError(AmbitError):
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
    "request.auth.audiences": "request audience",
    "request.auth.presenter": "request presenter",
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
    if attr.startswith("request.auth.claims["):
        return "claim " + ".".join(claim_path(attr))
    return _ATTR_WORDS.get(attr, attr)


@dataclass(frozen=True)
class FieldMatch:
    """One field of an entry, e.g. `notPrincipals`: any value matching (or none, when negated)."""

    name: str  # as written: "principals", "notPorts", "values"
    attr: str  # the attribute it reads: "source.principal", "destination.port", ...
    negate: bool
    l7: bool  # needs HTTP parsing (a waypoint) to be evaluated
    values: tuple[Matcher, ...]
    # Accepted (Istio accepts it) but evaluated by no ambit proxy: a rule that uses it is
    # handled as an HTTP field is at L4, everywhere (ALLOW: the rule never matches; DENY and
    # CUSTOM: the field is ignored, so the rule matches more). Always also `l7`.
    unsupported: bool = False

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

    @property
    def unsupported_fields(self) -> tuple[str, ...]:
        return tuple(f"{self.path}.{f.name}" for f in self.fields if f.unsupported)


@dataclass(frozen=True)
class CompiledRule:
    """`rules[index]`: every present clause must match; each of `from`/`to` is an OR of entries."""

    index: int
    sources: tuple[Entry, ...] | None  # None: no `from`, any source
    operations: tuple[Entry, ...] | None  # None: no `to`, any operation
    conditions: tuple[Entry, ...]  # `when`: all must match

    @cached_property
    def l7_fields(self) -> tuple[str, ...]:
        """Fields a ztunnel cannot evaluate (HTTP attributes, and the unsupported ones)."""
        out: list[str] = []
        for group in (self.sources or (), self.operations or (), self.conditions):
            for e in group:
                out.extend(e.l7_fields)
        return tuple(out)

    @cached_property
    def unsupported_fields(self) -> tuple[str, ...]:
        """Fields no ambit proxy evaluates (a subset of `l7_fields`)."""
        out: list[str] = []
        for group in (self.sources or (), self.operations or (), self.conditions):
            for e in group:
                out.extend(e.unsupported_fields)
        return tuple(out)

    def blind_fields(self, l4: bool) -> tuple[str, ...]:
        """The fields the proxy deciding cannot evaluate: at L4 `l7_fields`, at a waypoint
        `unsupported_fields`."""
        return self.l7_fields if l4 else self.unsupported_fields


@dataclass(frozen=True)
class TargetRef:
    kind: str  # "Service" | "Gateway" | "GatewayClass" | "ServiceEntry"
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
    provider: str = ""  # CUSTOM: the extension provider's name
    # `istio.io/dry-run: "true"`: evaluated and reported (access logs, flows, metrics), never enforced
    dry_run: bool = False

    kind = "AuthorizationPolicy"


@dataclass(frozen=True)
class CompiledPeerAuthn(_Named):
    """A valid PeerAuthentication."""

    namespace: str
    name: str
    api_version: str
    match_labels: Mapping[str, str] | None = field(hash=False)
    mode: MtlsMode
    port_modes: Mapping[int, MtlsMode] = field(hash=False)
    resource_version: str = ""

    kind = "PeerAuthentication"


@dataclass(frozen=True)
class HeaderLocation:
    """`fromHeaders[i]`: the token is the header's value after `prefix` (e.g. "Bearer ")."""

    name: str  # lower-cased
    prefix: str = ""


@dataclass(frozen=True)
class ClaimToHeader:
    """`outputClaimToHeaders[i]`: copy a verified token's claim into a request header."""

    header: str  # lower-cased
    claim: str


@dataclass(frozen=True)
class JwtRule:
    """`jwtRules[index]` of a RequestAuthentication: which tokens it accepts and where it finds them.

    Keys are either inline (`jwks`, a JWK Set as JSON text, checked at compile time) or
    in a file on the waypoint's node (`jwks_path`, from `jwksUri`), which the waypoint
    loads and hands to `ambit.policy.jwt.authenticate` through its key resolver.
    """

    policy: str  # "ns/name" of the RequestAuthentication
    index: int
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""
    jwks_uri: str = ""  # as written
    jwks_path: str = ""  # the file `jwks_uri` names
    from_headers: tuple[HeaderLocation, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str = ""  # lower-cased
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    space_delimited_claims: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """How explanations name the rule: `ns/name jwtRules[i]`."""
        return f"{self.policy} jwtRules[{self.index}]"

    @property
    def locations(self) -> tuple[tuple[HeaderLocation, ...], tuple[str, ...], tuple[str, ...]]:
        """(headers, params, cookies) where this rule looks for tokens. As in Istio (and Envoy),
        naming any location replaces the defaults `Authorization: Bearer <token>` and
        `?access_token=<token>`."""
        if self.from_headers or self.from_params or self.from_cookies:
            return self.from_headers, self.from_params, self.from_cookies
        return (HeaderLocation("authorization", "Bearer "),), ("access_token",), ()


@dataclass(frozen=True)
class CompiledRequestAuthn(_Named):
    """A valid RequestAuthentication: the JWT rules that apply to the workloads it selects."""

    namespace: str
    name: str
    api_version: str
    match_labels: Mapping[str, str] | None = field(hash=False)  # None: no selector
    target_refs: tuple[TargetRef, ...]
    rules: tuple[JwtRule, ...]
    resource_version: str = ""

    kind = "RequestAuthentication"


CompiledPolicy = CompiledAuthz | CompiledPeerAuthn | CompiledRequestAuthn

