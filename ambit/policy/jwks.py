"""JWK Sets: the public keys a RequestAuthentication rule verifies tokens with, parsed and
checked once (`parse_jwks`: public asymmetric keys only, with joserfc), and how a rule's keys
are found (inline `jwks`, or a resolver for `jwksUri` files the waypoint loaded). Pure."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key

from ambit import AmbitError
from ambit.policy.match import JwtRule

# Envoy's jwt_authn implements these plus HS256/384/512; ambit takes no shared secrets.
ALGORITHMS: Mapping[str, str] = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
    "EdDSA": "OKP",
}
_HMAC = ("HS256", "HS384", "HS512")
_KEY_TYPES = ("RSA", "EC", "OKP")


class JwksError(AmbitError):
    """A JWK Set cannot be used: not JSON, no `keys`, or a key that is bad, symmetric or private."""


@dataclass(frozen=True)
class _Jwk:
    kid: str | None  # as published; a key without one fits every token's kid (as in Envoy)
    alg: str | None
    use: str | None
    key: Key = field(compare=False)


class Jwks:
    """A parsed JWK Set of public keys (`parse_jwks`); what a key resolver returns."""

    def __init__(self, keys: Sequence[_Jwk]) -> None:
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def candidates(self, alg: str, kid: str | None) -> Iterator[_Jwk]:
        """The keys that may have signed a token with this `alg` and `kid`."""
        kty = ALGORITHMS.get(alg)
        for k in self.keys:
            if k.key.key_type != kty or (k.use not in (None, "sig")) or (k.alg not in (None, alg)):
                continue
            if kid is not None and k.kid is not None and k.kid != kid:
                continue
            yield k


def parse_jwks(text: str) -> Jwks:
    """A JWK Set (RFC 7517) as JSON text -> `Jwks`; JwksError saying what is wrong.

    Used at compile time for inline `jwks` and by the waypoint for `jwksUri` files.
    """
    try:
        doc = json.loads(text)
    except (TypeError, ValueError) as e:
        raise JwksError(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "keys" not in doc:
        raise JwksError('not a JWK Set: expected a JSON object {"keys": [...]}')
    raw = doc["keys"]
    if not isinstance(raw, list) or not raw:
        raise JwksError("`keys` must be a non-empty list of JWKs")
    keys = []
    for i, k in enumerate(raw):
        where = f"keys[{i}]"
        if not isinstance(k, dict):
            raise JwksError(f"{where}: expected a JSON object (a JWK)")
        kty = k.get("kty")
        if kty == "oct":
            raise JwksError(f"{where}: symmetric keys (kty oct) are not accepted: a shared secret in "
                            "a policy is readable by everyone who can read policies; publish a public key")
        if kty not in _KEY_TYPES:
            raise JwksError(f"{where}: kty {kty!r} is not one of {', '.join(_KEY_TYPES)}")
        if "d" in k:
            raise JwksError(f"{where}: this is a private key (it has `d`); publish only the public key")
        for name in ("kid", "alg", "use"):
            if name in k and not isinstance(k[name], str):
                raise JwksError(f"{where}.{name}: expected a string")
        if "alg" in k and k["alg"] not in ALGORITHMS:
            raise JwksError(f"{where}.alg: {k['alg']!r} is not one of {', '.join(ALGORITHMS)}")
        try:
            key = JWKRegistry.import_key(dict(k))
        except (JoseError, ValueError, TypeError, KeyError) as e:
            raise JwksError(f"{where}: not a valid {kty} key ({e or type(e).__name__})") from None
        keys.append(_Jwk(k.get("kid"), k.get("alg"), k.get("use"), key))
    return Jwks(keys)


@functools.lru_cache(maxsize=256)
def _inline_jwks(text: str) -> Jwks | None:
    try:
        return parse_jwks(text)
    except JwksError:
        return None  # compile_policy refuses these; a hand-made rule gets "no keys"


KeyResolver = Callable[[JwtRule], Jwks | None]


def _keys_for(rule: JwtRule, resolver: KeyResolver | None) -> Jwks | None:
    if rule.jwks:
        return _inline_jwks(rule.jwks)
    return resolver(rule) if resolver is not None else None
