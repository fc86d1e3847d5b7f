"""Policy validation: every rejection names the object (kind ns/name) and the field path."""

from __future__ import annotations

import json

import pytest
from joserfc.jwk import ECKey

from ambit.cluster import build_state, load_documents
from ambit.policy import (
    CompiledAuthz,
    CompiledPeerAuthn,
    CompiledPolicy,
    CompiledRequestAuthn,
    PolicyError,
    PolicySet,
    compile_policy,
)
from ambit.policy.match import ClaimToHeader, HeaderLocation


def compile_yaml(text: str) -> CompiledPolicy:
    (obj,) = build_state(load_documents(text)).policies
    return compile_policy(obj)


def authz(spec: str, name: str = "bad", api: str = "security.istio.io/v1") -> str:
    return f"apiVersion: {api}\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}\n"


def peer(spec: str) -> str:
    return f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: bad, namespace: shop}}\nspec:\n{spec}\n"


def src(field: str, values: str) -> str:
    return authz(f"  rules:\n  - from:\n    - source:\n        {field}: {values}")


def op(field: str, values: str) -> str:
    return authz(f"  rules:\n  - to:\n    - operation:\n        {field}: {values}")


def reqauthn(spec: str) -> str:
    return f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: bad, namespace: shop}}\nspec:\n{spec}\n"


JWKS = json.dumps({"keys": [ECKey.generate_key("P-256", parameters={"kid": "k"}).as_dict(private=False)]})


def jwt_rule(fields: str, keys: str = f"jwks: '{JWKS}'") -> str:
    """A RequestAuthentication with one jwtRule: `fields` as YAML flow mapping entries."""
    return reqauthn(f"  jwtRules:\n  - {{{', '.join(f for f in (keys, fields) if f)}}}")


AP = "AuthorizationPolicy shop/bad"
PA = "PeerAuthentication shop/bad"
RA = "RequestAuthentication shop/bad"

