"""Request authentication: the JWTs of one HTTP request, checked against the `JwtRule`s in force.

Pure (no clock, no files): the waypoint passes the request's headers and path, the
rules `PolicySet.jwt_rules` gives it, a resolver for keys it loaded from `jwksUri`
files, and `now`. Istio's semantics, as its waypoints (Envoy's jwt_authn filter, the
way istiod configures it) apply them:

- a request without a token passes: policies decide (`requestPrincipals: ["*"]`
  needs one);
- every rule looks for tokens in its locations (`fromHeaders`, `fromParams`,
  `fromCookies`; when none is named, `Authorization: Bearer` and `?access_token=`);
- the request is authenticated by the first rule (by issuer) that found tokens and
  for which every one of them is valid; a token is valid for a rule when its `iss`
  is the rule's issuer, it is in time (`nbf`/`exp`, 60 s of clock skew), one of its
  `aud` is among the rule's audiences (when it names any), and a key of the rule's
  JWK Set that fits its `kid` and `alg` verifies its signature;
- otherwise a present token is rejected: 401 with Envoy's reason ("Jwt issuer is
  not configured", "Jwt is expired", ...), 403 for "Audiences in Jwt are not
  allowed", as Envoy answers.

Only asymmetric algorithms are accepted (RS*, PS*, ES256/384/512, EdDSA): `none`
and HMAC never verify, and a JWK Set with a symmetric or a private key is refused.
Signatures are checked with joserfc.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from joserfc.errors import JoseError
from joserfc.jws import JWSRegistry

from ambit.policy.jwks import _HMAC, ALGORITHMS, Jwks, KeyResolver, _keys_for
from ambit.policy.match import JwtRule

CLOCK_SKEW_SECONDS = 60
# Envoy's (jwt_verify_lib's) words, so operators find them in Istio's documentation.
MISSING_ISSUER = "Jwt issuer is not configured"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
VERIFICATION_FAILS = "Jwt verification fails"
NO_MATCHING_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
KEYS_NOT_LOADED = "Jwks remote fetch is failed"
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature"
BAD_HEADER = "Jwt header is an invalid Base64url input or an invalid JSON"
BAD_ALG = "Jwt header [alg] field is not a string"
UNSUPPORTED_ALG = "Jwt header [alg] field value is invalid"
BAD_KID = "Jwt header [kid] field is not a string"
BAD_PAYLOAD = "Jwt payload is an invalid Base64 or an invalid JSON"
BAD_SIGNATURE_ENCODING = "Jwt signature is an invalid Base64"


# ---------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class RequestAuth:
    """The facts of a verified JWT that policies read (`request.auth.*`)."""

    principal: str  # "<iss>/<sub>", what requestPrincipals match
    claims: Mapping[str, Any] = field(default_factory=dict, hash=False)
    audiences: tuple[str, ...] = ()
    presenter: str = ""  # `azp`
    rule: str = ""  # "ns/name jwtRules[i]" that accepted the token


@dataclass(frozen=True)
class AuthnResult:
    """What to do with the request. `ok`: forward it (with `auth` when a token was verified,
    after applying the header edits); otherwise reply `status` with `reason` as
    the body and `www_authenticate(...)` as the WWW-Authenticate header."""

    ok: bool
    auth: RequestAuth | None = None
    status: int = 200
    reason: str = ""
    rule: str | None = None  # "ns/name jwtRules[i]" that decided, for logs
    remove_headers: tuple[str, ...] = ()  # lower-cased names, removed before `set_headers`
    set_headers: tuple[tuple[str, str], ...] = ()

    def www_authenticate(self, realm: str) -> str:
        """Envoy's challenge for a rejected token; `realm` is the request's URI."""
        return f'Bearer realm="{realm}", error="invalid_token"'


# ---------------------------------------------------------------------------
# the token


@dataclass(frozen=True)
class _Found:
    where: Literal["header", "param", "cookie"]
    name: str
    token: str


@dataclass(frozen=True)
class _Parsed:
    alg: str
    kid: str | None
    claims: Mapping[str, Any] = field(hash=False)
    signing_input: bytes
    signature: bytes
    payload_segment: str


class _Invalid(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _b64(segment: str) -> bytes:
    if "=" in segment:
        raise ValueError("padded")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(segment: str) -> dict[str, Any]:
    try:
        v = json.loads(_b64(segment))
    except RecursionError:  # '[[[[...' nested deeper than the parser recurses
        raise ValueError("nested too deeply") from None
    if not isinstance(v, dict):
        raise ValueError("not an object")
    return v


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _parse(token: str) -> _Parsed | str:
    """The token's parts, or the reason it is malformed (Envoy's words)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return BAD_FORMAT
    h, p, s = parts
    try:
        header = _json_object(h)
    except (ValueError, binascii.Error):
        return BAD_HEADER
    alg = header.get("alg")
    if not isinstance(alg, str):
        return BAD_ALG
    if alg not in ALGORITHMS and alg not in _HMAC:
        return UNSUPPORTED_ALG  # also `none`
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return BAD_KID
    if "crit" in header or "b64" in header:
        # RFC 7797's unencoded payloads change what the signature covers; Envoy knows none.
        return UNSUPPORTED_ALG
    try:
        claims = _json_object(p)
    except (ValueError, binascii.Error):
        return BAD_PAYLOAD
    for name in ("iss", "sub", "jti", "azp"):
        if name in claims and not isinstance(claims[name], str):
            return f"Jwt payload [{name}] field is not a string"
    for name in ("iat", "nbf", "exp"):
        if name in claims and not _is_number(claims[name]):
            return f"Jwt payload [{name}] field is not a number"
    aud = claims.get("aud")
    if aud is not None and not isinstance(aud, str) and not (
        isinstance(aud, list) and all(isinstance(a, str) for a in aud)
    ):
        return "Jwt payload [aud] field is not a string or a list of strings"
    try:
        sig = _b64(s)
    except (ValueError, binascii.Error):
        return BAD_SIGNATURE_ENCODING
    return _Parsed(alg, kid, claims, f"{h}.{p}".encode(), sig, p)


