"""One request at the gateway, from its listener to the verdict: the gateway's pipeline. Pure
(the clocks, the rate limiter's buckets and the backend pickers are passed in).

In order, each step either answers the request or hands it on:

1. listener: the one of the connection's port that serves the Host (on HTTPS, the Host
   must belong to the listener SNI chose: else 421); none: 404;
2. route: the HTTPRoute rule that matches (gateway.routes), or none (404, after step 5);
3. CORS preflight, for a rule with a CORS filter: answered here (204 or 403);
4. JWT (RequestAuthentication, `ambit.policy.authenticate`): a present but invalid
   token is 401 (403 for a wrong audience);
5. authorization (AuthorizationPolicy, `ambit.policy.authorize_http`) with the client's
   address (`remoteIpBlocks`, `ipBlocks`), the verified JWT (`requestPrincipals`,
   `request.auth.claims[...]`), method, path, host and headers: 403. Istio's gateways
   check these before routing, so ambit does too: a route never answers a request that
   policy denies;
6. the rule: a rule the gateway cannot serve is 500; a redirect is answered (3xx);
7. input validation: header count and size (431), content type (415), a declared
   body over the limit (413; a longer body is cut off by the engine);
8. rate limits (RateLimitPolicy): 429 with Retry-After and RateLimit-* fields;
9. a backend (weighted), and the request's edits: header modifiers, URL rewrite, the
   client's address in X-Forwarded-For/-Proto and Forwarded, the JWT's header edits;
   the response's: header modifiers, CORS, RateLimit-*; timeouts and retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl

from ambit.policy import (
    ConnectionFacts,
    DryRun,
    HttpFacts,
    KeyResolver,
    authenticate,
    authorize_http,
)
from ambit.snapshot import Snapshot
from gateway import cors
from gateway.backends import Unreachable, WeightedPicker
from gateway.filters import HeaderOps, header_ops, redirect_location, rewrite_path, split_host
from gateway.listeners import client_address
from gateway.ratelimit import Limit, RateLimiter
from gateway.routes import BackendRef, Rule, Selected, select
from gateway.view import GatewayView
from waypoint.exchange import Request
from waypoint.headers import joined

DENIED_BODY = b"RBAC: access denied"
# why a request was answered at the gateway (the metric's `reason` label, the access log's)
Rejection = Literal["no_listener", "misdirected", "no_route", "cors_refused", "jwt_invalid", "denied",
                    "route_error", "headers_too_large", "unsupported_media_type", "body_too_large",
                    "rate_limited", "backend_unavailable"]


@dataclass(frozen=True)
class Connection:
    """What the gateway knows of the client's connection."""

    peer: str  # the TCP peer's address
    port: int  # the listener port it connected to
    tls: bool
    sni_listener: str | None = None  # HTTPS: the listener the handshake picked by SNI


