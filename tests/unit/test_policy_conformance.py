"""Conformance with Istio's validation: ambit accepts what Istio accepts, refuses what it refuses,
and says of every accepted object what it enforces and where (`ambit.policy.status`).

Istio's column is written down from Istio's own rules (istio/istio pkg/config/validation:
ValidateAuthorizationPolicy, ValidatePeerAuthentication, ValidateRequestAuthentication,
validatePolicyTargetReference, the dry-run annotation check; pkg/config/security:
ValidateAttribute, CheckServiceAccount, CheckValidPathTemplate, ValidatePorts, ValidateIPs),
not derived from ambit. Then: dry-run policies decide nothing, and what they would have
decided reaches the decision, the access log, `ambit flows` and the metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from joserfc.jwk import ECKey
from prometheus_client import generate_latest
from rich.console import Console

from agent.flowjoin import join_flows
from agent.inspect import FLOW_COLUMNS, flow_rows, make_table, policy_field_notes
from ambit.cluster import build_state, load_documents
from ambit.policy import (
    CompiledAuthz,
    ConnectionFacts,
    HttpFacts,
    PolicyError,
    PolicySet,
    authorize,
    authorize_http,
    check,
    compile_policy,
)
from ambit.snapshot import Snapshot, build_snapshot
from ambit.spiffe import SpiffeId
from ambit.wire.snapshot import decode_snapshot, encode_snapshot
from ztunnel.accesslog import entry
from ztunnel.conntrack import INBOUND, ConnRecord
from ztunnel.inbound import apply_check, check_inbound
from ztunnel.metrics import Metrics

JWKS = json.dumps({"keys": [ECKey.generate_key("P-256", parameters={"kid": "k"}).as_dict(private=False)]})


def ap(spec: str, ns: str = "shop", annotations: str = "") -> str:
    meta = f"{{name: p, namespace: {ns}{', annotations: {' + annotations + '}' if annotations else ''}}}"
    return f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\nspec:\n{spec}\n"


def pa(spec: str, ns: str = "shop", annotations: str = "") -> str:
    meta = f"{{name: p, namespace: {ns}{', annotations: {' + annotations + '}' if annotations else ''}}}"
    return f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {meta}\nspec:\n{spec}\n"


def ra(spec: str, ns: str = "shop", annotations: str = "") -> str:
    meta = f"{{name: p, namespace: {ns}{', annotations: {' + annotations + '}' if annotations else ''}}}"
    return f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {meta}\nspec:\n{spec}\n"


def rule(body: str) -> str:
    return f"  rules:\n  - {body}"


def when(key: str, values: str = "[a]", field: str = "values") -> str:
    return rule(f"when:\n    - key: '{key}'\n      {field}: {values}")


def src(fields: str) -> str:
    return rule(f"from:\n    - source: {{{fields}}}")


def to(fields: str) -> str:
    return rule(f"to:\n    - operation: {{{fields}}}")


def jwt(fields: str) -> str:
    return ra(f"  jwtRules:\n  - {{{fields}}}")


@dataclass(frozen=True)
class Row:
    id: str
    yaml: str
    istio: bool  # does Istio's validation accept it?
    why: str  # Istio's rule, in words
    status: str = ""  # accepted: ambit's status for it; refused: a piece of ambit's error


CUSTOM = "  action: CUSTOM\n  provider: {name: ext-authz}\n"
DENY = "  action: DENY\n"

TABLE: list[Row] = [
    # --- the shapes issue 11 names: Istio accepts them, ambit did not
    Row("custom-with-provider", ap(CUSTOM + to("paths: [/admin/*]")), True,
        "CUSTOM needs rules and provider.name", "stricter"),
    Row("target-refs-service-entry", ap("  targetRefs:\n  - {kind: ServiceEntry, group: networking.istio.io, name: ext}"),
        True, "targetRef kinds: Service, ServiceEntry, Gateway, GatewayClass", "no-effect"),
    Row("target-refs-gateway-class", ap("  targetRefs:\n  - {kind: GatewayClass, group: gateway.networking.k8s.io, "
                                        "name: istio-waypoint}", ns="istio-system"), True,
        "targetRef kinds: Service, ServiceEntry, Gateway, GatewayClass", "enforced"),
    Row("when-source-service-account", when("source.serviceAccount", "[shop/web, db]"), True,
        "source.serviceAccount: values as serviceAccounts", "enforced"),
    Row("when-inline-headers", when("request.experimental.inline.headers[x-user]"), True,
        "request.experimental.inline.headers[<name>]", "waypoint"),
    Row("when-envoy-filters", when("experimental.envoy.filters.network.mysql_proxy[db.table]"), True,
        "experimental.envoy.filters.*[<key>]", "stricter"),
    Row("port-zero", to("ports: ['0']"), True, "ports parse as 0-65535", "enforced"),
    # --- more accepted shapes
    Row("custom-provider-deny-http-only", ap(CUSTOM + to("methods: [DELETE]")), True, "CUSTOM with HTTP fields", "stricter"),
    Row("target-refs-gateway-class-other-ns", ap("  targetRefs:\n  - {kind: GatewayClass, group: "
                                                 "gateway.networking.k8s.io, name: istio-waypoint}"), True,
        "validation does not look at the namespace", "no-effect"),
    Row("target-refs-gateway-class-ingress", ap("  targetRefs:\n  - {kind: GatewayClass, group: "
                                                "gateway.networking.k8s.io, name: istio}", ns="istio-system"), True,
        "any GatewayClass name", "no-effect"),
    Row("target-refs-mixed", ap("  targetRefs:\n  - {kind: Service, name: web}\n  - {kind: ServiceEntry, group: "
                                "networking.istio.io, name: ext}"), True, "each targetRef on its own", "partial"),
    Row("target-ref-gateway", ap("  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: wp}"),
        True, "Gateway", "enforced"),
    Row("when-connection-sni", when("connection.sni", "[a.example]", "notValues"), True, "connection.sni", "stricter"),
    Row("when-destination-port-zero", when("destination.port", "['0']"), True, "ports parse as 0-65535", "enforced"),
    Row("not-ports-zero", to("notPorts: ['0']"), True, "ports parse as 0-65535", "enforced"),
    Row("http-fields", to("methods: [GET], paths: ['/api/{*}/items/{**}']"), True, "templates {*}, {**} last",
        "waypoint"),
    Row("http-only-deny", ap(DENY + to("methods: [POST]")), True, "a warning only (denies TCP too)", "waypoint"),
    Row("remote-ip-blocks", src("remoteIpBlocks: [203.0.113.0/24]"), True, "IPs and CIDRs", "waypoint"),
    Row("service-accounts", src("serviceAccounts: [web, other/db]"), True, "without principals/namespaces", "enforced"),
    Row("claims", when("request.auth.claims[groups][0]"), True, "request.auth.claims[...]", "waypoint"),
    Row("dry-run-deny", ap(DENY + rule("{}"), annotations='"istio.io/dry-run": "true"'), True,
        "dry-run on ALLOW or DENY, a Go bool", "enforced"),
    Row("dry-run-allow-go-bool", ap(src("namespaces: [a]"), annotations='"istio.io/dry-run": "T"'), True,
        "strconv.ParseBool", "enforced"),
    Row("dry-run-false", ap(DENY + rule("{}"), annotations='"istio.io/dry-run": "false"'), True,
        "strconv.ParseBool", "enforced"),
    Row("audit", ap("  action: AUDIT\n" + rule("{}")), True, "AUDIT", "enforced"),
    Row("allow-nothing", ap("  {}"), True, "an ALLOW without rules", "enforced"),
    Row("empty-match-labels", ap("  selector: {matchLabels: {}}\n" + rule("{}")), True, "a warning only", "enforced"),
    Row("v1beta1", ap(rule("{}")).replace("security.istio.io/v1", "security.istio.io/v1beta1"), True, "v1beta1",
        "enforced"),
    # --- what Istio refuses, ambit refuses too
    Row("deny-without-rules", ap(DENY), False, "DENY without rules is meaningless", "without rules never applies"),
    Row("custom-without-rules", ap(CUSTOM), False, "CUSTOM without rules", "without rules never applies"),
    Row("custom-without-provider", ap("  action: CUSTOM\n" + rule("{}")), False, "provider.name must not be empty",
        "names its extension provider"),
    Row("custom-empty-provider", ap("  action: CUSTOM\n  provider: {name: ''}\n" + rule("{}")), False,
        "provider.name must not be empty", "names its extension provider"),
    Row("custom-principals", ap(CUSTOM + rule("from:\n    - source: {principals: [a]}")), False,
        "From.Principals not supported with CUSTOM", "not supported in a CUSTOM policy"),
    Row("custom-request-principals", ap(CUSTOM + rule("from:\n    - source: {notRequestPrincipals: [a]}")), False,
        "From.NotRequestPrincipals not supported with CUSTOM", "not supported in a CUSTOM policy"),
    Row("custom-when-namespace", ap(CUSTOM + rule("when:\n    - {key: source.namespace, values: [a]}")), False,
        "source.namespace not supported with CUSTOM", "not supported in a CUSTOM policy"),
    Row("custom-when-claims", ap(CUSTOM + rule("when:\n    - {key: 'request.auth.claims[a]', values: [a]}")), False,
        "request.auth.* not supported with CUSTOM", "not supported in a CUSTOM policy"),
    Row("provider-with-allow", ap("  provider: {name: x}\n" + rule("{}")), False, "provider only with CUSTOM",
        "only valid with action CUSTOM"),
    Row("dry-run-audit", ap("  action: AUDIT\n" + rule("{}"), annotations='"istio.io/dry-run": "true"'), False,
        "dry-run only with ALLOW/DENY", "ALLOW and DENY policies only"),
    Row("dry-run-custom", ap(CUSTOM + rule("{}"), annotations='"istio.io/dry-run": "true"'), False,
        "dry-run only with ALLOW/DENY", "ALLOW and DENY policies only"),
    Row("dry-run-not-bool", ap(rule("{}"), annotations='"istio.io/dry-run": "yes"'), False, "strconv.ParseBool",
        "not a boolean"),
    Row("always-reject", ap(rule("{}"), annotations='"istio.io/always-reject": ""'), False, "always-reject",
        "asks for the object to be rejected"),
    Row("selector-and-target-refs", ap("  selector: {matchLabels: {app: web}}\n  targetRefs:\n  - {kind: Service, "
                                       "name: web}"), False, "one of selector/targetRef/targetRefs", "not both"),
    Row("target-ref-other-namespace", ap("  targetRefs:\n  - {kind: Service, name: web, namespace: other}"), False,
        "no cross-namespace reference", "policy's own namespace"),
    Row("target-ref-deployment", ap("  targetRefs:\n  - {kind: Deployment, group: apps, name: web}"), False,
        "targetRef kinds", "not one Istio takes"),
    Row("target-ref-no-name", ap("  targetRefs:\n  - {kind: Service}"), False, "name must be set", "is required"),
    Row("service-accounts-with-principals", src("serviceAccounts: [a], principals: [b]"), False,
        "serviceAccounts with namespaces or principals", "without principals or namespaces"),
    Row("service-accounts-wildcard", src("serviceAccounts: ['*']"), False, "no wildcard", "wildcards are not allowed"),
    Row("service-accounts-17", src("serviceAccounts: [" + ", ".join(f"s{i}" for i in range(17)) + "]"), False,
        "at most 16", "at most 16"),
    Row("when-service-account-shape", when("source.serviceAccount", "[a/b/c]"), False, "ns/sa or sa",
        "not <namespace>/<service-account>"),
    Row("path-template-not-last", to("paths: ['/a/{**}/{*}']"), False, "{**} is the last operator", "last operator"),
    Row("path-braces", to("paths: ['/a/{id}']"), False, "no other braces", "braces are only allowed"),
    Row("when-destination-namespace", when("destination.namespace"), False, "replaced by metadata.namespace",
        "unknown condition key"),
    Row("when-destination-labels", when("destination.labels[app]"), False, "replaced by the selector",
        "unknown condition key"),
    Row("when-unknown", when("source.user"), False, "unknown attribute", "unknown condition key"),
    Row("when-header-no-name", when("request.headers[]"), False, "a[b]", "unknown condition key"),
    Row("when-envoy-filter-no-key", when("experimental.envoy.filters.x"), False, "a[b]", "unknown condition key"),
    Row("when-without-values", rule("when:\n    - {key: source.ip}"), False, "values or notValues",
        "needs `values` or `notValues`"),
    Row("port-65536", to("ports: ['65536']"), False, "ports parse as 0-65535", "out of range"),
    Row("port-name", to("ports: [http]"), False, "ports parse as numbers", "not a port number"),
    Row("bad-cidr", src("ipBlocks: [10.0.0.0/33]"), False, "ValidateIPs", "not an IP address"),
    Row("empty-source", rule("from:\n    - source: {}"), False, "from.source must not be empty", "at least one field"),
    Row("empty-operation", rule("to:\n    - operation: {}"), False, "to.operation must not be empty",
        "at least one field"),
    Row("empty-from", rule("from: []"), False, "from must not be empty", "must not be an empty list"),
    Row("empty-value", src("principals: ['']"), False, "CheckEmptyValues", "empty string"),
    Row("selector-wildcard", ap("  selector: {matchLabels: {app: '*'}}"), False, "no wildcard in a selector",
        "wildcards"),
    Row("selector-empty-key", ap("  selector: {matchLabels: {'': web}}"), False, "no empty key", "must not be empty"),
    # --- PeerAuthentication
    Row("pa-strict", pa("  mtls: {mode: STRICT}"), True, "modes", "enforced"),
    Row("pa-port-level", pa("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    8080: {mode: DISABLE}"),
        True, "portLevelMtls with a selector", "enforced"),
    Row("pa-root-selector", pa("  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}", ns="istio-system"),
        True, "validation does not look at the namespace", "no-effect"),
    Row("pa-port-level-no-selector", pa("  portLevelMtls:\n    8080: {mode: STRICT}"), False,
        "mesh/namespace cannot have port level mTLS", "needs a workload selector"),
    Row("pa-port-level-empty", pa("  selector: {matchLabels: {app: web}}\n  portLevelMtls: {}"), False,
        "port level mTLS, if defined, must have an element", "must not be empty"),
    Row("pa-port-zero", pa("  selector: {matchLabels: {app: web}}\n  portLevelMtls:\n    0: {mode: STRICT}"), False,
        "port in 1..65535", "out of range"),
    Row("pa-dry-run", pa("  mtls: {mode: STRICT}", annotations='"istio.io/dry-run": "true"'), False,
        "dry-run only on AuthorizationPolicy", "only an AuthorizationPolicy can be dry-run"),
    # --- RequestAuthentication
    Row("ra-inline-jwks", jwt(f"issuer: a, jwks: '{JWKS}'"), True, "jwks parses", "waypoint"),
    Row("ra-jwks-uri-https", jwt("issuer: a, jwksUri: 'https://idp.example/jwks'"), True, "jwksUri http(s)",
        "stricter"),
    Row("ra-oidc-discovery", jwt("issuer: https://idp.example"), True, "keys may be discovered", "stricter"),
    Row("ra-timeout", jwt("issuer: a, jwksUri: 'https://idp.example/jwks', timeout: 5s"), True, "a duration",
        "stricter"),
    Row("ra-no-issuer", jwt("jwksUri: 'https://idp.example/jwks'"), True, "issuer or jwksUri", "stricter"),
    Row("ra-symmetric-key", jwt("issuer: a, jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}]}'"), True,
        "any JWK Set", "stricter"),
    Row("ra-both-key-sources", jwt(f"issuer: a, jwks: '{JWKS}', jwksUri: 'https://idp.example/jwks'"), True,
        "only one should be used: not checked", "waypoint"),
    Row("ra-odd-header-name", jwt(f"issuer: a, jwks: '{JWKS}', fromHeaders: [{{name: 'x token'}}]"), True,
        "a non-empty name", "waypoint"),
    Row("ra-target-ref-service-entry", ra("  targetRefs:\n  - {kind: ServiceEntry, group: networking.istio.io, "
                                          "name: x}"), True, "targetRef kinds", "no-effect"),
    Row("ra-no-issuer-no-uri", jwt(f"jwks: '{JWKS}'"), False, "issuer or jwksUri must be non-empty",
        "`issuer` is required"),
    Row("ra-jwks-not-json", jwt("issuer: a, jwks: nope"), False, "jwks parse error", "not valid JSON"),
    Row("ra-empty-audience", jwt(f"issuer: a, jwks: '{JWKS}', audiences: ['']"), False, "audience non-empty",
        "empty string"),
    Row("ra-empty-param", jwt(f"issuer: a, jwks: '{JWKS}', fromParams: ['']"), False, "location query non-empty",
        "empty string"),
    Row("ra-claim-header-no-claim", jwt(f"issuer: a, jwks: '{JWKS}', outputClaimToHeaders: [{{header: x-a}}]"), False,
        "header and claim non-empty", "`claim` is required"),
    Row("ra-dry-run", jwt(f"issuer: a, jwks: '{JWKS}'").replace("name: p,", "name: p, annotations: "
                                                                 "{istio.io/dry-run: 'true'},"), False,
        "dry-run only on AuthorizationPolicy", "only an AuthorizationPolicy can be dry-run"),
]

# Where ambit accepts more than Istio, on purpose (same meaning, or a local extension).
EXTENSIONS: list[tuple[str, str]] = [
    ("target-ref-own-namespace", ap("  targetRefs:\n  - {kind: Service, name: web, namespace: shop}")),
    ("integer-ports", to("ports: [8080]")),
    ("ra-jwks-file", jwt("issuer: a, jwksUri: /etc/ambit/jwks.json")),
]


def _compile(text: str) -> object:
    if not text.startswith("apiVersion"):
        text = ap(text)  # a bare spec: an AuthorizationPolicy shop/p
    (obj,) = build_state(load_documents(text)).policies
    return compile_policy(obj)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in TABLE])
def test_istio_acceptance_and_ambit_status_agree(row: Row) -> None:
    if not row.istio:
        with pytest.raises(PolicyError) as exc:
            _compile(row.yaml)
        assert row.status in str(exc.value), str(exc.value)
        return
    c = _compile(row.yaml)
    ps = PolicySet.build([c])  # type: ignore[list-item]
    st = ps.statuses[c.key]  # type: ignore[attr-defined]
    assert st.status == row.status, (st.status, st.summary, st.fields)
    (summary,) = ps.summary()
    assert summary["status"] == row.status and summary["status_summary"]
    # every part that is not enforced as written says so, with its field
    assert all(f["field"].startswith("spec.") and f["detail"] for f in summary["enforcement"])
    if row.status != "enforced":
        assert policy_field_notes([{"key": "shop/p", **summary}]), summary
    # and it travels to the ztunnel, the waypoint and the CLI unchanged
    snap = Snapshot.empty().__class__("n", "cluster.local", {}, {}, {}, ps)
    assert decode_snapshot(encode_snapshot(snap)).policies.compiled == ps.compiled


@pytest.mark.parametrize(("text",), [pytest.param(t, id=i) for i, t in EXTENSIONS])
def test_ambit_extensions_are_accepted(text: str) -> None:
    _compile(text)


def test_every_shape_of_the_issue_is_in_the_table() -> None:
    ids = {r.id for r in TABLE if r.istio}
    assert {"custom-with-provider", "target-refs-service-entry", "target-refs-gateway-class",
            "when-source-service-account", "when-inline-headers", "when-envoy-filters", "port-zero"} <= ids


# ---------------------------------------------------------------------------
# what the accepted shapes do

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: ui, namespace: shop, labels: {app: ui, ambit.dev/use-waypoint: wp}}
spec: {nodeName: node-a, serviceAccountName: ui}
status: {podIP: 10.1.0.7, phase: Running}
"""