def _audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    return tuple(aud) if isinstance(aud, list) else ()


def _sanitize_audience(a: str) -> str:
    # As jwt_verify_lib's CheckAudience: the scheme and a trailing slash do not count.
    for scheme in ("http://", "https://"):
        if a.startswith(scheme):
            a = a[len(scheme):]
            break
    return a.removesuffix("/")


def _verify_signature(parsed: _Parsed, keys: Jwks) -> str | None:
    """None when a key verifies the signature; else the reason."""
    if parsed.alg not in ALGORITHMS:
        return NO_MATCHING_KEY  # HMAC: ambit holds no symmetric keys
    algorithm = JWSRegistry.algorithms[parsed.alg]
    tried = False
    for k in keys.candidates(parsed.alg, parsed.kid):
        tried = True
        try:
            algorithm.check_key(k.key)  # the key type, curve and use fit the algorithm
            if algorithm.verify(parsed.signing_input, parsed.signature, k.key):
                return None
        except (JoseError, ValueError, TypeError):
            continue
    return VERIFICATION_FAILS if tried else NO_MATCHING_KEY


def _check(token: str, rule: JwtRule, resolver: KeyResolver | None, now: float) -> _Parsed | str:
    """The parsed token when it is valid for `rule`, else the reason it is not."""
    parsed = _parse(token)
    if isinstance(parsed, str):
        return parsed
    c = parsed.claims
    if c.get("iss") != rule.issuer:
        return MISSING_ISSUER
    if "nbf" in c and now + CLOCK_SKEW_SECONDS < c["nbf"]:
        return NOT_YET_VALID
    if "exp" in c and now > c["exp"] + CLOCK_SKEW_SECONDS:
        return EXPIRED
    if rule.audiences:
        allowed = {_sanitize_audience(a) for a in rule.audiences}
        if not any(_sanitize_audience(a) in allowed for a in _audiences(c)):
            return AUDIENCE_NOT_ALLOWED
    keys = _keys_for(rule, resolver)
    if keys is None or not len(keys):
        return KEYS_NOT_LOADED
    why = _verify_signature(parsed, keys)
    return parsed if why is None else why


# ---------------------------------------------------------------------------
# finding tokens


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            out[name] = value
    return out


def _tokens(rule: JwtRule, headers: Mapping[str, str], params: Mapping[str, str],
            cookies: Mapping[str, str]) -> list[_Found]:
    from_headers, from_params, from_cookies = rule.locations
    out: list[_Found] = []
    for loc in from_headers:
        value = headers.get(loc.name)
        if value is None:
            continue
        if loc.prefix:
            # Envoy looks for the prefix anywhere in the value and takes what follows it.
            at = value.find(loc.prefix)
            if at < 0:
                continue
            value = value[at + len(loc.prefix):]
        value = value.strip()
        if value:
            out.append(_Found("header", loc.name, value))
    for name in from_params:
        if params.get(name):
            out.append(_Found("param", name, params[name]))
    for name in from_cookies:
        if cookies.get(name):
            out.append(_Found("cookie", name, cookies[name]))
    return out


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    if name in claims:
        return claims[name]
    v: Any = claims
    for part in name.split("."):  # nested claims, as Envoy: "a.b"
        if not isinstance(v, Mapping) or part not in v:
            return None
        v = v[part]
    return v


