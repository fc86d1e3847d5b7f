"""Gateway API's CORS filter: preflights answered at the gateway, CORS headers on responses. Pure.

A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) to a rule with
a CORS filter is answered here, before authentication (a browser never sends
credentials on a preflight): an allowed origin, method and header list gets 204 with
the origin echoed in `Access-Control-Allow-Origin`; anything else gets 403 without CORS
headers, so the browser refuses the real request. An actual request from an allowed
origin gets `Access-Control-Allow-Origin` (and `-Expose-Headers`, `-Allow-Credentials`)
on its response; from another origin, none. Every answer carries `Vary: Origin`. The
filter owns these headers: the backend's own `Access-Control-*` response headers are
removed on a rule with a CORS filter (a backend echoing any origin would otherwise widen
what the route's filter allows).

Origins match exactly (scheme, host and port), by `*` (any), or by a host wildcard
(`https://*.example.com` matches any name below example.com, on https). With no
`allowMethods`, the CORS-safelisted methods (GET, HEAD, POST) are allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.routes import Cors

SAFELISTED_METHODS = ("GET", "HEAD", "POST")
# the response headers the filter owns on a rule that has one (the backend's are removed)
OWNED_RESPONSE_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials",
                          "access-control-expose-headers", "access-control-allow-methods",
                          "access-control-allow-headers", "access-control-max-age",
                          "access-control-allow-private-network")


@dataclass(frozen=True)
class Preflight:
    status: int  # 204 allowed, 403 refused
    headers: tuple[tuple[str, str], ...]
    reason: str


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers


def origin_allowed(cors: Cors, origin: str) -> bool:
    o = origin.lower().rstrip("/")
    for allowed in cors.allow_origins:
        if allowed == "*" or allowed == o:
            return True
        if "://*." in allowed:
            scheme, _, rest = allowed.partition("://*.")
            oscheme, _, ohost = o.partition("://")
            if oscheme == scheme and ohost.endswith("." + rest) and len(ohost) > len(rest) + 1:
                return True
    return False


def preflight(cors: Cors, headers: Mapping[str, str]) -> Preflight:
    """Answer a preflight per the rule's CORS policy (`headers`: lower-cased names)."""
    origin = headers.get("origin", "")
    method = headers.get("access-control-request-method", "").strip().upper()
    wanted = [h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()]
    vary = ("vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers")
    if not origin_allowed(cors, origin):
        return Preflight(403, (vary,), f"CORS: origin {origin!r} is not allowed")
    methods = cors.allow_methods or SAFELISTED_METHODS
    if "*" not in methods and method not in methods:
        return Preflight(403, (vary,), f"CORS: method {method!r} is not allowed from {origin}")
    refused = [h for h in wanted if "*" not in cors.allow_headers and h not in cors.allow_headers]
    if refused:
        return Preflight(403, (vary,), f"CORS: header(s) {', '.join(refused)} not allowed from {origin}")
    out = [
        ("access-control-allow-origin", origin),
        ("access-control-allow-methods", method if "*" in methods else ", ".join(methods)),
        ("access-control-max-age", str(cors.max_age)),
        vary,
    ]
    if wanted:
        out.append(("access-control-allow-headers", ", ".join(wanted)))
    if cors.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    return Preflight(204, tuple(out), f"CORS preflight from {origin} allowed")


def response_headers(cors: Cors, origin: str | None) -> tuple[tuple[str, str], ...]:
    """The CORS headers an actual request's response gets."""
    if not origin or not origin_allowed(cors, origin):
        return (("vary", "Origin"),)
    out = [("access-control-allow-origin", origin), ("vary", "Origin")]
    if cors.expose_headers:
        out.append(("access-control-expose-headers", ", ".join(cors.expose_headers)))
    if cors.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    return tuple(out)