def snap_with(policies: str) -> Snapshot:
    s = build_snapshot(build_state(load_documents(CLUSTER + "---\n" + policies)), "node-a")
    assert not s.errors, s.errors
    return s


def l4(s: Snapshot, src: str = "shop/client", port: int = 8080, dst: str = "shop/web") -> ConnectionFacts:
    ns, sa = src.split("/")
    w = s.workload(dst)
    assert w is not None
    return ConnectionFacts("10.1.0.9", SpiffeId("cluster.local", ns, sa), w, port, True)


def req(method: str = "GET", path: str = "/", headers: dict[str, str] | None = None) -> HttpFacts:
    return HttpFacts(method, path, "web", headers or {})


def test_custom_denies_at_l4_and_without_its_provider_and_asks_it_where_configured() -> None:
    s = snap_with(ap(CUSTOM + to("paths: [/admin/*]")))
    d = authorize(l4(s), s.policies)
    assert not d.allowed and d.policy == "shop/p" and "the ztunnel cannot ask an external authorizer" in d.reason
    ui = l4(s, dst="shop/ui")
    d = authorize_http(ui, req(path="/admin/x"), s.policies)
    assert not d.allowed and "'ext-authz' is not configured at this waypoint" in d.reason
    d = authorize_http(ui, req(path="/admin/x"), s.policies, providers={"ext-authz"})
    assert d.allowed and [c.provider for c in d.custom] == ["ext-authz"] and d.custom[0].rule == 0
    d = authorize_http(ui, req(path="/public"), s.policies, providers={"ext-authz"})
    assert d.allowed and not d.custom
    # a DENY decides before the provider would be asked
    s = snap_with(ap(CUSTOM + rule("{}")) + "---\n" + ap(DENY + to("methods: [DELETE]")).replace("name: p", "name: q"))
    d = authorize_http(l4(s, dst="shop/ui"), req("DELETE"), s.policies, providers={"ext-authz"})
    assert not d.allowed and d.policy == "shop/q" and not d.custom


