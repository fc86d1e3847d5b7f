"""HTTPRoute (`gateway.networking.k8s.io/v1`): compiled, attached to the gateway's listeners,
and matched per request with Gateway API's precedence. Pure.

A route attaches to a listener through a `parentRef` naming the Gateway (and, with
`sectionName`/`port`, one listener), when the listener admits routes of its namespace
(`allowedRoutes`: Same or All). Among the rules of the routes attached to the listener a
request arrived on, the one that decides is, in order (Gateway API's precedence):

1. the most specific host: an exact route hostname, then the longest wildcard
   (`*.example.com` matches any name below it), then a route without hostnames;
2. the path: `Exact`, then `RegularExpression` (longest pattern first; Gateway API leaves
   regular expressions to the implementation, and ambit lets them win over prefixes, as
   Envoy Gateway does, so `/` does not shadow them), then `PathPrefix` (longest first;
   element-wise: `/api` matches `/api` and `/api/x`, not `/apix`);
3. a method match; 4. more header matches; 5. more query parameter matches;
6. the route's namespace/name alphabetically, then rule and match order.

No rule matches: 404. A rule whose filter or backend the gateway cannot honour (an
unsupported filter type, a backend that is not a Service) stays in place and answers 500,
as Gateway API requires (a rule is never skipped to let a request fall through to another).

Validation limits are not in Gateway API; they are annotations on the HTTPRoute:
`ambit.dev/max-request-body` (bytes or a quantity: 413), `ambit.dev/allowed-content-types`
(media types, `type/*` allowed: 415), `ambit.dev/max-header-count` and
`ambit.dev/max-header-bytes` (431).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambit.cluster import Gateway, Listener, RouteObject
from gateway.spec import Where

GATEWAY_GROUP = "gateway.networking.k8s.io"
MAX_BODY = "ambit.dev/max-request-body"
CONTENT_TYPES = "ambit.dev/allowed-content-types"
MAX_HEADER_COUNT = "ambit.dev/max-header-count"
MAX_HEADER_BYTES = "ambit.dev/max-header-bytes"
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_TYPES = ("Exact", "RegularExpression")
FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "CORS",
           "RequestMirror", "ExtensionRef")
SUPPORTED_FILTERS = FILTERS[:5]
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/([!#$%&'*+.^_`|~0-9a-z-]+|\*)")


# ---------------------------------------------------------------------------
# the compiled form


@dataclass(frozen=True)
class PathMatch:
    kind: str  # Exact | PathPrefix | RegularExpression
    value: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, path: str) -> bool:
        if self.kind == "Exact":
            return path == self.value
        if self.kind == "PathPrefix":
            prefix = self.value.rstrip("/")
            return not prefix or path == prefix or path.startswith(prefix + "/")
        assert self.pattern is not None
        return self.pattern.fullmatch(path) is not None

    @property
    def precedence(self) -> tuple[int, int]:
        return ({"Exact": 3, "RegularExpression": 2, "PathPrefix": 1}[self.kind], len(self.value))


@dataclass(frozen=True)
class ValueMatch:
    """A header (name lower-cased) or query parameter (name as written) match."""

    name: str
    kind: str  # Exact | RegularExpression
    value: str
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind == "Exact":
            return value == self.value
        assert self.pattern is not None
        return self.pattern.fullmatch(value) is not None


@dataclass(frozen=True)
class RouteMatch:
    path: PathMatch
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def matches(self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        return (
            (self.method is None or self.method == method)
            and self.path.matches(path)
            and all(h.matches(headers.get(h.name)) for h in self.headers)
            and all(q.matches(query.get(q.name)) for q in self.query)
        )

    @property
    def precedence(self) -> tuple[int, int, int, int, int]:
        return (*self.path.precedence, self.method is not None, len(self.headers), len(self.query))


@dataclass(frozen=True)
class HeaderEdit:
    """RequestHeaderModifier / ResponseHeaderModifier: names lower-cased."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathModifier:
    kind: str  # ReplaceFullPath | ReplacePrefixMatch
    value: str