def _header_value(v: Any) -> str | None:
    """A claim as a header value, as Envoy writes it: strings, numbers and booleans only."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and v >= 0 else repr(v)
    if isinstance(v, str):
        return v or None
    return None


def _normalized(claims: Mapping[str, Any], rule: JwtRule) -> dict[str, Any]:
    # Istio lists space-delimited claims (`scope`, `permission` and the rule's own
    # spaceDelimitedClaims) as lists, so `request.auth.claims[scope]` matches one scope.
    out = dict(claims)
    for name in ("scope", "permission", *rule.space_delimited_claims):
        v = out.get(name)
        if isinstance(v, str):
            out[name] = v.split()
    return out


def output_headers(rules: Sequence[JwtRule]) -> tuple[str, ...]:
    """The headers only a verified token may set (`outputPayloadToHeader`,
    `outputClaimToHeaders`): removed from every request the rules apply to, so a
    client never gets to forge them, even on a request that is not checked."""
    return tuple(dict.fromkeys(
        h for r in rules for h in (r.output_payload_to_header, *(c.header for c in r.output_claim_to_headers)) if h
    ))


def authenticate(
    rules: Sequence[JwtRule],
    headers: Mapping[str, str],
    path: str,
    *,
    now: float,
    keys: KeyResolver | None = None,
) -> AuthnResult:
    """Authenticate one request against the JWT rules in force for its destination.

    `headers` maps header names (matched lower-cased) to values; `path` is the
    request target with its query string; `now` is the time in epoch seconds; `keys`
    resolves the keys of rules with a `jwksUri` (inline `jwks` are read from the rule;
    a rule whose keys are not available rejects every token it checks).
    """
    if not rules:
        return AuthnResult(ok=True)
    low = {k.lower(): v for k, v in headers.items()}
    query = path.partition("?")[2]
    params: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        params.setdefault(k, v)
    cookies = _cookies(low.get("cookie"))
    sanitize = output_headers(rules)
    ordered = sorted(rules, key=lambda r: (r.issuer, r.policy, r.index))
    found = [(r, _tokens(r, low, params, cookies)) for r in ordered]
    if not any(ts for _, ts in found):
        return AuthnResult(ok=True, remove_headers=sanitize)

    results: dict[tuple[str, int], _Parsed | str] = {}
    for n, (rule, ts) in enumerate(found):
        for t in ts:
            results[(t.token, n)] = _check(t.token, rule, keys, now)
    for n, (rule, ts) in enumerate(found):
        if ts and all(not isinstance(results[(t.token, n)], str) for t in ts):
            first = results[(ts[0].token, n)]
            assert isinstance(first, _Parsed)
            return _accepted(rule, ts, first, sanitize)

    # Rejected: say why the token failed where it was meant to be checked (by the
    # rule of its own issuer), else that no rule takes its issuer.
    failures = [(rule, why) for n, (rule, ts) in enumerate(found) for t in ts
                if isinstance(why := results[(t.token, n)], str)]
    rule, why = next(((r, w) for r, w in failures if w != MISSING_ISSUER), failures[0])
    status = 403 if why == AUDIENCE_NOT_ALLOWED else 401
    return AuthnResult(ok=False, status=status, reason=why,
                       rule=rule.where if why != MISSING_ISSUER else None)


def _accepted(rule: JwtRule, tokens: Sequence[_Found], parsed: _Parsed, sanitize: tuple[str, ...]) -> AuthnResult:
    c = parsed.claims
    set_headers: list[tuple[str, str]] = []
    if rule.output_payload_to_header:
        set_headers.append((rule.output_payload_to_header, parsed.payload_segment))
    for ch in rule.output_claim_to_headers:
        v = _header_value(_claim(c, ch.claim))
        if v is not None:
            set_headers.append((ch.header, v))
    remove_headers = list(sanitize)
    if not rule.forward_original_token:
        # As Envoy: the token's header goes; a query parameter or a cookie stays.
        for t in tokens:
            if t.where == "header" and t.name not in remove_headers:
                remove_headers.append(t.name)
    azp = c.get("azp")
    auth = RequestAuth(
        principal=f"{c.get('iss', '')}/{c.get('sub', '')}",
        claims=_normalized(c, rule),
        audiences=_audiences(c),
        presenter=azp if isinstance(azp, str) else "",
        rule=rule.where,
    )
    return AuthnResult(ok=True, auth=auth, rule=rule.where, remove_headers=tuple(remove_headers),
                       set_headers=tuple(set_headers))