def test_policy_check_reports_a_custom_provider_it_cannot_see() -> None:
    s = snap_with(ap(CUSTOM + to("paths: [/admin/*]")))
    d = check(l4(s, dst="shop/ui"), s.policies, http=req(path="/admin/x"))  # asked of a ztunnel
    assert d.allowed and [c.provider for c in d.custom] == ["ext-authz"]
    assert any("asks ext-authz if it has them configured" in n for n in d.notes)
    d = check(l4(s, dst="shop/ui"), s.policies, http=req(path="/admin/x"), providers=())  # asked of the waypoint
    assert not d.allowed and not d.custom
    assert not check(l4(s), s.policies, http=req(path="/admin/x")).allowed  # no waypoint: the ztunnel denies


def test_unsupported_fields_never_allow_and_deny_more() -> None:
    envoy = "experimental.envoy.filters.network.mysql_proxy[db.table]"
    s = snap_with(ap(when(envoy, "[t]")))
    ui = l4(s, dst="shop/ui")
    d = authorize_http(ui, req(), s.policies)
    assert not d.allowed and "needs fields no ambit proxy evaluates" in " ".join(d.notes)
    s = snap_with(ap(DENY + rule(f"to:\n    - operation: {{ports: ['8080']}}\n    when:\n    - key: '{envoy}'\n"
                                 "      values: [t]")))
    d = authorize_http(l4(s, dst="shop/ui"), req(), s.policies)
    assert not d.allowed and "denies more than written" in " ".join(d.notes)
    d = authorize_http(l4(s, port=9090, dst="shop/ui"), req(), s.policies)
    assert d.allowed  # the rest of the rule (the port) still decides


