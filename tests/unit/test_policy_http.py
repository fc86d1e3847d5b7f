"""authorize_http: the same policies evaluated with HTTP attributes, as a waypoint does."""

from __future__ import annotations

import json

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from ambit.cluster import build_state, load_documents
from ambit.policy import (
    ConnectionFacts,
    HttpFacts,
    RequestAuth,
    authenticate,
    authorize_http,
    authorize_opaque,
)
from ambit.snapshot import build_snapshot
from ambit.spiffe import SpiffeId

CLUSTER = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, ambit.dev/use-waypoint: shop-wp}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
"""


def op(field: str, values: str, action: str = "ALLOW") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: shop}\n"
        f"spec:\n  action: {action}\n  rules:\n  - to:\n    - operation:\n        {field}: {values}\n"
    )


def when(key: str, field: str, values: str) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: shop}\n"
        f"spec:\n  rules:\n  - when:\n    - key: {key}\n      {field}: {values}\n"
    )


def src(field: str, values: str) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: shop}\n"
        f"spec:\n  rules:\n  - from:\n    - source:\n        {field}: {values}\n"
    )


GATEWAY_ONLY = (
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n"
    "spec:\n  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: shop-wp}\n"
    "  rules:\n  - to:\n    - operation: {methods: [GET]}\n"
)

# (id, policies, method, path, host, headers, allowed, reason piece)
CASES: list[tuple[str, str, str, str, str, dict[str, str], bool, str]] = [
    ("method", op("methods", "[GET, HEAD]"), "HEAD", "/", "web", {}, True, "method HEAD matches methods[1]"),
    ("method-miss", op("methods", "[GET]"), "POST", "/", "web", {}, False, "none matched"),
    ("method-case-sensitive", op("methods", "[GET]"), "get", "/", "web", {}, False, "none matched"),
    ("not-methods", op("notMethods", "[DELETE]"), "DELETE", "/", "web", {}, False, "none matched"),
    ("path-exact", op("paths", "[/health]"), "GET", "/health", "web", {}, True, "paths[0]"),
    ("path-exact-miss", op("paths", "[/health]"), "GET", "/healthz", "web", {}, False, "none matched"),
    ("path-query-ignored", op("paths", "[/health]"), "GET", "/health?verbose=1", "web", {}, True, "paths[0]"),
    ("path-prefix", op("paths", '["/api/*"]'), "GET", "/api/v1/items", "web", {}, True, "paths[0]"),
    ("path-prefix-miss", op("paths", '["/api/*"]'), "GET", "/apiv1", "web", {}, False, "none matched"),
    ("path-suffix", op("paths", '["*.js"]'), "GET", "/static/app.js", "web", {}, True, "paths[0]"),
    ("path-presence", op("paths", '["*"]'), "GET", "/anything", "web", {}, True, "paths[0]"),
    ("path-template", op("paths", '["/v1/{*}/items"]'), "GET", "/v1/shop/items", "web", {}, True, "paths[0]"),
    ("path-template-one-segment", op("paths", '["/v1/{*}/items"]'), "GET", "/v1/a/b/items", "web", {}, False, "none matched"),
    ("path-template-multi", op("paths", '["/v1/{**}"]'), "GET", "/v1/a/b/c", "web", {}, True, "paths[0]"),
    ("not-paths", op("notPaths", '["/admin*"]'), "GET", "/admin/users", "web", {}, False, "none matched"),
    ("not-paths-other", op("notPaths", '["/admin*"]'), "GET", "/shop", "web", {}, True, "not in notPaths"),
    ("host-case-insensitive", op("hosts", "[Web.Shop.svc]"), "GET", "/", "web.shop.SVC", {}, True, "hosts[0]"),
    ("host-with-port", op("hosts", "[web.shop.svc]"), "GET", "/", "web.shop.svc:80", {}, True, "hosts[0]"),
    ("host-wildcard-prefix", op("hosts", '["*.example.com"]'), "GET", "/", "api.example.com", {}, True, "hosts[0]"),
    ("host-miss", op("hosts", '["*.example.com"]'), "GET", "/", "example.org", {}, False, "none matched"),
    ("not-hosts", op("notHosts", "[admin.example.com]"), "GET", "/", "ADMIN.example.com", {}, False, "none matched"),
    ("header-value", when("request.headers[X-User]", "values", "[alice]"), "GET", "/", "web", {"x-user": "alice"}, True, "header x-user alice matches values[0]"),
    ("header-missing", when("request.headers[X-User]", "values", "[alice]"), "GET", "/", "web", {}, False, "none matched"),
    ("header-prefix", when("request.headers[x-user]", "values", '["adm*"]'), "GET", "/", "web", {"X-User": "admin"}, True, "values[0]"),
    ("header-not-values", when("request.headers[x-user]", "notValues", "[mallory]"), "GET", "/", "web", {"x-user": "mallory"}, False, "none matched"),
    ("request-principals-never", src("requestPrincipals", '["*"]'), "GET", "/", "web", {}, False, "none matched"),
    ("not-request-principals-always", src("notRequestPrincipals", '["*"]'), "GET", "/", "web", {}, True, "no request principal"),
    ("remote-ip-not-xff", src("remoteIpBlocks", '["203.0.113.0/24"]'), "GET", "/", "web", {"X-Forwarded-For": "203.0.113.9, 10.1.0.1"}, False, "none matched"),
    ("remote-ip-peer", src("remoteIpBlocks", '["10.9.0.0/16"]'), "GET", "/", "web", {}, True, "remote IP 10.9.0.1"),
    ("deny-is-precise-at-l7", op("methods", "[DELETE]", action="DENY"), "GET", "/", "web", {}, True, "no DENY policy matched"),
    ("deny-matches-at-l7", op("methods", "[DELETE]", action="DENY"), "DELETE", "/", "web", {}, False, "denied by DENY policy shop/p rule 0"),
    ("target-ref-gateway", GATEWAY_ONLY, "POST", "/", "web", {}, False, "shop/p"),
    ("target-ref-gateway-ok", GATEWAY_ONLY, "GET", "/", "web", {}, True, "shop/p rule 0"),
    ("l4-fields-still-apply", src("principals", "[cluster.local/ns/shop/sa/frontend]"), "GET", "/", "web", {}, True, "principals[0]"),
]


@pytest.mark.parametrize(
    ("policies", "method", "path", "host", "headers", "allowed", "reason"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_authorize_http(
    policies: str, method: str, path: str, host: str, headers: dict[str, str], allowed: bool, reason: str
) -> None:
    snap = build_snapshot(build_state(load_documents(CLUSTER + policies)), "node-a")
    assert not snap.errors, snap.errors
    wl = snap.workload("shop/web")
    assert wl is not None
    facts = ConnectionFacts("10.9.0.1", SpiffeId("cluster.local", "shop", "frontend"), wl, 8080, True)
    d = authorize_http(facts, HttpFacts(method, path, host, headers), snap.policies)
    assert d.allowed is allowed, d
    assert reason in d.reason, d


def test_check_judges_at_the_waypoint_or_the_ztunnel() -> None:
    from ambit.policy import check

    policies = op("methods", "[GET]")
    snap = build_snapshot(build_state(load_documents(CLUSTER + policies)), "node-a")
    wl = snap.workload("shop/web")
    assert wl is not None and wl.waypoint == "shop-wp"
    facts = ConnectionFacts("10.9.0.1", SpiffeId("cluster.local", "shop", "frontend"), wl, 8080, True)
    get = check(facts, snap.policies, http=HttpFacts("GET", "/", "web"))
    assert get.allowed and get.policy == "shop/p" and "waypoint shop-wp" in get.notes[0]
    assert not check(facts, snap.policies, http=HttpFacts("POST", "/", "web")).allowed
    assert not check(facts, snap.policies).allowed  # no method given: the GET rule cannot match
    no_wp = type(wl)(**{**wl.__dict__, "waypoint": None})
    l4 = check(ConnectionFacts("10.9.0.1", facts.src_identity, no_wp, 8080, True), snap.policies,
               http=HttpFacts("GET", "/", "web"))
    assert not l4.allowed and "not evaluated (L4 only)" in l4.notes[-1]


# ---------------------------------------------------------------------------
# request.auth: the facts of the request's verified JWT (ambit.policy.jwt)

ALICE = RequestAuth(
    principal="https://idp.example/alice",
    claims={"iss": "https://idp.example", "sub": "alice", "groups": ["dev", "ops"], "admin": True,
            "org": {"team": "pay", "tags": ["x", "y"]}, "scope": ["read", "write"], "email": "a@shop.example"},
    audiences=("shop", "pay"),
    presenter="frontend",
)


def deny_src(field: str, values: str) -> str:
    return src(field, values).replace("spec:\n", "spec:\n  action: DENY\n")


# (id, policies, auth, allowed, reason piece)
AUTH_CASES: list[tuple[str, str, RequestAuth | None, bool, str]] = [
    ("request-principals-any", src("requestPrincipals", '["*"]'), ALICE, True,
     "request principal https://idp.example/alice matches requestPrincipals[0]"),
    ("request-principals-any-no-token", src("requestPrincipals", '["*"]'), None, False, "none matched"),
    ("request-principals-exact", src("requestPrincipals", "[https://idp.example/alice]"), ALICE, True, "requestPrincipals[0]"),
    ("request-principals-exact-miss", src("requestPrincipals", "[https://idp.example/bob]"), ALICE, False, "none matched"),
    ("request-principals-prefix", src("requestPrincipals", '["https://idp.example/*"]'), ALICE, True, "requestPrincipals[0]"),
    ("request-principals-suffix", src("requestPrincipals", '["*/alice"]'), ALICE, True, "requestPrincipals[0]"),
    ("request-principals-other-issuer", src("requestPrincipals", '["https://other.example/*"]'), ALICE, False, "none matched"),
    ("not-request-principals-any-token", src("notRequestPrincipals", '["*"]'), ALICE, False, "none matched"),
    ("not-request-principals-any-no-token", src("notRequestPrincipals", '["*"]'), None, True, "no request principal"),
    ("deny-without-token", deny_src("notRequestPrincipals", '["*"]'), None, False, "denied by DENY policy shop/p rule 0"),
    ("deny-without-token-has-one", deny_src("notRequestPrincipals", '["*"]'), ALICE, True, "no DENY policy matched"),
    ("claim-list-any-element", when("request.auth.claims[groups]", "values", "[ops]"), ALICE, True,
     "claim groups ops matches values[0]"),
    ("claim-list-prefix", when("request.auth.claims[groups]", "values", '["op*"]'), ALICE, True, "values[0]"),
    ("claim-list-miss", when("request.auth.claims[groups]", "values", "[admin]"), ALICE, False, "none matched"),
    ("claim-list-not-values", when("request.auth.claims[groups]", "notValues", "[ops]"), ALICE, False, "none matched"),
    ("claim-list-not-values-other", when("request.auth.claims[groups]", "notValues", "[admin]"), ALICE, True,
     "claim groups [dev, ops] is not in notValues"),
    ("claim-string", when("request.auth.claims[email]", "values", '["*@shop.example"]'), ALICE, True, "values[0]"),
    ("claim-nested", when("request.auth.claims[org][team]", "values", "[pay]"), ALICE, True, "claim org.team pay"),
    ("claim-nested-list", when("request.auth.claims[org][tags]", "values", "[y]"), ALICE, True, "values[0]"),
    ("claim-nested-missing", when("request.auth.claims[org][boss]", "values", "[x]"), ALICE, False, "none matched"),
    ("claim-not-a-string", when("request.auth.claims[admin]", "values", '["true"]'), ALICE, False, "none matched"),
    ("claim-scope", when("request.auth.claims[scope]", "values", "[write]"), ALICE, True, "values[0]"),
    ("claim-no-token", when("request.auth.claims[groups]", "values", "[ops]"), None, False, "none matched"),
    ("claim-not-values-no-token", when("request.auth.claims[groups]", "notValues", "[ops]"), None, True, "no claim groups"),
    ("audiences", when("request.auth.audiences", "values", "[pay]"), ALICE, True, "request audience pay matches values[0]"),
    ("audiences-miss", when("request.auth.audiences", "values", "[bank]"), ALICE, False, "none matched"),
    ("presenter", when("request.auth.presenter", "values", "[frontend]"), ALICE, True, "request presenter frontend"),
    ("principal-condition", when("request.auth.principal", "values", '["*/alice"]'), ALICE, True, "values[0]"),
]


@pytest.mark.parametrize(("policies", "auth", "allowed", "reason"), [pytest.param(*c[1:], id=c[0]) for c in AUTH_CASES])
def test_authorize_http_with_request_auth(policies: str, auth: RequestAuth | None, allowed: bool, reason: str) -> None:
    snap = build_snapshot(build_state(load_documents(CLUSTER + policies)), "node-a")
    assert not snap.errors, snap.errors
    wl = snap.workload("shop/web")
    assert wl is not None
    facts = ConnectionFacts("10.9.0.1", SpiffeId("cluster.local", "shop", "frontend"), wl, 8080, True)
    d = authorize_http(facts, HttpFacts("GET", "/", "web", {}, auth), snap.policies)
    assert d.allowed is allowed, d
    assert reason in d.reason, d


KEY = ECKey.generate_key("P-256", parameters={"kid": "idp-1"})
JWKS = json.dumps({"keys": [KEY.as_dict(private=False)]})


def request_authn(name: str, namespace: str, scope: str, issuer: str) -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n{scope}  jwtRules:\n  - {{issuer: '{issuer}', jwks: '{JWKS}'}}\n---\n"
    )


def test_which_request_authentications_apply() -> None:
    docs = (
        request_authn("mesh", "istio-system", "", "https://mesh.example")
        + request_authn("ns", "shop", "", "https://ns.example")
        + request_authn("other-ns", "bank", "", "https://bank.example")
        + request_authn("sel", "shop", "  selector: {matchLabels: {app: web}}\n", "https://sel.example")
        + request_authn("sel-miss", "shop", "  selector: {matchLabels: {app: db}}\n", "https://db.example")
        + request_authn("svc", "shop", "  targetRefs: [{kind: Service, group: '', name: web}]\n", "https://svc.example")
        + request_authn("gw", "shop", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: shop-wp}]\n",
                        "https://gw.example")
        + request_authn("root-sel", "istio-system", "  selector: {matchLabels: {app: web}}\n", "https://root-sel.example")
    )
    snap = build_snapshot(build_state(load_documents(CLUSTER + docs)), "node-a")
    assert not snap.errors, snap.errors
    wl = snap.workload("shop/web")
    assert wl is not None
    names = {p.name for p in snap.policies.applicable_request_authn(wl)}
    assert names == {"mesh", "ns", "sel", "svc", "gw", "root-sel"}
    assert "gw" not in {p.name for p in snap.policies.applicable_request_authn(wl, at_waypoint=False)}
    issuers = [r.issuer for r in snap.policies.jwt_rules(wl)]
    assert issuers == sorted(issuers) and len(issuers) == 6  # merged and sorted by issuer, as Istio does


def test_a_waypoint_authenticates_then_authorizes() -> None:
    policies = (
        request_authn("jwt", "shop", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: shop-wp}]\n",
                      "https://idp.example")
        + src("requestPrincipals", '["https://idp.example/*"]')
    )
    snap = build_snapshot(build_state(load_documents(CLUSTER + policies)), "node-a")
    assert not snap.errors, snap.errors
    wl = snap.workload("shop/web")
    assert wl is not None
    facts = ConnectionFacts("10.9.0.1", SpiffeId("cluster.local", "shop", "frontend"), wl, 8080, True)
    now = 1_800_000_000
    tok = jwt.encode({"alg": "ES256", "kid": "idp-1"}, {"iss": "https://idp.example", "sub": "alice", "exp": now + 60}, KEY)

    def request(headers: dict[str, str]) -> tuple[int, str]:
        authn = authenticate(snap.policies.jwt_rules(wl), headers, "/", now=now)
        if not authn.ok:
            return authn.status, authn.reason
        d = authorize_http(facts, HttpFacts("GET", "/", "web", headers, authn.auth), snap.policies)
        return (200 if d.allowed else 403), d.reason

    assert request({"authorization": f"Bearer {tok}"})[0] == 200
    assert request({})[0] == 403  # no token: RequestAuthentication passes it, the policy wants a principal
    assert request({"authorization": "Bearer x.y.z"})[0] == 401
    expired = jwt.encode({"alg": "ES256", "kid": "idp-1"}, {"iss": "https://idp.example", "sub": "a", "exp": now - 61}, KEY)
    assert request({"authorization": f"Bearer {expired}"}) == (401, "Jwt is expired")


@pytest.mark.parametrize(("policies", "allowed", "reason"), [
    pytest.param("", True, "no ALLOW or DENY policy applies", id="nothing-applies"),
    pytest.param(src("principals", "[cluster.local/ns/shop/sa/frontend]"), True, "principals[0]", id="l4-allow"),
    pytest.param(src("principals", "[cluster.local/ns/shop/sa/other]"), False, "none matched", id="l4-deny"),
    pytest.param(op("methods", "[GET]"), False, "not HTTP, and rules that need HTTP apply (shop/p rule 0)", id="l7-rule"),
    pytest.param(op("methods", "[GET]", "DENY"), False, "rules that need HTTP apply", id="l7-deny-rule"),
    pytest.param(request_authn("jwt", "shop", "", "https://idp.example"), False, "shop/jwt jwtRules[0]", id="jwt"),
    pytest.param(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: shop}\n"
        "spec:\n  action: CUSTOM\n  provider: {name: authz}\n  rules:\n  - to:\n    - operation: {ports: ['8080']}\n",
        False, "CUSTOM shop/ext rule 0 matched: its provider authz judges requests only", id="custom"),
])
def test_authorize_opaque(policies: str, allowed: bool, reason: str) -> None:
    snap = build_snapshot(build_state(load_documents(CLUSTER + policies)), "node-a")
    assert not snap.errors, snap.errors
    wl = snap.workload("shop/web")
    assert wl is not None
    facts = ConnectionFacts("10.9.0.1", SpiffeId("cluster.local", "shop", "frontend"), wl, 8080, True)
    d = authorize_opaque(facts, snap.policies, providers=("authz",))
    assert d.allowed is allowed, d
    assert reason in d.reason, d