# (id, yaml, object, field path, a piece of the reason)
BAD: list[tuple[str, str, str, str, str]] = [
    ("bad-cidr", src("ipBlocks", "[10.0.0.0/8, 1.2.3.4, 10.0.0.300/8]"), AP, "spec.rules[0].from[0].source.ipBlocks[2]", "not an IP address or CIDR"),
    ("bad-cidr-not-ip-blocks", src("notIpBlocks", "[10.0.0.0/33]"), AP, "spec.rules[0].from[0].source.notIpBlocks[0]", "not an IP address"),
    ("bad-cidr-when", authz("  rules:\n  - when:\n    - key: source.ip\n      values: [nope]"), AP, "spec.rules[0].when[0].values[0]", "not an IP address"),
    ("port-negative", op("ports", '["-1"]'), AP, "spec.rules[0].to[0].operation.ports[0]", "not a port number (expected 0-65535)"),
    ("port-too-big", op("notPorts", '["65536"]'), AP, "spec.rules[0].to[0].operation.notPorts[0]", "out of range"),
    ("port-not-numeric", op("ports", '["http"]'), AP, "spec.rules[0].to[0].operation.ports[0]", "not a port number"),
    ("port-bool", op("ports", "[true]"), AP, "spec.rules[0].to[0].operation.ports[0]", "not a port number"),
    ("port-when", authz("  rules:\n  - when:\n    - key: destination.port\n      notValues: ['-1']"), AP, "spec.rules[0].when[0].notValues[0]", "not a port number"),
    ("unknown-source-field", src("principal", "[a]"), AP, "spec.rules[0].from[0].source.principal", "unknown field (did you mean 'principals'?)"),
    ("unknown-operation-field", op("method", "[GET]"), AP, "spec.rules[0].to[0].operation.method", "unknown field"),
    ("unknown-spec-field", authz("  rule: []"), AP, "spec.rule", "unknown field"),
    ("unknown-rule-field", authz("  rules:\n  - source: {}"), AP, "spec.rules[0].source", "unknown field"),
    ("bad-action", authz("  action: ALLOWED"), AP, "spec.action", "'ALLOWED' is not one of ALLOW, DENY, AUDIT, CUSTOM"),
    ("lowercase-action", authz("  action: deny"), AP, "spec.action", "is not one of"),
    ("custom-without-provider", authz("  action: CUSTOM\n  rules:\n  - {}"), AP, "spec.provider.name", "names its extension provider"),
    ("custom-without-rules", authz("  action: CUSTOM\n  provider: {name: ext}"), AP, "spec.rules", "a CUSTOM policy without rules never applies"),
    ("deny-without-rules", authz("  action: DENY"), AP, "spec.rules", "a DENY policy without rules never applies"),
    ("provider-without-custom", authz("  provider: {name: ext}"), AP, "spec.provider", "only valid with action CUSTOM"),
    ("principals-not-list", src("principals", "cluster.local/ns/a/sa/b"), AP, "spec.rules[0].from[0].source.principals", "expected a list of strings, got a string"),
    ("principal-not-string", src("principals", "[{a: b}]"), AP, "spec.rules[0].from[0].source.principals[0]", "expected a string"),
    ("rules-not-list", authz("  rules: {from: []}"), AP, "spec.rules", "expected a list"),
    ("null-rule", authz("  rules:\n  -"), AP, "spec.rules[0]", "write `- {}`"),
    ("empty-from", authz("  rules:\n  - from: []"), AP, "spec.rules[0].from", "must not be an empty list"),
    ("empty-source", authz("  rules:\n  - from:\n    - source: {}"), AP, "spec.rules[0].from[0].source", "at least one field"),
    ("missing-source", authz("  rules:\n  - from:\n    - {}"), AP, "spec.rules[0].from[0].source", "is required"),
    ("unknown-when-key", authz("  rules:\n  - when:\n    - key: source.user\n      values: [a]"), AP, "spec.rules[0].when[0].key", "unknown condition key 'source.user'"),
    ("when-without-values", authz("  rules:\n  - when:\n    - key: source.ip"), AP, "spec.rules[0].when[0]", "needs `values` or `notValues`"),
    ("target-ref-kind", authz("  targetRefs:\n  - kind: Deployment\n    group: apps\n    name: x"), AP, "spec.targetRefs[0].kind", "not one Istio takes"),
    ("target-ref-and-selector", authz("  selector: {matchLabels: {app: web}}\n  targetRefs:\n  - {kind: Service, group: '', name: web}"), AP, "spec.selector", "not both"),
    ("target-ref-other-namespace", authz("  targetRef: {kind: Service, group: '', name: web, namespace: other}"), AP, "spec.targetRef.namespace", "policy's own namespace"),
    ("selector-unknown-field", authz("  selector: {labels: {app: web}}"), AP, "spec.selector.labels", "unknown field"),
    ("service-account-shape", src("serviceAccounts", '["a/b/c"]'), AP, "spec.rules[0].from[0].source.serviceAccounts[0]", "not <namespace>/<service-account>"),
    ("v1beta1-bad-cidr", authz("  rules:\n  - from:\n    - source: {ipBlocks: [300.1.1.1]}", api="security.istio.io/v1beta1"), AP, "spec.rules[0].from[0].source.ipBlocks[0]", "not an IP"),
    ("pa-bad-mode", peer("  mtls: {mode: STRICTER}"), PA, "spec.mtls.mode", "'STRICTER' is not one of UNSET, DISABLE, PERMISSIVE, STRICT"),
    ("pa-bad-port-key", peer("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    http: {mode: STRICT}"), PA, "spec.portLevelMtls.http", "not a port number"),
    ("pa-port-zero", peer("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    0: {mode: STRICT}"), PA, "spec.portLevelMtls.0", "out of range"),
    ("pa-bad-port-mode", peer("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: OFF}"), PA, "spec.portLevelMtls.8080.mode", "YAML reads unquoted on/off"),
    ("pa-mode-typo", peer("  mtls: {mode: Strict}"), PA, "spec.mtls.mode", "'Strict' is not one of"),
    ("pa-port-level-needs-selector", peer("  portLevelMtls:\n    8080: {mode: DISABLE}"), PA, "spec.portLevelMtls", "needs a workload selector"),
    ("pa-unknown-field", peer("  mtls: {mode: STRICT}\n  targetRef: {kind: Service, name: x}"), PA, "spec.targetRef", "unknown field"),
    ("pa-mtls-not-mapping", peer("  mtls: STRICT"), PA, "spec.mtls", "expected a mapping, got a string"),
    ("ra-unknown-spec-field", reqauthn("  jwtRule: []"), RA, "spec.jwtRule", "unknown field"),
    ("ra-rules-not-list", reqauthn("  jwtRules: {issuer: a}"), RA, "spec.jwtRules", "expected a list"),
    ("ra-selector-and-target-refs", reqauthn("  selector: {matchLabels: {app: web}}\n  targetRefs:\n  - {kind: Service, group: '', name: web}"), RA, "spec.selector", "not both"),
    ("ra-target-ref-kind", reqauthn("  targetRefs:\n  - {kind: Deployment, group: apps, name: web}"), RA, "spec.targetRefs[0].kind", "not one Istio takes"),
    ("ra-issuer-missing", jwt_rule(""), RA, "spec.jwtRules[0].issuer", "`issuer` is required"),
    ("ra-issuer-empty", jwt_rule("issuer: ''"), RA, "spec.jwtRules[0].issuer", "`issuer` is required"),
    ("ra-unknown-rule-field", jwt_rule("issuer: a, audience: [x]"), RA, "spec.jwtRules[0].audience", "unknown field (did you mean 'audiences'?)"),
    ("ra-jwks-uri-case", jwt_rule("issuer: a, jwksURI: /k.json", keys=""), RA, "spec.jwtRules[0].jwksURI", "did you mean 'jwksUri'?"),
    ("ra-audiences-not-list", jwt_rule("issuer: a, audiences: shop"), RA, "spec.jwtRules[0].audiences", "expected a list of strings"),
    ("ra-audience-empty", jwt_rule("issuer: a, audiences: ['']"), RA, "spec.jwtRules[0].audiences[0]", "empty string"),
    ("ra-jwks-not-json", jwt_rule("issuer: a", keys="jwks: 'nope'"), RA, "spec.jwtRules[0].jwks", "not valid JSON"),
    ("ra-jwks-not-a-set", jwt_rule("issuer: a", keys="jwks: '{\"kty\": \"EC\"}'"), RA, "spec.jwtRules[0].jwks", "not a JWK Set"),
    ("ra-jwks-bad-key", jwt_rule("issuer: a", keys="jwks: '{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"AA\"}]}'"), RA, "spec.jwtRules[0].jwks", "keys[0]: not a valid EC key"),
    ("ra-jwks-uri-relative", jwt_rule("issuer: a, jwksUri: keys/jwks.json", keys=""), RA, "spec.jwtRules[0].jwksUri", "not an http(s) URL, an absolute file path"),
    ("ra-timeout-bad", jwt_rule("issuer: a, timeout: soon"), RA, "spec.jwtRules[0].timeout", "not a duration"),
    ("ra-jwks-symmetric-and-bad", jwt_rule("issuer: a", keys="jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}, {\"kty\": \"EC\"}]}'"), RA, "spec.jwtRules[0].jwks", "keys[0]: not a valid EC key"),
    ("ra-from-headers-no-name", jwt_rule("issuer: a, fromHeaders: [{prefix: 'Bearer '}]"), RA, "spec.jwtRules[0].fromHeaders[0].name", "`name` is required"),
    ("ra-from-headers-unknown", jwt_rule("issuer: a, fromHeaders: [{name: x, Prefix: a}]"), RA, "spec.jwtRules[0].fromHeaders[0].Prefix", "did you mean 'prefix'?"),
    ("ra-from-headers-not-list", jwt_rule("issuer: a, fromHeaders: {name: x}"), RA, "spec.jwtRules[0].fromHeaders", "expected a list"),
    ("ra-from-params-empty", jwt_rule("issuer: a, fromParams: ['']"), RA, "spec.jwtRules[0].fromParams[0]", "empty string"),
    ("ra-forward-not-bool", jwt_rule("issuer: a, forwardOriginalToken: 'yes'"), RA, "spec.jwtRules[0].forwardOriginalToken", "expected true or false"),
    ("ra-payload-header-bad", jwt_rule("issuer: a, outputPayloadToHeader: ':path'"), RA, "spec.jwtRules[0].outputPayloadToHeader", "not an HTTP header name"),
    ("ra-claim-header-missing-claim", jwt_rule("issuer: a, outputClaimToHeaders: [{header: x-sub}]"), RA, "spec.jwtRules[0].outputClaimToHeaders[0].claim", "`claim` is required"),
    ("ra-claim-header-unknown", jwt_rule("issuer: a, outputClaimToHeaders: [{header: x-sub, claims: sub}]"), RA, "spec.jwtRules[0].outputClaimToHeaders[0].claims", "did you mean 'claim'?"),
]