def test_new_condition_keys_and_port_zero() -> None:
    s = snap_with(ap(when("source.serviceAccount", "[client]")))  # bare: the policy's namespace
    assert authorize(l4(s), s.policies).allowed
    assert not authorize(l4(s, "other/client"), s.policies).allowed
    s = snap_with(ap(when("request.experimental.inline.headers[x-user]", "[alice]")))
    ui = l4(s, dst="shop/ui")
    assert authorize_http(ui, req(headers={"X-User": "alice"}), s.policies).allowed
    assert not authorize_http(ui, req(headers={"X-User": "bob"}), s.policies).allowed
    s = snap_with(ap(when("request.experimental.inline.headers[:method]", "[GET]")))
    assert authorize_http(l4(s, dst="shop/ui"), req("GET"), s.policies).allowed
    s = snap_with(ap(to("ports: ['0']")))
    assert not authorize(l4(s), s.policies).allowed  # no connection is on port 0
    s = snap_with(ap(to("notPorts: ['0']")))
    assert authorize(l4(s), s.policies).allowed


def test_gateway_class_and_service_entry_targets() -> None:
    gwc = "  targetRefs:\n  - {kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}\n"
    s = snap_with(ap(DENY + gwc + rule("{}"), ns="istio-system"))
    assert not authorize_http(l4(s, dst="shop/ui"), req(), s.policies).allowed  # every waypoint
    assert authorize(l4(s), s.policies).allowed  # not at a ztunnel
    s = snap_with(ap(DENY + gwc + rule("{}")))  # not from the root namespace: no effect, as in Istio
    assert authorize_http(l4(s, dst="shop/ui"), req(), s.policies).allowed
    se = "  targetRefs:\n  - {kind: ServiceEntry, group: networking.istio.io, name: ext}\n"
    s = snap_with(ap(DENY + se + rule("{}")))
    assert authorize(l4(s), s.policies).allowed and authorize_http(l4(s, dst="shop/ui"), req(), s.policies).allowed


