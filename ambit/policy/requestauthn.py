"""Validation and compilation of `RequestAuthentication` (JWT rules), read verbatim. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ambit.cluster import PolicyObject
from ambit.policy.fields import (
    _known,
    _labels,
    _mapping,
    _str_list,
    _string,
    _target_refs,
    _type_name,
    _Where,
)
from ambit.policy.jwks import JwksError, parse_jwks
from ambit.policy.match import ClaimToHeader, CompiledRequestAuthn, HeaderLocation, JwtRule

_JWT_RULE_FIELDS = (
    "issuer", "audiences", "jwks", "jwksUri", "fromHeaders", "fromParams", "fromCookies",
    "forwardOriginalToken", "outputPayloadToHeader", "outputClaimToHeaders", "spaceDelimitedClaims", "timeout",
)
_DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
# RFC 9110's token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _header_name(w: _Where, path: str, v: object) -> str:
    name = _string(w, path, v, required=True)
    if not _HEADER_NAME.match(name):
        raise w.error(path, f"{name!r} is not an HTTP header name")
    return name.lower()


def _list(w: _Where, path: str, v: object) -> list[Any]:
    """A list, or none (null or absent)."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise w.error(path, f"expected a list, got {_type_name(v)}")
    return v


def _strings(w: _Where, path: str, v: object) -> tuple[str, ...]:
    """A list of non-empty strings, or none (null or absent)."""
    return () if v is None else tuple(_str_list(w, path, v))


def _jwks_path(w: _Where, path: str, uri: str) -> str:
    """The file a jwksUri names; "" for an http(s) URL, which ambit does not fetch (Istio takes
    only those; a file path is ambit's own addition). A rule without keys refuses every token
    it checks (401, "Jwks remote fetch is failed", as Envoy when the fetch fails)."""
    if uri.startswith("file://"):
        file = uri[len("file://"):]
    elif uri.startswith("/"):
        file = uri
    elif uri.split("://", 1)[0] in ("http", "https"):
        return ""
    else:
        file = ""
    if not file.startswith("/") or "\0" in file:
        raise w.error(path, f"{uri!r} is not an http(s) URL, an absolute file path or a file:///... URL")
    return file


def _check_jwks(w: _Where, path: str, text: str) -> None:
    """Refuse what Istio refuses (not a JWK Set); accept, unused, the keys ambit will not use
    (shared secrets and private keys: tokens they would verify are refused)."""
    try:
        parse_jwks(text)
        return
    except JwksError as e:
        error = e
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise w.error(path, str(error)) from None
    usable = [k for k in keys if not (isinstance(k, dict) and (k.get("kty") == "oct" or "d" in k))]
    if len(usable) == len(keys):
        raise w.error(path, str(error)) from None
    if usable:
        try:
            parse_jwks(json.dumps({"keys": usable}))
        except JwksError as e:
            raise w.error(path, str(e)) from None


def _jwt_rule(w: _Where, path: str, index: int, raw: object, policy: str) -> JwtRule:
    r = _mapping(w, path, raw)
    _known(w, path, r, _JWT_RULE_FIELDS)
    timeout = r.get("timeout")
    if timeout is not None and not (isinstance(timeout, str) and _DURATION.match(timeout)):
        # Accepted and unused: ambit fetches no keys over the network.
        raise w.error(f"{path}.timeout", f"{timeout!r} is not a duration in seconds (e.g. 5s or 1.5s)")
    issuer = _string(w, f"{path}.issuer", r.get("issuer"))
    audiences = _strings(w, f"{path}.audiences", r.get("audiences"))
    jwks = _string(w, f"{path}.jwks", r.get("jwks"))
    jwks_uri = _string(w, f"{path}.jwksUri", r.get("jwksUri"))
    if not issuer and not jwks_uri:
        raise w.error(f"{path}.issuer", "`issuer` is required (or at least a `jwksUri`, as Istio takes it)")
    if jwks:
        _check_jwks(w, f"{path}.jwks", jwks)
    # Inline keys win over a jwksUri (Istio says to set only one).
    jwks_path = _jwks_path(w, f"{path}.jwksUri", jwks_uri) if jwks_uri and not jwks else ""
    headers: list[HeaderLocation] = []
    for i, h in enumerate(_list(w, f"{path}.fromHeaders", r.get("fromHeaders"))):
        hp = f"{path}.fromHeaders[{i}]"
        hm = _mapping(w, hp, h)
        _known(w, hp, hm, ("name", "prefix"))
        # Istio only asks for a non-empty name (one that is no header name never finds a token).
        headers.append(HeaderLocation(_string(w, f"{hp}.name", hm.get("name"), required=True).lower(),
                                      _string(w, f"{hp}.prefix", hm.get("prefix"))))
    forward = r.get("forwardOriginalToken")
    if forward is not None and not isinstance(forward, bool):
        raise w.error(f"{path}.forwardOriginalToken", f"expected true or false, got {forward!r}")
    payload_header = ""
    if r.get("outputPayloadToHeader") not in (None, ""):
        payload_header = _header_name(w, f"{path}.outputPayloadToHeader", r["outputPayloadToHeader"])
    claim_headers: list[ClaimToHeader] = []
    for i, c in enumerate(_list(w, f"{path}.outputClaimToHeaders", r.get("outputClaimToHeaders"))):
        cp = f"{path}.outputClaimToHeaders[{i}]"
        cm = _mapping(w, cp, c)
        _known(w, cp, cm, ("header", "claim"))
        claim_headers.append(ClaimToHeader(_header_name(w, f"{cp}.header", cm.get("header")),
                                           _string(w, f"{cp}.claim", cm.get("claim"), required=True)))
    return JwtRule(
        policy=policy,
        index=index,
        issuer=issuer,
        audiences=audiences,
        jwks=jwks,
        jwks_uri=jwks_uri,
        jwks_path=jwks_path,
        from_headers=tuple(headers),
        from_params=_strings(w, f"{path}.fromParams", r.get("fromParams")),
        from_cookies=_strings(w, f"{path}.fromCookies", r.get("fromCookies")),
        forward_original_token=bool(forward),
        output_payload_to_header=payload_header,
        output_claim_to_headers=tuple(claim_headers),
        space_delimited_claims=_strings(w, f"{path}.spaceDelimitedClaims", r.get("spaceDelimitedClaims")),
    )


def _compile_request_authn(
    w: _Where, obj: PolicyObject, ns: str, spec: Mapping[str, Any]
) -> CompiledRequestAuthn:
    _known(w, "spec", spec, ("selector", "targetRef", "targetRefs", "jwtRules"))
    labels = _labels(w, "spec.selector", spec["selector"]) if spec.get("selector") is not None else None
    refs = _target_refs(w, spec, ns)
    if refs and spec.get("selector") is not None:
        raise w.error("spec.selector", "set either selector or targetRefs, not both")
    policy = f"{ns}/{obj.meta.name}"
    rules = tuple(
        _jwt_rule(w, f"spec.jwtRules[{i}]", i, r, policy)
        for i, r in enumerate(_list(w, "spec.jwtRules", spec.get("jwtRules")))
    )
    return CompiledRequestAuthn(
        namespace=ns,
        name=obj.meta.name,
        api_version=obj.api_version,
        match_labels=labels,
        target_refs=refs,
        rules=rules,
        resource_version=obj.meta.resource_version,
    )