@pytest.mark.parametrize(("text", "obj", "path", "why"), [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_invalid_policy_names_object_and_field(text: str, obj: str, path: str, why: str) -> None:
    with pytest.raises(PolicyError) as exc:
        compile_yaml(text)
    msg = str(exc.value)
    assert msg.startswith(f"{obj}: {path}: "), msg
    assert why in msg, msg


GOOD = [
    ("deny-all-v1beta1", authz("  action: DENY\n  rules:\n  - {}", api="security.istio.io/v1beta1")),
    ("allow-nothing", authz("  {}")),
    ("all-source-fields", authz(
        "  rules:\n  - from:\n    - source:\n"
        "        principals: ['*']\n        notPrincipals: [a]\n        requestPrincipals: ['*']\n"
        "        notRequestPrincipals: [b]\n        namespaces: [x]\n        notNamespaces: [y]\n"
        "        ipBlocks: [10.0.0.0/8]\n        notIpBlocks: ['10.1.0.1']\n        remoteIpBlocks: ['fd00::/8']\n"
        "        notRemoteIpBlocks: ['1.2.3.4']\n    - source:\n        serviceAccounts: [web]\n        notServiceAccounts: [a/b]"
    )),
    ("all-operation-fields", authz(
        "  rules:\n  - to:\n    - operation:\n"
        "        hosts: ['*.example.com']\n        notHosts: [a.example.com]\n        ports: ['80']\n"
        "        notPorts: ['81']\n        methods: [GET]\n        notMethods: [POST]\n"
        "        paths: [/api/*]\n        notPaths: ['*.js']"
    )),
    ("conditions", authz(
        "  rules:\n  - when:\n    - key: request.headers[X-User]\n      values: [alice]\n"
        "    - key: request.auth.claims[iss]\n      values: [me]\n    - key: connection.sni\n      notValues: [x]"
    )),
    ("target-refs", authz("  targetRefs:\n  - {kind: Service, group: '', name: web}\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: wp}")),
    ("target-ref-singular", authz("  targetRef: {kind: Service, group: '', name: web}")),
    ("audit", authz("  action: AUDIT\n  rules:\n  - {}")),
    ("ra-mesh-no-rules", reqauthn("  {}")),
    ("ra-target-ref-gateway", reqauthn(f"  targetRefs:\n  - {{kind: Gateway, group: gateway.networking.k8s.io, name: wp}}\n  jwtRules:\n  - {{issuer: a, jwks: '{JWKS}'}}")),
    ("ra-jwks-uri-path", jwt_rule("issuer: a, jwksUri: /etc/jwks.json", keys="")),
    ("pa-full", peer("  selector: {matchLabels: {app: web}}\n  mtls: {mode: UNSET}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    '9090': {mode: STRICT}")),
]


@pytest.mark.parametrize("text", [pytest.param(t, id=i) for i, t in GOOD])
def test_valid_policies_compile(text: str) -> None:
    compiled = compile_yaml(text)
    assert PolicySet.build([compiled]).by_key[compiled.key] is compiled


def test_compiled_fields() -> None:
    c = compile_yaml(authz("  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [GET], ports: ['80']}"))
    assert isinstance(c, CompiledAuthz)
    assert c.action == "DENY" and c.match_labels == {"app": "web"} and c.ref == "shop/bad"
    assert c.rules[0].l7_fields == ("spec.rules[0].to[0].operation.methods",)
    p = compile_yaml(peer("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: DISABLE}"))
    assert isinstance(p, CompiledPeerAuthn)
    assert p.mode == "UNSET" and dict(p.port_modes) == {8080: "DISABLE"}


def test_compiled_request_authentication() -> None:
    c = compile_yaml(reqauthn(
        "  selector: {matchLabels: {app: web}}\n  jwtRules:\n"
        f"  - issuer: https://idp.example\n    audiences: [shop]\n    jwks: '{JWKS}'\n"
        "    fromHeaders: [{name: X-Token, prefix: 'Bearer '}]\n    fromParams: [t]\n    fromCookies: [s]\n"
        "    forwardOriginalToken: true\n    outputPayloadToHeader: X-Payload\n"
        "    outputClaimToHeaders: [{header: X-Sub, claim: sub}]\n    spaceDelimitedClaims: [roles]\n"
        "  - issuer: https://other.example\n    jwksUri: file:///etc/ambit/other.json"
    ))
    assert isinstance(c, CompiledRequestAuthn)
    assert c.key == "RequestAuthentication/shop/bad" and c.match_labels == {"app": "web"} and not c.target_refs
    a, b = c.rules
    assert (a.policy, a.index, a.issuer, a.audiences) == ("shop/bad", 0, "https://idp.example", ("shop",))
    assert a.from_headers == (HeaderLocation("x-token", "Bearer "),) and a.from_params == ("t",)
    assert a.from_cookies == ("s",) and a.forward_original_token and a.output_payload_to_header == "x-payload"
    assert a.output_claim_to_headers == (ClaimToHeader("x-sub", "sub"),) and a.space_delimited_claims == ("roles",)
    assert a.jwks == JWKS and not a.jwks_uri
    assert (b.jwks, b.jwks_uri, b.jwks_path) == ("", "file:///etc/ambit/other.json", "/etc/ambit/other.json")
    assert b.locations[0][0] == HeaderLocation("authorization", "Bearer ") and b.locations[1] == ("access_token",)
    row = PolicySet.build([c]).summary()[0]
    assert row.pop("enforcement") and row == {
        "kind": "RequestAuthentication", "namespace": "shop", "name": "bad", "scope": "selector: app=web", "rules": 2,
        "issuers": ["https://idp.example", "https://other.example"], "status": "waypoint",
        "status_summary": "JWTs are checked at a waypoint (a workload without one has no HTTP to check)"}


def test_policy_set_build_raises_on_bad_object_and_summarises() -> None:
    docs = load_documents(authz("  action: DENY\n  rules:\n  - {}", name="ok") + "---\n" + src("ipBlocks", "[x]"))
    objs = build_state(docs).policies
    with pytest.raises(PolicyError, match="AuthorizationPolicy shop/bad"):
        PolicySet.build(objs)
    ps = PolicySet.build([o for o in objs if o.meta.name == "ok"])
    assert ps.summary() == [
        {"kind": "AuthorizationPolicy", "namespace": "shop", "name": "ok", "action": "DENY",
         "scope": "namespace", "rules": 1, "http_rules": [], "status": "enforced",
         "status_summary": "enforced at L4 and at waypoints, as written", "enforcement": []}
    ]