@dataclass(frozen=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status: int = 302


@dataclass(frozen=True)
class Rewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True)
class Cors:
    """Gateway API's CORS filter (`HTTPCORSFilter`)."""

    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: int = 5
    allow_credentials: bool = False


@dataclass(frozen=True)
class BackendRef:
    namespace: str
    name: str
    port: int
    weight: int = 1

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class RouteRetry:
    codes: frozenset[int]
    attempts: int
    backoff: float


@dataclass(frozen=True)
class RouteLimits:
    """The route's input validation (annotations); None: no limit of its own."""

    max_body: int | None = None
    content_types: tuple[str, ...] = ()
    max_header_count: int | None = None
    max_header_bytes: int | None = None


@dataclass(frozen=True)
class Rule:
    route: str  # ns/name
    index: int
    matches: tuple[RouteMatch, ...]
    request_headers: HeaderEdit | None = None
    response_headers: HeaderEdit | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    cors: Cors | None = None
    backends: tuple[BackendRef, ...] = ()
    timeout: float | None = None  # timeouts.request
    backend_timeout: float | None = None  # timeouts.backendRequest
    retry: RouteRetry | None = None
    error: str | None = None  # the rule cannot be served as written: its requests get 500
    limits: RouteLimits = RouteLimits()

    @property
    def ref(self) -> str:
        return f"{self.route} rule {self.index}"


@dataclass(frozen=True)
class ParentRef:
    namespace: str
    name: str
    section: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class CompiledRoute:
    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[Rule, ...]
    resource_version: str = ""

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    def attaches_to(self, gw: Gateway, listener: Listener) -> bool:
        """Does a parentRef name this listener of `gw`, and does the listener admit the route?"""
        if listener.allowed_routes == "Same" and self.namespace != gw.meta.namespace:
            return False
        if self.hostnames and listener.hostname and not any(
                hostnames_intersect(h, listener.hostname) for h in self.hostnames):
            return False
        return any(p.namespace == gw.meta.namespace and p.name == gw.meta.name
                   and (p.section is None or p.section == listener.name)
                   and (p.port is None or p.port == listener.port) for p in self.parents)


@dataclass(frozen=True)
class Selected:
    route: CompiledRoute
    rule: Rule
    match: RouteMatch


# ---------------------------------------------------------------------------
# hostnames