# ---------------------------------------------------------------------------
# dry-run: decides nothing; its would-be decisions reach the decision, the log, flows, the metric

DRY = '"istio.io/dry-run": "true"'


def test_dry_run_decides_nothing_and_says_what_it_would_have() -> None:
    s = snap_with(ap(DENY + rule("{}"), annotations=DRY))
    d = authorize(l4(s), s.policies)
    assert d.allowed and d.policy is None
    assert [x.to_dict() for x in d.dry_run] == [
        {"policy": "shop/p", "rule": 0, "decision": "deny",
         "reason": "denied by DENY policy shop/p rule 0: the rule is empty and matches every connection"}]
    assert d.dry_run[0].words() == "would deny by shop/p rule 0"
    # a dry-run ALLOW that does not match would turn on default deny
    s = snap_with(ap(src("namespaces: [trusted]"), annotations=DRY))
    d = authorize(l4(s), s.policies)
    assert d.allowed and d.dry_run[0].decision == "deny" and d.dry_run[0].rule is None
    assert d.dry_run[0].words() == "would deny by shop/p"
    d = authorize(l4(s, "trusted/x"), s.policies)
    assert d.allowed and d.dry_run[0].words() == "would allow by shop/p rule 0"
    # at a waypoint too, with HTTP fields; an enforced policy still decides
    s = snap_with(ap(DENY + to("methods: [DELETE]"), annotations=DRY)
                  + "---\n" + ap(to("methods: [GET, DELETE]")).replace("name: p", "name: q"))
    d = authorize_http(l4(s, dst="shop/ui"), req("DELETE"), s.policies)
    assert d.allowed and d.policy == "shop/q" and d.dry_run[0].words() == "would deny by shop/p rule 0"
    d = authorize_http(l4(s, dst="shop/ui"), req("GET"), s.policies)
    assert d.allowed and d.dry_run[0].decision == "allow"
    assert "dry_run" in d.to_dict() and d.to_dict()["dry_run"][0]["policy"] == "shop/p"
    # compiled with the flag, and it survives the wire
    c = s.policies.by_key["AuthorizationPolicy/shop/p"]
    assert isinstance(c, CompiledAuthz) and c.dry_run
    ui = s.workload("shop/ui")
    assert ui is not None and decode_snapshot(encode_snapshot(s)).policies.applicable_dry_run(ui, at_waypoint=True)


