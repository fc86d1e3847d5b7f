"""Policy validation: every rejection names the object (kind ns/name) and the field path."""

from __future__ import annotations

import pytest

from ambit.cluster import build_state, load_documents
from ambit.policy import CompiledAuthz, CompiledPeerAuthn, PolicyError, PolicySet, compile_policy


def compile_yaml(text: str) -> CompiledAuthz | CompiledPeerAuthn:
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


AP = "AuthorizationPolicy shop/bad"
PA = "PeerAuthentication shop/bad"

# (id, yaml, object, field path, a piece of the reason)
BAD: list[tuple[str, str, str, str, str]] = [
    ("bad-cidr", src("ipBlocks", "[10.0.0.0/8, 1.2.3.4, 10.0.0.300/8]"), AP, "spec.rules[0].from[0].source.ipBlocks[2]", "not an IP address or CIDR"),
    ("bad-cidr-not-ip-blocks", src("notIpBlocks", "[10.0.0.0/33]"), AP, "spec.rules[0].from[0].source.notIpBlocks[0]", "not an IP address"),
    ("bad-cidr-when", authz("  rules:\n  - when:\n    - key: source.ip\n      values: [nope]"), AP, "spec.rules[0].when[0].values[0]", "not an IP address"),
    ("port-zero", op("ports", '["0"]'), AP, "spec.rules[0].to[0].operation.ports[0]", "out of range 1-65535"),
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
    ("custom-not-supported", authz("  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - {}"), AP, "spec.action", "CUSTOM (external authorization) is not supported"),
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
    ("target-ref-kind", authz("  targetRefs:\n  - kind: ServiceEntry\n    group: networking.istio.io\n    name: x"), AP, "spec.targetRefs[0].kind", "not supported"),
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
        "        notRemoteIpBlocks: ['1.2.3.4']\n        serviceAccounts: [web]\n        notServiceAccounts: [a/b]"
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


def test_policy_set_build_raises_on_bad_object_and_summarises() -> None:
    docs = load_documents(authz("  action: DENY\n  rules:\n  - {}", name="ok") + "---\n" + src("ipBlocks", "[x]"))
    objs = build_state(docs).policies
    with pytest.raises(PolicyError, match="AuthorizationPolicy shop/bad"):
        PolicySet.build(objs)
    ps = PolicySet.build([o for o in objs if o.meta.name == "ok"])
    assert ps.summary() == [
        {"kind": "AuthorizationPolicy", "namespace": "shop", "name": "ok", "action": "DENY",
         "scope": "namespace", "rules": 1, "http_rules": []}
    ]