def host_matches(pattern: str, host: str) -> bool:
    """A Gateway API hostname (`a.example.com` or `*.example.com`) against a request's host."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def hostnames_intersect(a: str, b: str) -> bool:
    return host_matches(a, b) or host_matches(b, a) or a == b


def host_precedence(pattern: str | None) -> tuple[int, int]:
    if pattern is None:
        return (0, 0)
    return (1, len(pattern)) if pattern.startswith("*.") else (2, len(pattern))


# ---------------------------------------------------------------------------
# selection


def select(routes: Sequence[CompiledRoute], host: str, method: str, path: str,
           query: Mapping[str, str], headers: Mapping[str, str]) -> Selected | None:
    """The rule that decides a request among the routes attached to its listener; None: 404.

    `host` lower-case without its port; `headers` lower-cased names (values of repeated
    fields joined with ", "); `query` the first value of each parameter.
    """
    best: tuple[Any, ...] | None = None
    chosen: Selected | None = None
    for route in sorted(routes, key=lambda r: r.uid):
        if route.hostnames:
            hits = [h for h in route.hostnames if host_matches(h, host)]
            if not hits:
                continue
            hp = max(host_precedence(h) for h in hits)
        else:
            hp = host_precedence(None)
        for rule in route.rules:
            for m in rule.matches:
                if not m.matches(method, path, query, headers):
                    continue
                # higher is better; on a tie the first found (route, rule, match order) stays
                key = (hp, m.precedence)
                if best is None or key > best:
                    best, chosen = key, Selected(route, rule, m)
    return chosen


# ---------------------------------------------------------------------------
# compiling


def compile_route(obj: RouteObject) -> CompiledRoute:
    """Validate and compile one HTTPRoute; SpecError names the field that is wrong."""
    ns, name = obj.meta.namespace, obj.meta.name
    w = Where("HTTPRoute", ns, name)
    spec = w.mapping("spec", obj.spec, allowed=("parentRefs", "hostnames", "rules"))
    parents = []
    for i, p in enumerate(w.list("spec.parentRefs", spec.get("parentRefs"))):
        path = f"spec.parentRefs[{i}]"
        pm = w.mapping(path, p, allowed=("group", "kind", "namespace", "name", "sectionName", "port"))
        if pm.get("kind", "Gateway") != "Gateway" or pm.get("group", GATEWAY_GROUP) != GATEWAY_GROUP:
            raise w.error(f"{path}.kind", f"only a {GATEWAY_GROUP} Gateway can be a parent")
        parents.append(ParentRef(w.string(f"{path}.namespace", pm.get("namespace")) or ns,
                                 str(w.string(f"{path}.name", pm.get("name"), required=True)),
                                 w.string(f"{path}.sectionName", pm.get("sectionName")),
                                 w.integer(f"{path}.port", pm["port"], lo=1, hi=65535) if "port" in pm else None))
    if not parents:
        raise w.error("spec.parentRefs", "is required: name the Gateway the route attaches to")
    hostnames = []
    for i, h in enumerate(w.list("spec.hostnames", spec.get("hostnames"))):
        text = str(w.string(f"spec.hostnames[{i}]", h, required=True)).lower()
        if not _HOSTNAME.fullmatch(text):
            raise w.error(f"spec.hostnames[{i}]", f"{h!r} is not a hostname (a DNS name, or *.name)")
        hostnames.append(text)
    limits = _limits(w, obj.meta.annotations)
    rules = [_rule(w, f"spec.rules[{i}]", r, ns, f"{ns}/{name}", i, limits)
             for i, r in enumerate(w.list("spec.rules", spec.get("rules")))]
    if not rules:
        rules = [Rule(f"{ns}/{name}", 0, (RouteMatch(PathMatch("PathPrefix", "/")),), limits=limits,
                      error="the rule has no backendRefs and no redirect")]
    return CompiledRoute(ns, name, tuple(parents), tuple(hostnames), tuple(rules), obj.meta.resource_version)


def _limits(w: Where, annotations: Mapping[str, str]) -> RouteLimits:
    path = "metadata.annotations"
    body = w.size(f"{path}[{MAX_BODY}]", annotations[MAX_BODY]) if MAX_BODY in annotations else None
    types = []
    for t in (annotations.get(CONTENT_TYPES) or "").split(","):
        t = t.strip().lower()
        if not t:
            continue
        if not _MEDIA_TYPE.fullmatch(t):
            raise w.error(f"{path}[{CONTENT_TYPES}]", f"{t!r} is not a media type (type/subtype or type/*)")
        types.append(t)
    count = (w.integer(f"{path}[{MAX_HEADER_COUNT}]", annotations[MAX_HEADER_COUNT], lo=1, hi=10_000)
             if MAX_HEADER_COUNT in annotations else None)
    size = (w.size(f"{path}[{MAX_HEADER_BYTES}]", annotations[MAX_HEADER_BYTES])
            if MAX_HEADER_BYTES in annotations else None)
    return RouteLimits(body, tuple(types), count, size)


def _rule(w: Where, path: str, raw: object, ns: str, route: str, index: int, limits: RouteLimits) -> Rule:
    r = w.mapping(path, raw, allowed=("name", "matches", "filters", "backendRefs", "timeouts", "retry",
                                      "sessionPersistence"))
    matches = tuple(_match(w, f"{path}.matches[{i}]", m)
                    for i, m in enumerate(w.list(f"{path}.matches", r.get("matches"))))
    matches = matches or (RouteMatch(PathMatch("PathPrefix", "/")),)
    errors: list[str] = []
    if r.get("sessionPersistence") is not None:
        errors.append("sessionPersistence is not supported")
    kinds: dict[str, Any] = {}
    for i, f in enumerate(w.list(f"{path}.filters", r.get("filters"))):
        fp = f"{path}.filters[{i}]"
        fm = w.mapping(fp, f, allowed=("type", "requestHeaderModifier", "responseHeaderModifier",
                                       "requestRedirect", "urlRewrite", "cors", "requestMirror", "extensionRef"))
        kind = w.enum(f"{fp}.type", fm.get("type"), FILTERS, "")
        if kind in kinds and kind != "ExtensionRef":
            raise w.error(f"{fp}.type", f"{kind} appears twice in one rule")
        if kind not in SUPPORTED_FILTERS:
            errors.append(f"filter {kind} is not supported by ambit")
            continue
        field_name = kind[0].lower() + kind[1:] if kind != "URLRewrite" else "urlRewrite"
        if kind == "CORS":
            field_name = "cors"
        kinds[kind] = _filter(w, f"{fp}.{field_name}", kind, fm.get(field_name), matches)
    if "RequestRedirect" in kinds and "URLRewrite" in kinds:
        raise w.error(f"{path}.filters", "RequestRedirect and URLRewrite cannot be in one rule")
    backends = []
    for i, b in enumerate(w.list(f"{path}.backendRefs", r.get("backendRefs"))):
        bp = f"{path}.backendRefs[{i}]"
        bm = w.mapping(bp, b, allowed=("group", "kind", "name", "namespace", "port", "weight", "filters"))
        weight = w.integer(f"{bp}.weight", bm.get("weight"), lo=0, hi=1_000_000, default=1)
        if bm.get("kind", "Service") != "Service" or bm.get("group", "") not in ("", "core"):
            errors.append(f"backendRefs[{i}]: only Services are supported as backends")
            continue
        if bm.get("filters"):
            errors.append(f"backendRefs[{i}].filters are not supported")
            continue
        bns = w.string(f"{bp}.namespace", bm.get("namespace")) or ns
        if bns != ns:
            errors.append(f"backendRefs[{i}]: a Service of another namespace ({bns}) needs a ReferenceGrant, "
                          "which ambit does not support")
            continue
        if "port" not in bm:
            raise w.error(f"{bp}.port", "is required for a Service backend")
        backends.append(BackendRef(bns, str(w.string(f"{bp}.name", bm.get("name"), required=True)),
                                   w.integer(f"{bp}.port", bm["port"], lo=1, hi=65535), weight))
    if "RequestRedirect" not in kinds and not errors:
        if not backends:
            errors.append("the rule has no backendRefs and no redirect")
        elif not any(b.weight for b in backends):
            errors.append("every backendRef has weight 0")
    t = w.mapping(f"{path}.timeouts", r.get("timeouts"), allowed=("request", "backendRequest"))
    timeout = w.duration(f"{path}.timeouts.request", t.get("request"))
    backend_timeout = w.duration(f"{path}.timeouts.backendRequest", t.get("backendRequest"))
    if timeout == 0:  # Gateway API: 0s disables the timeout
        timeout = None
    if backend_timeout == 0:
        backend_timeout = None
    if timeout is not None and backend_timeout is not None and backend_timeout > timeout:
        raise w.error(f"{path}.timeouts.backendRequest", "must not be longer than timeouts.request")
    retry = None
    if r.get("retry") is not None:
        rm = w.mapping(f"{path}.retry", r["retry"], allowed=("codes", "attempts", "backoff"))
        codes = frozenset(w.integer(f"{path}.retry.codes[{i}]", c, lo=400, hi=599)
                          for i, c in enumerate(w.list(f"{path}.retry.codes", rm.get("codes"))))
        retry = RouteRetry(codes, w.integer(f"{path}.retry.attempts", rm.get("attempts"), lo=0, hi=10, default=1),
                           w.duration(f"{path}.retry.backoff", rm.get("backoff")) or 0.0)
    return Rule(route, index, matches, kinds.get("RequestHeaderModifier"), kinds.get("ResponseHeaderModifier"),
                kinds.get("RequestRedirect"), kinds.get("URLRewrite"), kinds.get("CORS"), tuple(backends), timeout,
                backend_timeout, retry, "; ".join(errors) or None, limits)


def _match(w: Where, path: str, raw: object) -> RouteMatch:
    m = w.mapping(path, raw, allowed=("path", "headers", "queryParams", "method"))
    p = w.mapping(f"{path}.path", m.get("path"), allowed=("type", "value"))
    kind = w.enum(f"{path}.path.type", p.get("type"), PATH_TYPES, "PathPrefix")
    value = w.string(f"{path}.path.value", p.get("value")) or "/"
    pattern = None
    if kind == "RegularExpression":
        pattern = _regex(w, f"{path}.path.value", value)
    elif not value.startswith("/") or "?" in value or "#" in value or "//" in value:
        raise w.error(f"{path}.path.value", f"{value!r} must be an absolute path without ?, # or //")
    headers = []
    seen: set[str] = set()
    for i, h in enumerate(w.list(f"{path}.headers", m.get("headers"))):
        vm = _value(w, f"{path}.headers[{i}]", h)
        name = vm.name.lower()
        if not _HEADER_NAME.fullmatch(name):
            raise w.error(f"{path}.headers[{i}].name", f"{vm.name!r} is not a header name")
        if name not in seen:  # Gateway API: only the first entry for a name counts
            seen.add(name)
            headers.append(ValueMatch(name, vm.kind, vm.value, vm.pattern))
    query = []
    seen = set()
    for i, q in enumerate(w.list(f"{path}.queryParams", m.get("queryParams"))):
        vm = _value(w, f"{path}.queryParams[{i}]", q)
        if vm.name not in seen:
            seen.add(vm.name)
            query.append(vm)
    method = m.get("method")
    if method is not None:
        method = w.enum(f"{path}.method", method, METHODS, "GET")
    return RouteMatch(PathMatch(kind, value, pattern), tuple(headers), tuple(query), method)


def _value(w: Where, path: str, raw: object) -> ValueMatch:
    v = w.mapping(path, raw, allowed=("type", "name", "value"))
    kind = w.enum(f"{path}.type", v.get("type"), VALUE_TYPES, "Exact")
    name = str(w.string(f"{path}.name", v.get("name"), required=True))
    value = w.string(f"{path}.value", v.get("value")) or ""
    return ValueMatch(name, kind, value, _regex(w, f"{path}.value", value) if kind == "RegularExpression" else None)


def _regex(w: Where, path: str, value: str) -> re.Pattern[str]:
    try:
        return re.compile(value)
    except re.error as e:
        raise w.error(path, f"{value!r} is not a regular expression: {e}") from None


def _filter(w: Where, path: str, kind: str, raw: object, matches: tuple[RouteMatch, ...]) -> Any:
    if raw is None:
        raise w.error(path, f"is required for a {kind} filter")
    if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        m = w.mapping(path, raw, allowed=("set", "add", "remove"))
        out: dict[str, list[Any]] = {"set": [], "add": []}
        for op in ("set", "add"):
            for i, h in enumerate(w.list(f"{path}.{op}", m.get(op))):
                hm = w.mapping(f"{path}.{op}[{i}]", h, allowed=("name", "value"))
                name = str(w.string(f"{path}.{op}[{i}].name", hm.get("name"), required=True)).lower()
                value = w.string(f"{path}.{op}[{i}].value", hm.get("value")) or ""
                if not _HEADER_NAME.fullmatch(name) or set(value) & set("\r\n\0"):
                    raise w.error(f"{path}.{op}[{i}]", "not a valid header name and value")
                out[op].append((name, value))
        remove = tuple(str(w.string(f"{path}.remove[{i}]", n, required=True)).lower()
                       for i, n in enumerate(w.list(f"{path}.remove", m.get("remove"))))
        return HeaderEdit(tuple(out["set"]), tuple(out["add"]), remove)
    if kind in ("RequestRedirect", "URLRewrite"):
        allowed = (("scheme", "hostname", "path", "port", "statusCode") if kind == "RequestRedirect"
                   else ("hostname", "path"))
        m = w.mapping(path, raw, allowed=allowed)
        modifier = None
        if m.get("path") is not None:
            pm = w.mapping(f"{path}.path", m["path"], allowed=("type", "replaceFullPath", "replacePrefixMatch"))
            pkind = w.enum(f"{path}.path.type", pm.get("type"), ("ReplaceFullPath", "ReplacePrefixMatch"),
                           "ReplaceFullPath")
            value = w.string(f"{path}.path.{pkind[0].lower()}{pkind[1:]}",
                             pm.get(pkind[0].lower() + pkind[1:])) or "/"
            if not value.startswith("/"):
                raise w.error(f"{path}.path", f"{value!r} must start with /")
            if pkind == "ReplacePrefixMatch" and any(x.path.kind != "PathPrefix" for x in matches):
                raise w.error(f"{path}.path.type", "ReplacePrefixMatch needs every match of the rule to be a "
                              "PathPrefix")
            modifier = PathModifier(pkind, value)
        hostname = w.string(f"{path}.hostname", m.get("hostname"))
        if hostname is not None and not _HOSTNAME.fullmatch(hostname.lower()):
            raise w.error(f"{path}.hostname", f"{hostname!r} is not a hostname")
        if kind == "URLRewrite":
            return Rewrite(hostname, modifier)
        scheme = m.get("scheme")
        if scheme is not None:
            scheme = w.enum(f"{path}.scheme", scheme, ("http", "https"), "http")
        port = w.integer(f"{path}.port", m["port"], lo=1, hi=65535) if m.get("port") is not None else None
        status = w.integer(f"{path}.statusCode", m.get("statusCode"), lo=301, hi=308, default=302)
        if status not in (301, 302, 303, 307, 308):
            raise w.error(f"{path}.statusCode", f"{status} is not one of 301, 302, 303, 307, 308")
        return Redirect(scheme, hostname, modifier, port, status)
    # CORS
    m = w.mapping(path, raw, allowed=("allowOrigins", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge",
                                      "allowCredentials"))

    def strings(key: str) -> tuple[str, ...]:
        return tuple(str(w.string(f"{path}.{key}[{i}]", v, required=True))
                     for i, v in enumerate(w.list(f"{path}.{key}", m.get(key))))

    origins = tuple(o.lower().rstrip("/") for o in strings("allowOrigins"))
    for i, o in enumerate(origins):
        if o != "*" and not re.fullmatch(r"https?://(\*\.)?[a-z0-9.-]+(:[0-9]{1,5})?", o):
            raise w.error(f"{path}.allowOrigins[{i}]", f"{o!r} is not an origin (scheme://host[:port], "
                          "a host may start with *.), nor *")
    credentials = m.get("allowCredentials", False)
    if not isinstance(credentials, bool):
        raise w.error(f"{path}.allowCredentials", "expected true or false")
    if credentials and "*" in origins:
        raise w.error(f"{path}.allowOrigins", "* cannot be used with allowCredentials (browsers refuse it)")
    return Cors(origins, tuple(x.upper() for x in strings("allowMethods")),
                tuple(x.lower() for x in strings("allowHeaders")), tuple(x.lower() for x in strings("exposeHeaders")),
                w.integer(f"{path}.maxAge", m.get("maxAge"), lo=0, hi=86400, default=5), credentials)