@dataclass
class Judgement:
    """The outcome for one request, and the facts its telemetry tells."""

    action: Literal["forward", "answer"] = "answer"
    status: int = 0
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()  # of a local answer
    decision: Literal["allow", "deny"] = "deny"
    rejection: Rejection | None = None
    reason: str = ""
    client_ip: str = ""
    client_from: str = ""
    listener: str | None = None
    route: str | None = None  # ns/name
    rule: int | None = None
    # what decided: the AuthorizationPolicy (or RequestAuthentication rule), or for a request a
    # later step answered, that step's object (the route, the RateLimitPolicy)
    policy: str | None = None
    policy_rule: int | None = None
    allowed_by: str | None = None  # the AuthorizationPolicy rule that let it past step 5
    dry_run: tuple[DryRun, ...] = ()  # what dry-run policies would have decided at step 5
    request_principal: str | None = None
    subject: str | None = None  # the JWT's sub
    limit: str | None = None  # the rate limit that refused
    # forward:
    backend: BackendRef | None = None
    remove_headers: tuple[str, ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_response_headers: tuple[str, ...] = ()
    add_response_headers: tuple[tuple[str, str], ...] = ()
    target: str | None = None  # the rewritten request target
    authority: str | None = None  # the rewritten host
    max_body: int | None = None
    timeout: float | None = None
    retry_attempts: int = 0
    retry_codes: frozenset[int] = frozenset()
    retry_backoff: float = 0.0

    def answer(self, status: int, rejection: Rejection | None, reason: str, body: bytes = b"",
               headers: tuple[tuple[str, str], ...] = (), *, allowed: bool = False) -> Judgement:
        self.action, self.status, self.rejection, self.reason = "answer", status, rejection, reason
        self.body, self.headers = body, headers
        self.decision = "allow" if allowed else "deny"
        return self


@dataclass
class Context:
    """The mutable things a decision uses, owned by the gateway process."""

    limiter: RateLimiter
    pickers: dict[str, WeightedPicker] = field(default_factory=dict)  # by rule ref (reset per view)
    keys: KeyResolver | None = None


def decide(view: GatewayView, snap: Snapshot, conn: Connection, req: Request, ctx: Context, *,
           now: float, mono: float) -> Judgement:
    """Judge one request (see the module docstring)."""
    j = Judgement()
    gw = view.gateway
    # one value per name, repeated fields joined as the waypoint joins them: JWT, CORS, routes
    # and policy all see everything the backend will receive, never one copy of it
    headers = joined(req.headers)
    j.client_ip, j.client_from = client_address(conn.peer, req.header("x-forwarded-for"),
                                                gw.num_trusted_proxies if gw else 0)
    if gw is None or view.subject is None:
        return j.answer(503, "no_listener", "the gateway has no Gateway (class ambit-ingress) or no pod yet")
    # 1. listener
    port = gw.ports.get(conn.port)
    host, _ = split_host(req.authority)
    listener = port.listener_for(host) if port is not None else None
    if listener is None:
        return j.answer(404, "no_listener", f"no listener on port {conn.port} serves host {host!r}",
                        b"404 Not Found: no listener serves this host\n")
    j.listener = listener.name
    if conn.tls and conn.sni_listener != listener.name:
        # an unknown handshake listener (its certificate context was rebuilt since) is no
        # proof either: the client reconnects and its new handshake names one
        chose = conn.sni_listener or "a listener no longer known"
        return j.answer(421, "misdirected", f"host {host!r} belongs to listener {listener.name}, but the TLS "
                        f"handshake (SNI) chose {chose}", b"421 Misdirected Request\n")
    # 2. route
    query: dict[str, str] = {}
    for k, v in parse_qsl(req.query or "", keep_blank_values=True):
        query.setdefault(k, v)
    sel = select(view.routes.get(listener.name, ()), host, req.method, req.path, query, headers)
    if sel is not None:
        j.route, j.rule = sel.route.uid, sel.rule.index
    rule = sel.rule if sel is not None else None
    # 3. CORS preflight
    if rule is not None and rule.cors is not None and cors.is_preflight(req.method, headers):
        p = cors.preflight(rule.cors, headers)
        return j.answer(p.status, "cors_refused" if p.status != 204 else None, p.reason, b"", p.headers,
                        allowed=p.status == 204)
    # 4. JWT
    authn = authenticate(snap.policies.jwt_rules(view.subject), headers, req.target, now=now, keys=ctx.keys)
    if not authn.ok:
        j.policy = authn.rule
        return j.answer(authn.status, "jwt_invalid", authn.reason, authn.reason.encode(),
                        (("www-authenticate", authn.www_authenticate(req.authority)),))
    if authn.auth is not None:
        j.request_principal = authn.auth.principal
        sub = authn.auth.claims.get("sub")
        j.subject = sub if isinstance(sub, str) else None
    # 5. authorization, with the client's address as the gateway judged it
    facts = ConnectionFacts(j.client_ip, None, view.subject, listener.port, False)
    policy_headers = {**{n: v for n, v in headers.items() if n != "x-forwarded-for"},
                      "x-forwarded-for": j.client_ip}
    d = authorize_http(facts, HttpFacts(req.method, req.path, req.authority, policy_headers, auth=authn.auth),
                       snap.policies)
    j.policy, j.policy_rule, j.dry_run = d.policy, d.rule, d.dry_run
    if not d.allowed:
        return j.answer(403, "denied", d.reason, DENIED_BODY)
    j.allowed_by = f"{d.policy} rule {d.rule}" if d.policy else None
    # from here on, the route decides (or the rate limit, step 8)
    j.policy, j.policy_rule = (sel.route.uid, sel.rule.index) if sel is not None else (None, None)
    # 6. the rule
    if sel is None or rule is None:
        return j.answer(404, "no_route", f"no route of listener {listener.name} matches {req.method} "
                        f"{host}{req.path}", b"404 Not Found: no route matches\n")
    if rule.error is not None:
        return j.answer(500, "route_error", f"{rule.ref}: {rule.error}", b"500 Internal Server Error\n")
    if rule.redirect is not None:
        location = redirect_location(rule.redirect, scheme="https" if conn.tls else "http",
                                     authority=req.authority, path=req.path, query=req.query,
                                     listener_port=listener.port, match=sel.match)
        return j.answer(rule.redirect.status, None, f"redirect to {location}", b"", (("location", location),),
                        allowed=True)
    # 7. input validation
    problem = _validate(rule, gw.max_request_body, req)
    if problem is not None:
        status, rejection, why = problem
        return j.answer(status, rejection, why, f"{status} {why}\n".encode())
    j.max_body = rule.limits.max_body if rule.limits.max_body is not None else gw.max_request_body
    # 8. rate limits
    limits = [(limit, _key(limit, j.client_ip, authn.auth.claims if authn.auth else {}, headers))
              for rl in view.rate_limits if rl.applies((view.namespace, view.name), sel.route.uid)
              for limit in rl.limits]
    rate = ctx.limiter.check(limits, mono)
    if not rate.allowed:
        assert rate.denied_by is not None
        j.limit = rate.denied_by.ref
        j.policy, j.policy_rule = rate.denied_by.policy, None
        return j.answer(429, "rate_limited", f"over {rate.denied_by.ref} ({rate.denied_by.describe()})",
                        b"429 Too Many Requests\n", (("retry-after", str(rate.retry_after)), *rate.headers))
    # 9. the backend and the edits
    picker = ctx.pickers.get(rule.ref)
    if picker is None or picker.backends != rule.backends:
        picker = ctx.pickers[rule.ref] = WeightedPicker(rule.backends)
    try:
        j.backend = picker.pick()
    except Unreachable as e:
        return j.answer(500, "route_error", f"{rule.ref}: {e}", b"500 Internal Server Error\n")
    _edits(j, rule, sel, conn, req, authn.remove_headers, authn.set_headers, headers)
    j.add_response_headers += rate.headers
    j.action, j.decision, j.status = "forward", "allow", 0
    j.policy, j.policy_rule = d.policy, d.rule  # an allowed request: the policy that allowed it
    j.reason = d.reason
    return j


def _validate(rule: Rule, default_body: int, req: Request) -> tuple[int, Rejection, str] | None:
    lim = rule.limits
    if lim.max_header_count is not None and len(req.headers) > lim.max_header_count:
        return 431, "headers_too_large", f"{len(req.headers)} header fields, over the route's {lim.max_header_count}"
    if lim.max_header_bytes is not None:
        size = sum(len(n) + len(v) + 4 for n, v in req.headers)
        if size > lim.max_header_bytes:
            return 431, "headers_too_large", f"{size} bytes of header fields, over the route's {lim.max_header_bytes}"
    length = req.header("content-length")
    # HTTP/2 frames a body without either field: the engine says whether one may follow
    has_body = req.has_body or req.header("transfer-encoding") is not None or (
        length is not None and length.strip() not in ("", "0"))
    if lim.content_types and has_body:
        ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
        if not any(ctype == t or (t.endswith("/*") and ctype.startswith(t[:-1])) for t in lim.content_types):
            return (415, "unsupported_media_type",
                    f"content type {ctype or '(none)'!r} is not one of {', '.join(lim.content_types)}")
    limit = lim.max_body if lim.max_body is not None else default_body
    if length is not None and length.strip().isdigit() and int(length) > limit:
        return 413, "body_too_large", f"a body of {int(length)} bytes, over {limit}"
    return None


def _key(limit: Limit, client_ip: str, claims: Mapping[str, object], headers: Mapping[str, str]) -> str:
    """The bucket key of a request for `limit`; the client's address when its claim or header is missing."""
    if limit.key_type == "Claim":
        v = claims.get(limit.key_name)
        if isinstance(v, str | int) and not isinstance(v, bool):
            return f"claim:{claims.get('iss')}\0{v}"  # the same `sub` of two issuers: two clients
    elif limit.key_type == "Header":
        hv = headers.get(limit.key_name)
        if hv:
            return f"header:{hv}"
    return f"ip:{client_ip}"


def _edits(j: Judgement, rule: Rule, sel: Selected, conn: Connection, req: Request,
           jwt_remove: tuple[str, ...], jwt_set: tuple[tuple[str, str], ...], headers: Mapping[str, str]) -> None:
    scheme = "https" if conn.tls else "http"
    xff = headers.get("x-forwarded-for")
    fwd = headers.get("forwarded")
    node = f'"[{conn.peer}]"' if ":" in conn.peer else conn.peer
    ops = HeaderOps(
        ("x-forwarded-for", "x-forwarded-proto", "forwarded", *jwt_remove, *(n for n, _ in jwt_set)),
        (("x-forwarded-for", f"{xff}, {conn.peer}" if xff else conn.peer),
         ("x-forwarded-proto", scheme),
         ("forwarded", f"{fwd}, for={node};proto={scheme}" if fwd else f"for={node};proto={scheme}"),
         *jwt_set),
    ) + header_ops(rule.request_headers)
    if rule.rewrite is not None:
        if rule.rewrite.path is not None:
            path = rewrite_path(req.path, rule.rewrite.path, sel.match)
            j.target = path if req.query is None else f"{path}?{req.query}"
        if rule.rewrite.hostname is not None:
            j.authority = rule.rewrite.hostname
    resp = header_ops(rule.response_headers)
    if rule.cors is not None:
        extra = cors.response_headers(rule.cors, headers.get("origin"))
        resp = resp + HeaderOps(cors.OWNED_RESPONSE_HEADERS, extra)
    j.remove_headers, j.add_headers = ops.remove, ops.add
    j.remove_response_headers, j.add_response_headers = resp.remove, resp.add
    j.timeout = rule.backend_timeout or rule.timeout
    if rule.retry is not None:
        j.retry_attempts, j.retry_codes, j.retry_backoff = rule.retry.attempts, rule.retry.codes, rule.retry.backoff

