"""Request authentication: real keys and tokens (joserfc), checked as Istio's waypoints check them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

from ambit.cluster import build_state, load_documents
from ambit.policy import (
    AuthnResult,
    CompiledRequestAuthn,
    Jwks,
    JwksError,
    JwtRule,
    authenticate,
    compile_policy,
    parse_jwks,
)
from ambit.policy.jwt import BAD_PAYLOAD

NOW = 1_800_000_000
ISS = "https://idp.example"
RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
OTHER_RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})  # same kid, another key
ED = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})


def jwks(*keys: Any) -> str:
    return json.dumps({"keys": [k.as_dict(private=False) for k in keys]})


def rule_yaml(extra: str = "", keys: str | None = None, issuer: str = ISS, name: str = "jwt") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: {name}, namespace: shop}}\n"
        "spec:\n  jwtRules:\n"
        f"  - issuer: {issuer}\n    jwks: '{keys or jwks(RSA, EC, ED)}'\n"
        + "".join(f"    {line}\n" for line in extra.splitlines() if line)
    )


def rules(*docs: str) -> tuple[JwtRule, ...]:
    out: list[JwtRule] = []
    for obj in build_state(load_documents("---\n".join(docs))).policies:
        c = compile_policy(obj)
        assert isinstance(c, CompiledRequestAuthn)
        out.extend(c.rules)
    return tuple(out)


def token(claims: Mapping[str, Any] | None = None, key: Any = RSA, alg: str = "RS256", **header: Any) -> str:
    c = {"iss": ISS, "sub": "alice", "exp": NOW + 300, **(claims or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # EdDSA: RFC 9864 prefers Ed25519; Envoy speaks EdDSA
        return jwt.encode({"alg": alg, "kid": key.kid, **header}, {k: v for k, v in c.items() if v is not None}, key,
                          algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def bearer(t: str) -> dict[str, str]:
    return {"authorization": f"Bearer {t}"}


def run(rs: tuple[JwtRule, ...], headers: Mapping[str, str], path: str = "/", now: float = NOW,
        **kw: Any) -> AuthnResult:
    return authenticate(rs, headers, path, now=now, **kw)


DEFAULT = rules(rule_yaml())
AUD = rules(rule_yaml("audiences: [shop.example, https://pay.example/]"))

# (id, rules, headers, path, now, ok, status, reason piece)
CASES: list[tuple[str, tuple[JwtRule, ...], dict[str, str], str, float, bool, int, str]] = [
    ("rsa-valid", DEFAULT, bearer(token()), "/", NOW, True, 200, ""),
    ("ec-valid", DEFAULT, bearer(token(key=EC, alg="ES256")), "/", NOW, True, 200, ""),
    ("eddsa-valid", DEFAULT, bearer(token(key=ED, alg="EdDSA")), "/", NOW, True, 200, ""),
    ("rs512-valid", DEFAULT, bearer(token(alg="RS512")), "/", NOW, True, 200, ""),
    ("ps256-valid", DEFAULT, bearer(token(alg="PS256")), "/", NOW, True, 200, ""),
    ("no-token-passes", DEFAULT, {}, "/", NOW, True, 200, ""),
    ("other-auth-scheme-is-no-token", DEFAULT, {"authorization": "Basic YTpi"}, "/", NOW, True, 200, ""),
    ("expired-beyond-skew", DEFAULT, bearer(token({"exp": NOW - 61})), "/", NOW, False, 401, "Jwt is expired"),
    ("expired-within-skew", DEFAULT, bearer(token({"exp": NOW - 59})), "/", NOW, True, 200, ""),
    ("no-exp-is-valid", DEFAULT, bearer(token({"exp": None})), "/", NOW, True, 200, ""),
    ("nbf-in-the-future", DEFAULT, bearer(token({"nbf": NOW + 61})), "/", NOW, False, 401, "Jwt not yet valid"),
    ("nbf-within-skew", DEFAULT, bearer(token({"nbf": NOW + 59})), "/", NOW, True, 200, ""),
    ("audience-ok", AUD, bearer(token({"aud": ["other", "shop.example"]})), "/", NOW, True, 200, ""),
    ("audience-scheme-and-slash-ignored", AUD, bearer(token({"aud": "pay.example"})), "/", NOW, True, 200, ""),
    ("wrong-audience", AUD, bearer(token({"aud": "other"})), "/", NOW, False, 403, "Audiences in Jwt are not allowed"),
    ("no-audience", AUD, bearer(token()), "/", NOW, False, 403, "Audiences in Jwt are not allowed"),
    ("unknown-issuer", DEFAULT, bearer(token({"iss": "https://evil.example"})), "/", NOW, False, 401,
     "Jwt issuer is not configured"),
    ("no-issuer", DEFAULT, bearer(token({"iss": None})), "/", NOW, False, 401, "Jwt issuer is not configured"),
    ("bad-signature", DEFAULT, bearer(token(key=OTHER_RSA)), "/", NOW, False, 401, "Jwt verification fails"),
    ("unknown-kid", DEFAULT, bearer(token(kid="nope")), "/", NOW, False, 401,
     "Jwks doesn't have key to match kid or alg from Jwt"),
    ("alg-of-another-key-type", DEFAULT, bearer(token(key=EC, alg="ES256", kid="rsa-1")), "/", NOW, False, 401,
     "Jwks doesn't have key to match kid or alg"),
    ("not-a-jwt", DEFAULT, bearer("abc"), "/", NOW, False, 401, "not in the form of Header.Payload.Signature"),
    ("bad-header", DEFAULT, bearer("!!!.e30.c2ln"), "/", NOW, False, 401, "Jwt header is an invalid"),
    ("expired-token-in-query", DEFAULT, {}, f"/x?access_token={token({'exp': NOW - 100})}", NOW, False, 401,
     "Jwt is expired"),
]


@pytest.mark.parametrize(
    ("rs", "headers", "path", "now", "ok", "status", "reason"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
def test_authenticate(rs: tuple[JwtRule, ...], headers: dict[str, str], path: str, now: float, ok: bool,
                      status: int, reason: str) -> None:
    r = run(rs, headers, path, now)
    assert (r.ok, r.status) == (ok, status), r
    assert reason in r.reason, r
    has_token = headers.get("authorization", "").startswith("Bearer ") or "access_token=" in path
    if ok and has_token:
        assert r.auth is not None and r.auth.principal == f"{ISS}/alice"
    if not ok:
        assert r.auth is None and r.www_authenticate("http://web/x") == (
            'Bearer realm="http://web/x", error="invalid_token"')


def test_a_valid_token_gives_the_request_facts() -> None:
    t = token({"aud": ["shop", "pay"], "azp": "frontend", "groups": ["a", "b"], "scope": "read write",
               "org": {"team": "pay"}})
    r = run(DEFAULT, bearer(t))
    assert r.ok and r.auth is not None
    assert r.auth.principal == "https://idp.example/alice"
    assert r.auth.audiences == ("shop", "pay") and r.auth.presenter == "frontend"
    assert r.auth.claims["groups"] == ["a", "b"] and r.auth.claims["org"] == {"team": "pay"}
    assert r.auth.claims["scope"] == ["read", "write"]  # space-delimited, as Istio lists it
    assert r.auth.rule == r.rule == "shop/jwt jwtRules[0]"


def test_alg_none_and_hmac_never_verify() -> None:
    header = b64(json.dumps({"alg": "none"}).encode())
    payload = b64(json.dumps({"iss": ISS, "sub": "alice", "exp": NOW + 60}).encode())
    for t in (f"{header}.{payload}.", f"{header}.{payload}.c2ln"):
        r = run(DEFAULT, bearer(t))
        assert not r.ok and r.status == 401, r
    # The classic confusion: HS256 with the RSA public key (as published) as the secret.
    pem = RSA.get_op_key("verify").public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(RSA.as_dict(private=False)).encode()):
        h = b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
        sig = b64(hmac.new(secret, f"{h}.{payload}".encode(), hashlib.sha256).digest())
        r = run(DEFAULT, bearer(f"{h}.{payload}.{sig}"))
        assert not r.ok and r.reason == "Jwks doesn't have key to match kid or alg from Jwt", r


def test_a_tampered_payload_fails_verification() -> None:
    h, _, s = token().split(".")
    forged = b64(json.dumps({"iss": ISS, "sub": "admin", "exp": NOW + 300}).encode())
    r = run(DEFAULT, bearer(f"{h}.{forged}.{s}"))
    assert not r.ok and r.status == 401 and r.reason == "Jwt verification fails"
    # and an unencoded (RFC 7797) payload, which would change what the signature covers
    r = run(DEFAULT, bearer(token(b64=False, crit=["b64"])))
    assert not r.ok and r.status == 401


def test_a_key_without_kid_fits_any_token() -> None:
    key = RSAKey.import_key(RSA.as_dict(private=False))
    raw = {k: v for k, v in key.as_dict(private=False).items() if k != "kid"}
    rs = rules(rule_yaml(keys=json.dumps({"keys": [raw]})))
    assert run(rs, bearer(token())).ok
    assert run(rs, bearer(token(kid="whatever"))).ok


def test_a_key_pinned_to_an_alg_or_to_encryption_does_not_verify_others() -> None:
    pinned = {**RSA.as_dict(private=False), "alg": "RS384"}
    assert not run(rules(rule_yaml(keys=json.dumps({"keys": [pinned]}))), bearer(token())).ok
    enc = {**RSA.as_dict(private=False), "use": "enc"}
    assert not run(rules(rule_yaml(keys=json.dumps({"keys": [enc]}))), bearer(token())).ok


def test_from_headers_with_a_prefix_replace_the_defaults() -> None:
    rs = rules(rule_yaml("fromHeaders:\n- {name: X-Jwt-Assertion, prefix: 'Token '}"))
    t = token()
    r = run(rs, {"x-jwt-assertion": f"Token {t}"})
    assert r.ok and r.auth is not None
    assert "x-jwt-assertion" in r.remove_headers  # forwardOriginalToken false: the token is stripped
    # the defaults no longer apply: a bearer token is not looked at (even a bad one)
    assert run(rs, bearer("garbage")).ok and run(rs, bearer("garbage")).auth is None
    # a value without the prefix carries no token
    assert run(rs, {"x-jwt-assertion": t}).auth is None
    # header names match whatever their case
    assert run(rs, {"X-JWT-Assertion": f"Token {t}"}).auth is not None


def test_from_params() -> None:
    rs = rules(rule_yaml("fromParams: [jwt]"))
    r = run(rs, {}, f"/a?x=1&jwt={token()}&y=%20")
    assert r.ok and r.auth is not None and r.remove_headers == ()  # a query stays, as in Envoy
    assert run(rs, {}, f"/a?access_token={token()}").auth is None  # not a location of this rule


def test_default_locations() -> None:
    t = token()
    r = run(DEFAULT, {}, f"/p?access_token={t}")
    assert r.ok and r.auth is not None and r.remove_headers == ()
    r = run(DEFAULT, bearer(t))
    assert r.remove_headers == ("authorization",)


def test_from_cookies() -> None:
    rs = rules(rule_yaml("fromCookies: [session]"))
    r = run(rs, {"cookie": f"theme=dark; session={token()}"})
    assert r.ok and r.auth is not None
    assert r.remove_headers == ()  # a cookie stays, as in Envoy


def test_forward_original_token_keeps_it() -> None:
    rs = rules(rule_yaml("forwardOriginalToken: true"))
    t = token()
    r = run(rs, bearer(t), f"/?access_token={t}")
    assert r.ok and r.auth is not None and r.remove_headers == ()


def test_output_payload_and_claims_to_headers() -> None:
    rs = rules(rule_yaml(
        "outputPayloadToHeader: X-Jwt-Payload\n"
        "outputClaimToHeaders:\n- {header: x-sub, claim: sub}\n- {header: x-admin, claim: admin}\n"
        "- {header: x-n, claim: n}\n- {header: x-team, claim: org.team}\n- {header: x-groups, claim: groups}"
    ))
    t = token({"admin": True, "n": 7, "org": {"team": "pay"}, "groups": ["a"]})
    r = run(rs, {**bearer(t), "x-sub": "mallory"})
    assert r.ok
    headers = dict(r.set_headers)
    assert headers["x-jwt-payload"] == t.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(headers["x-jwt-payload"] + "==")) ["sub"] == "alice"
    assert headers["x-sub"] == "alice" and headers["x-admin"] == "true" and headers["x-n"] == "7"
    assert headers["x-team"] == "pay" and "x-groups" not in headers  # lists are not copied, as in Envoy
    # the client's own copies of the output headers never reach the backend
    assert {"x-jwt-payload", "x-sub", "x-admin", "x-n", "x-team", "x-groups"} <= set(r.remove_headers)
    no_token = run(rs, {"x-jwt-payload": "forged"})
    assert no_token.ok and no_token.auth is None and "x-jwt-payload" in no_token.remove_headers


ISSUER_A = rule_yaml(issuer="https://a.example", name="a")
ISSUER_B = rule_yaml(issuer="https://b.example", name="b", keys=jwks(EC), extra="audiences: [b-api]")


def test_several_rules_a_token_is_checked_by_the_rule_of_its_issuer() -> None:
    rs = rules(ISSUER_A, ISSUER_B)
    a = run(rs, bearer(token({"iss": "https://a.example"})))
    assert a.ok and a.auth is not None and a.auth.principal == "https://a.example/alice"
    b = run(rs, bearer(token({"iss": "https://b.example", "aud": "b-api"}, key=EC, alg="ES256")))
    assert b.ok and b.auth is not None and b.auth.rule == "shop/b jwtRules[0]"
    # B's issuer, wrong audience: the reason is B's, not "issuer not configured" from A
    bad = run(rs, bearer(token({"iss": "https://b.example", "aud": "x"}, key=EC, alg="ES256")))
    assert (bad.ok, bad.status, bad.reason, bad.rule) == (False, 403, "Audiences in Jwt are not allowed",
                                                          "shop/b jwtRules[0]")
    # A's issuer but B's key: A checks it, and it fails verification
    forged = run(rs, bearer(token({"iss": "https://a.example"}, key=EC, alg="ES256", kid="rsa-1")))
    assert not forged.ok and forged.reason.startswith("Jwks doesn't have key")
    unknown = run(rs, bearer(token({"iss": "https://c.example"})))
    assert (unknown.ok, unknown.status, unknown.reason) == (False, 401, "Jwt issuer is not configured")


def test_a_token_is_only_checked_by_rules_that_look_where_it_is() -> None:
    a = rule_yaml(issuer="https://a.example", name="a", extra="fromHeaders: [{name: x-a}]")
    rs = rules(a, ISSUER_B)
    # A's token in the Authorization header, where only B looks: B does not take A's issuer
    r = run(rs, bearer(token({"iss": "https://a.example"})))
    assert (r.ok, r.reason) == (False, "Jwt issuer is not configured")
    assert run(rs, {"x-a": token({"iss": "https://a.example"})}).ok


def test_every_token_a_rule_finds_must_be_valid() -> None:
    good, bad = token(), token({"exp": NOW - 1000})
    r = run(DEFAULT, bearer(good), f"/?access_token={bad}")
    assert not r.ok and r.reason == "Jwt is expired"
    assert run(DEFAULT, bearer(good), f"/?access_token={good}").ok


def test_jwks_uri_keys_come_from_the_resolver() -> None:
    rs = rules(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: f, namespace: shop}\n"
        f"spec:\n  jwtRules:\n  - {{issuer: '{ISS}', jwksUri: 'file:///etc/ambit/jwks/idp.json'}}\n"
    )
    assert rs[0].jwks_path == "/etc/ambit/jwks/idp.json" and rs[0].jwks == ""
    loaded = parse_jwks(jwks(RSA))
    seen: list[str] = []

    def resolver(rule: JwtRule) -> Jwks | None:
        seen.append(rule.jwks_path)
        return loaded

    assert run(rs, bearer(token()), keys=resolver).ok and seen == ["/etc/ambit/jwks/idp.json"]
    # keys not (yet) loaded: every token is refused, never waved through
    r = run(rs, bearer(token()), keys=lambda rule: None)
    assert (r.ok, r.status) == (False, 401) and "Jwks" in r.reason
    assert not run(rs, bearer(token())).ok
    assert run(rs, {}).ok  # no token: nothing to check


def test_no_rules_means_nothing_to_do() -> None:
    r = run((), bearer("garbage"))
    assert r == AuthnResult(ok=True)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nope", "not valid JSON"),
        ("[]", "not a JWK Set"),
        ('{"keys": []}', "non-empty list"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "symmetric keys"),
        (json.dumps({"keys": [RSA.as_dict(private=True)]}), "private key"),
        ('{"keys": [{"kty": "RSA", "n": "x"}]}', "not a valid RSA key"),
        ('{"keys": [{"kty": "XYZ"}]}', "kty 'XYZ'"),
        (json.dumps({"keys": [{**RSA.as_dict(private=False), "alg": "HS256"}]}), "alg"),
    ],
)
def test_parse_jwks_refuses(text: str, why: str) -> None:
    with pytest.raises(JwksError, match=why):
        parse_jwks(text)


def test_a_payload_nested_too_deeply_is_malformed_not_a_crash() -> None:
    deep = base64.urlsafe_b64encode(b"[" * 40000).rstrip(b"=").decode()
    header = base64.urlsafe_b64encode(b'{"alg":"RS256"}').rstrip(b"=").decode()
    r = run(DEFAULT, bearer(f"{header}.{deep}.c2ln"))
    assert not r.ok and r.status == 401 and r.reason == BAD_PAYLOAD