def test_dry_run_reaches_the_access_log_flows_and_metric() -> None:
    s = snap_with(ap(DENY + rule("{}"), annotations=DRY))
    chk = check_inbound(s, "10.1.0.5", 8080, src_ip="10.1.0.9", src_identity=SpiffeId("cluster.local", "shop", "c"),
                        mtls=True)
    assert chk.refusal is None  # not enforced
    rec = ConnRecord(INBOUND, "10.1.0.9", 40000, "10.1.0.5", 8080, upstream_local="10.1.0.1:5000")
    apply_check(rec, chk)
    want = {"policy": "shop/p", "rule": 0, "decision": "deny"}
    assert [{k: d[k] for k in want} for d in entry(rec)["dry_run"]] == [want]
    assert rec.to_json()["dry_run"] == rec.dry_run
    # ambit flows: the agent's join keeps it, the table marks the policy cell
    (row,) = join_flows([], [rec.to_json()], 0)
    assert row["dry_run"] == rec.dry_run
    args = type("A", (), {"denied": False, "pod": None})()
    (cell,) = flow_rows([row], args)  # type: ignore[arg-type]
    assert cell["policy"] == "- (dry-run: would deny by shop/p rule 0)"
    table = make_table([cell], FLOW_COLUMNS, "flows")
    out = Console(width=400, record=True)
    out.print(table)
    assert "(dry-run: would deny by shop/p rule 0)" in out.export_text()
    # the metric, counted once per inbound connection
    m = Metrics()
    rec.decision = "allow"
    m.connection_closed(rec)
    text = generate_latest(m.registry).decode()
    assert 'ambit_policy_dry_run_decisions_total{decision="deny",policy="shop/p"} 1.0' in text


def test_not_fully_enforced_metric_counts_by_kind_and_status() -> None:
    s = snap_with(ap(CUSTOM + rule("{}")) + "---\n"
                  + ap(to("ports: ['80']")).replace("name: p", "name: q") + "---\n"
                  + jwt("issuer: a, jwksUri: 'https://idp.example/jwks'"))
    m = Metrics()
    m.policies_in_force(s.policies)
    text = generate_latest(m.registry).decode()
    assert 'ambit_policies_not_fully_enforced{kind="AuthorizationPolicy",status="stricter"} 1.0' in text
    assert 'ambit_policies_not_fully_enforced{kind="RequestAuthentication",status="stricter"} 1.0' in text
    assert 'ambit_policies_not_fully_enforced{kind="PeerAuthentication",status="no-effect"} 0.0' in text
