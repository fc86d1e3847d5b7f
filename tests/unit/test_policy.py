"""L4 authorization and PeerAuthentication, table-driven, with Istio YAML as users write it."""

from __future__ import annotations

import pytest

from ambit.cluster import build_state, load_documents
from ambit.policy import ConnectionFacts, Decision, authorize, mtls_mode, mtls_policy
from ambit.snapshot import Snapshot, build_snapshot
from ambit.spiffe import SpiffeId

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, tier: front}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-a, serviceAccountName: db}
status: {podIP: 10.1.0.6, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: other, labels: {app: api}}
spec: {nodeName: node-b, serviceAccountName: api}
status: {podIP: 10.2.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: ui, namespace: shop, labels: {app: ui, ambit.dev/use-waypoint: shop-wp}}
spec: {nodeName: node-a, serviceAccountName: ui}
status: {podIP: 10.1.0.7, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
"""


def snapshot(policies: str = "", root: str = "istio-system") -> Snapshot:
    docs = load_documents(CLUSTER + "\n---\n" + policies)
    snap = build_snapshot(build_state(docs), "node-a", root_namespace=root)
    assert not snap.errors, snap.errors
    return snap


def ident(src: str | None) -> SpiffeId | None:
    if src is None:
        return None
    td, _, rest = src.rpartition("@")
    ns, sa = rest.split("/")
    return SpiffeId(td or "cluster.local", ns, sa)


def decide(
    policies: str,
    src: str | None,
    *,
    dst: str = "shop/web",
    port: int = 8080,
    src_ip: str = "10.9.0.1",
    root: str = "istio-system",
    via_waypoint: bool = False,
) -> Decision:
    snap = snapshot(policies, root)
    wl = snap.workload(dst)
    assert wl is not None
    facts = ConnectionFacts(src_ip, ident(src), wl, port, mtls=src is not None)
    return authorize(facts, snap.policies, via_waypoint=via_waypoint)


def ap(name: str, spec: str, ns: str = "shop", api: str = "security.istio.io/v1") -> str:
    """An AuthorizationPolicy document; `spec` is the YAML body under `spec:` (indented 2)."""
    return f"apiVersion: {api}\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"


ALLOW_FRONTEND = ap(
    "allow-frontend",
    """
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/shop/sa/frontend]""",
)


def allow_from(field: str, values: str) -> str:
    return ap("allow", f"  action: ALLOW\n  rules:\n  - from:\n    - source:\n        {field}: {values}")


def allow_to(field: str, values: str) -> str:
    return ap("allow", f"  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        {field}: {values}")


def deny_from(field: str, values: str) -> str:
    return ap("deny", f"  action: DENY\n  rules:\n  - from:\n    - source:\n        {field}: {values}")


def allow_when(key: str, field: str, values: str) -> str:
    return ap("allow", f"  rules:\n  - when:\n    - key: {key}\n      {field}: {values}")


# (policies, source "ns/sa" or None for plaintext, kwargs, allowed, decided-by "ns/name#rule" or
# None, a piece of the reason)
CASES: list[tuple[str, str, str | None, dict[str, object], bool, str | None, str]] = [
    ("no-policy", "", "shop/frontend", {}, True, None, "no ALLOW or DENY policy applies"),
    ("principal-exact", ALLOW_FRONTEND, "shop/frontend", {}, True, "shop/allow-frontend#0", "matches principals[0]"),
    ("principal-exact-miss", ALLOW_FRONTEND, "shop/other", {}, False, None, "no ALLOW policy matched: 1 ALLOW policy applies (shop/allow-frontend)"),
    ("principal-plaintext", ALLOW_FRONTEND, None, {}, False, None, "none matched"),
    ("principal-other-trust-domain", ALLOW_FRONTEND, "evil.org@shop/frontend", {}, False, None, "none matched"),
    ("principal-prefix", allow_from("principals", '["cluster.local/ns/shop/*"]'), "shop/anything", {}, True, "shop/allow#0", "principals[0]"),
    ("principal-prefix-miss", allow_from("principals", '["cluster.local/ns/shop/*"]'), "legacy/x", {}, False, None, "none matched"),
    ("principal-suffix", allow_from("principals", '["*/sa/frontend"]'), "legacy/frontend", {}, True, "shop/allow#0", "principals[0]"),
    ("principal-suffix-miss", allow_from("principals", '["*/sa/frontend"]'), "legacy/backend", {}, False, None, "none matched"),
    ("principal-presence-mtls", allow_from("principals", '["*"]'), "legacy/backend", {}, True, "shop/allow#0", "principals[0]"),
    ("principal-presence-plaintext", allow_from("principals", '["*"]'), None, {}, False, None, "none matched"),
    ("principal-second-value", allow_from("principals", "[cluster.local/ns/a/sa/b, cluster.local/ns/shop/sa/web]"), "shop/web", {}, True, "shop/allow#0", "principals[1]"),
    ("not-principals-excluded", allow_from("notPrincipals", "[cluster.local/ns/legacy/sa/old]"), "legacy/old", {}, False, None, "none matched"),
    ("not-principals-other", allow_from("notPrincipals", "[cluster.local/ns/legacy/sa/old]"), "shop/web", {}, True, "shop/allow#0", "is not in notPrincipals"),
    ("not-principals-plaintext", allow_from("notPrincipals", "[cluster.local/ns/legacy/sa/old]"), None, {}, True, "shop/allow#0", "no source principal"),
    ("namespaces", allow_from("namespaces", "[shop]"), "shop/x", {}, True, "shop/allow#0", "source namespace shop matches namespaces[0]"),
    ("namespaces-miss", allow_from("namespaces", "[shop]"), "legacy/x", {}, False, None, "none matched"),
    ("namespaces-plaintext", allow_from("namespaces", "[shop]"), None, {}, False, None, "none matched"),
    ("namespaces-prefix", allow_from("namespaces", '["sho*"]'), "shop/x", {}, True, "shop/allow#0", "namespaces[0]"),
    ("not-namespaces-excluded", allow_from("notNamespaces", "[legacy]"), "legacy/x", {}, False, None, "none matched"),
    ("not-namespaces-other", allow_from("notNamespaces", "[legacy]"), "shop/x", {}, True, "shop/allow#0", "is not in notNamespaces"),
    ("not-namespaces-plaintext", allow_from("notNamespaces", "[legacy]"), None, {}, True, "shop/allow#0", "no source namespace"),
    ("service-accounts", allow_from("serviceAccounts", "[frontend, other/api]"), "other/api", {}, True, "shop/allow#0", "serviceAccounts[1]"),
    ("service-accounts-bare-is-policy-ns", allow_from("serviceAccounts", "[frontend]"), "legacy/frontend", {}, False, None, "none matched"),
    ("not-service-accounts", allow_from("notServiceAccounts", "[frontend]"), "shop/frontend", {}, False, None, "none matched"),
    ("ip-blocks-cidr", allow_from("ipBlocks", '["10.9.0.0/16"]'), None, {}, True, "shop/allow#0", "source IP 10.9.0.1 matches ipBlocks[0]"),
    ("ip-blocks-single", allow_from("ipBlocks", '["10.9.0.1"]'), None, {}, True, "shop/allow#0", "ipBlocks[0]"),
    ("ip-blocks-miss", allow_from("ipBlocks", '["10.8.0.0/16"]'), None, {}, False, None, "none matched"),
    ("ip-blocks-v6-vs-v4", allow_from("ipBlocks", '["fd00::/8"]'), None, {}, False, None, "none matched"),
    ("not-ip-blocks", allow_from("notIpBlocks", '["10.9.0.0/24"]'), "shop/x", {}, False, None, "none matched"),
    ("not-ip-blocks-other", allow_from("notIpBlocks", '["10.9.0.0/24"]'), "shop/x", {"src_ip": "10.1.0.6"}, True, "shop/allow#0", "not in notIpBlocks"),
    ("ports", allow_to("ports", '["8080"]'), "shop/x", {}, True, "shop/allow#0", "destination port 8080 matches ports[0]"),
    ("ports-int-yaml", allow_to("ports", "[9090, 8080]"), "shop/x", {}, True, "shop/allow#0", "ports[1]"),
    ("ports-miss", allow_to("ports", '["9090"]'), "shop/x", {}, False, None, "none matched"),
    ("not-ports", allow_to("notPorts", '["8080"]'), "shop/x", {}, False, None, "none matched"),
    ("not-ports-other", allow_to("notPorts", '["8080"]'), "shop/x", {"port": 9090}, True, "shop/allow#0", "not in notPorts"),
    ("deny-namespace", deny_from("namespaces", "[legacy]"), "legacy/x", {}, False, "shop/deny#0", "denied by DENY policy shop/deny rule 0: source namespace legacy matches namespaces[0]"),
    ("deny-no-match", deny_from("namespaces", "[legacy]"), "shop/x", {}, True, None, "no DENY policy matched"),
    ("deny-not-principals-star-plaintext", deny_from("notPrincipals", '["*"]'), None, {}, False, "shop/deny#0", "notPrincipals"),
    ("deny-not-principals-star-mtls", deny_from("notPrincipals", '["*"]'), "shop/x", {}, True, None, "no DENY policy matched"),
    ("deny-precedence", ALLOW_FRONTEND + deny_from("principals", "[cluster.local/ns/shop/sa/frontend]"), "shop/frontend", {}, False, "shop/deny#0", "DENY"),
    ("allow-nothing", ap("allow-nothing", "  {}"), "shop/x", {}, False, None, "1 ALLOW policy applies (shop/allow-nothing)"),
    ("allow-empty-rule", ap("allow-all", "  rules:\n  - {}"), None, {}, True, "shop/allow-all#0", "matches every connection"),
    ("deny-empty-rule", ap("deny-all", "  action: DENY\n  rules:\n  - {}"), "shop/x", {}, False, "shop/deny-all#0", "matches every connection"),
    ("selector-not-selecting", ap("db-only", "  selector: {matchLabels: {app: db}}"), "shop/x", {}, True, None, "no ALLOW or DENY"),
    ("selector-selecting", ap("web-only", "  selector: {matchLabels: {app: web, tier: front}}"), "shop/x", {}, False, None, "shop/web-only"),
    ("selector-partial-labels", ap("web-only", "  selector: {matchLabels: {app: web, tier: back}}"), "shop/x", {}, True, None, "no ALLOW or DENY"),
    ("namespace-scope-other-ns", ap("other-ns", "  {}", ns="other"), "shop/x", {}, True, None, "no ALLOW or DENY"),
    ("mesh-scope", ap("mesh-deny", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}", ns="istio-system"), "legacy/x", {}, False, "istio-system/mesh-deny#0", "namespaces[0]"),
    ("root-ns-configurable", ap("mesh-allow-nothing", "  {}", ns="mesh-root"), "shop/x", {"root": "mesh-root"}, False, None, "mesh-root/mesh-allow-nothing"),
    ("root-ns-default-ignores-other", ap("mesh-allow-nothing", "  {}", ns="mesh-root"), "shop/x", {}, True, None, "no ALLOW or DENY"),
    ("root-ns-selector-crosses-namespaces", ap("mesh-api", "  selector: {matchLabels: {app: api}}", ns="istio-system"), "shop/x", {"dst": "other/api"}, False, None, "istio-system/mesh-api"),
    ("two-allow-second-matches", ALLOW_FRONTEND + allow_from("namespaces", "[other]"), "other/api", {}, True, "shop/allow#0", "namespaces[0]"),
    ("two-allow-none-match", ALLOW_FRONTEND + allow_from("namespaces", "[other]"), "legacy/api", {}, False, None, "2 ALLOW policies apply (shop/allow, shop/allow-frontend)"),
    ("from-entries-or", ap("allow", "  rules:\n  - from:\n    - source: {namespaces: [a]}\n    - source: {namespaces: [legacy]}"), "legacy/x", {}, True, "shop/allow#0", "namespaces[0]"),
    ("source-fields-and", ap("allow", "  rules:\n  - from:\n    - source: {namespaces: [legacy], ipBlocks: [10.8.0.0/16]}"), "legacy/x", {}, False, None, "none matched"),
    ("from-and-to", ap("allow", "  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n    to:\n    - operation: {ports: ['9090']}"), "legacy/x", {}, False, None, "none matched"),
    ("rules-or", ap("allow", "  rules:\n  - to:\n    - operation: {ports: ['9090']}\n  - to:\n    - operation: {ports: ['8080']}"), "legacy/x", {}, True, "shop/allow#1", "ports[0]"),
    ("when-source-ip", allow_when("source.ip", "values", '["10.9.0.0/24"]'), None, {}, True, "shop/allow#0", "source IP 10.9.0.1 matches values[0]"),
    ("when-destination-port-not", allow_when("destination.port", "notValues", '["8080"]'), "shop/x", {}, False, None, "none matched"),
    ("when-source-namespace", allow_when("source.namespace", "values", "[legacy]"), "legacy/x", {}, True, "shop/allow#0", "values[0]"),
    ("when-source-principal", allow_when("source.principal", "values", '["*/sa/x"]'), "legacy/x", {}, True, "shop/allow#0", "values[0]"),
    ("when-destination-ip", allow_when("destination.ip", "values", '["10.1.0.0/24"]'), "legacy/x", {}, True, "shop/allow#0", "destination IP 10.1.0.5"),
    ("l7-allow-without-waypoint-denies", allow_to("methods", "[GET]"), "shop/x", {}, False, None, "none matched (1 ALLOW rule needs HTTP attributes; give the destination a waypoint"),
    ("l7-allow-mixed-rules", ap("allow", "  rules:\n  - to:\n    - operation: {methods: [GET]}\n  - from:\n    - source: {namespaces: [shop]}"), "shop/x", {}, True, "shop/allow#1", "namespaces[0]"),
    ("l7-allow-request-principals", allow_from("requestPrincipals", '["*"]'), "shop/x", {}, False, None, "none matched"),
    ("l7-allow-header-when", allow_when("request.headers[x-user]", "values", "[alice]"), "shop/x", {}, False, None, "none matched"),
    ("l7-deny-broadens-methods", ap("deny", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n    to:\n    - operation: {methods: [POST]}"), "legacy/x", {}, False, "shop/deny#0", "only HTTP fields, ignored at L4"),
    ("l7-deny-keeps-l4-part", ap("deny", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n    to:\n    - operation: {methods: [POST]}"), "shop/x", {}, True, None, "no DENY policy matched"),
    ("l7-deny-paths-only-denies-all", ap("deny", "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin*]}"), "shop/x", {}, False, "shop/deny#0", "ignored at L4"),
    ("l7-deny-remote-ip-ignored", deny_from("remoteIpBlocks", '["1.2.3.4"]'), "shop/x", {}, False, "shop/deny#0", "ignored at L4"),
    ("l7-deny-header-when-ignored", ap("deny", "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}\n    when:\n    - key: request.headers[x-debug]\n      values: ['1']"), "legacy/x", {}, False, "shop/deny#0", "namespaces[0]"),
    ("v1beta1", ap("allow", "  rules:\n  - from:\n    - source: {namespaces: [legacy]}", api="security.istio.io/v1beta1"), "legacy/x", {}, True, "shop/allow#0", "namespaces[0]"),
    ("v1beta1-deny", ap("deny", "  action: DENY\n  rules:\n  - {}", api="security.istio.io/v1beta1"), "legacy/x", {}, False, "shop/deny#0", "DENY"),
    ("audit-is-noop", ap("audit", "  action: AUDIT\n  rules:\n  - {}"), "shop/x", {}, True, None, "no ALLOW or DENY"),
    ("target-refs-service", ap("svc", "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: web"), "shop/x", {}, False, None, "shop/svc"),
    ("target-refs-other-service", ap("svc", "  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: db"), "shop/x", {}, True, None, "no ALLOW or DENY"),
    ("waypoint-bypass-denied", "", "shop/x", {"dst": "shop/ui"}, False, None, "uses waypoint shop-wp"),
    ("waypoint-via-allowed", ap("allow-nothing", "  {}"), "shop/shop-wp", {"dst": "shop/ui", "via_waypoint": True}, True, None, "through waypoint shop-wp"),
]


@pytest.mark.parametrize(
    ("policies", "src", "kwargs", "allowed", "by", "reason"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_authorize(
    policies: str, src: str | None, kwargs: dict[str, object], allowed: bool, by: str | None, reason: str
) -> None:
    d = decide(policies, src, **kwargs)  # type: ignore[arg-type]
    assert d.allowed is allowed, d
    if by is None:
        assert d.rule is None, d
    else:
        ref, rule = by.split("#")
        assert (d.policy, d.rule) == (ref, int(rule)), d
        assert d.action == ("ALLOW" if allowed else "DENY")
    assert reason in d.reason, d


def test_case_ids_unique_and_enough() -> None:
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 50


def test_l7_skip_is_explained_in_notes() -> None:
    d = decide(allow_to("methods", "[GET]"), "shop/x")
    assert any("needs HTTP fields" in n and "operation.methods" in n for n in d.notes), d
    d = decide(ap("deny", "  action: DENY\n  rules:\n  - to:\n    - operation: {paths: [/admin]}"), "shop/x")
    assert any("denies more than written" in n for n in d.notes), d


def test_strict_mtls_refuses_plaintext_in_authorize() -> None:
    pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n"
    d = decide(pa, None)
    assert not d.allowed and d.policy == "shop/strict" and "STRICT" in d.reason
    assert decide(pa, "shop/x").allowed


def test_decisions_are_deterministic_over_input_order() -> None:
    a = ALLOW_FRONTEND + allow_from("namespaces", "[other]")
    b = allow_from("namespaces", "[other]") + ALLOW_FRONTEND
    assert decide(a, "legacy/x") == decide(b, "legacy/x")


# --------------------------------------------------------------------------- mTLS


def pa(name: str, spec: str, ns: str = "shop", api: str = "security.istio.io/v1") -> str:
    return f"apiVersion: {api}\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n---\n"


MESH_STRICT = pa("default", "  mtls: {mode: STRICT}", ns="istio-system")
NS_PERMISSIVE = pa("default", "  mtls: {mode: PERMISSIVE}")
NS_STRICT = pa("default", "  mtls: {mode: STRICT}")
WEB = "  selector: {matchLabels: {app: web}}\n"

MTLS_CASES: list[tuple[str, str, str, int, str, str, str | None]] = [
    ("default-permissive", "", "shop/web", 8080, "istio-system", "PERMISSIVE", None),
    ("mesh-strict", MESH_STRICT, "shop/web", 8080, "istio-system", "STRICT", "istio-system/default"),
    ("namespace-overrides-mesh", MESH_STRICT + NS_PERMISSIVE, "shop/web", 8080, "istio-system", "PERMISSIVE", "shop/default"),
    ("namespace-unset-inherits-mesh", MESH_STRICT + pa("default", "  mtls: {mode: UNSET}"), "shop/web", 8080, "istio-system", "STRICT", "istio-system/default"),
    ("workload-overrides-namespace", NS_PERMISSIVE + pa("web", WEB + "  mtls: {mode: STRICT}"), "shop/web", 8080, "istio-system", "STRICT", "shop/web"),
    ("workload-not-selected", NS_PERMISSIVE + pa("web", WEB + "  mtls: {mode: STRICT}"), "shop/db", 8080, "istio-system", "PERMISSIVE", "shop/default"),
    ("workload-unset-inherits", NS_STRICT + pa("web", WEB + "  mtls: {mode: UNSET}"), "shop/web", 8080, "istio-system", "STRICT", "shop/default"),
    ("port-level-disable", pa("web", WEB + "  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}"), "shop/web", 8080, "istio-system", "DISABLE", "shop/web"),
    ("port-level-other-port", pa("web", WEB + "  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}"), "shop/web", 9090, "istio-system", "STRICT", "shop/web"),
    ("port-level-strict-under-unset", MESH_STRICT.replace("STRICT", "PERMISSIVE") + pa("web", WEB + "  portLevelMtls:\n    '8080': {mode: STRICT}"), "shop/web", 8080, "istio-system", "STRICT", "shop/web"),
    ("port-level-permissive-under-ns-strict", NS_STRICT + pa("web", WEB + "  mtls: {mode: UNSET}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}"), "shop/web", 8080, "istio-system", "PERMISSIVE", "shop/web"),
    ("port-level-unset-inherits", NS_STRICT + pa("web", WEB + "  portLevelMtls:\n    8080: {mode: UNSET}"), "shop/web", 8080, "istio-system", "STRICT", "shop/default"),
    ("root-selector-ignored", pa("mesh-web", WEB + "  mtls: {mode: STRICT}", ns="istio-system"), "shop/web", 8080, "istio-system", "PERMISSIVE", None),
    ("root-ns-configurable", pa("default", "  mtls: {mode: STRICT}", ns="mesh-root"), "shop/web", 8080, "mesh-root", "STRICT", "mesh-root/default"),
    ("root-ns-default-ignores-other", pa("default", "  mtls: {mode: STRICT}", ns="mesh-root"), "shop/web", 8080, "istio-system", "PERMISSIVE", None),
    ("v1beta1", pa("default", "  mtls: {mode: STRICT}", api="security.istio.io/v1beta1"), "shop/web", 8080, "istio-system", "STRICT", "shop/default"),
]


@pytest.mark.parametrize(
    ("policies", "dst", "port", "root", "mode", "by"),
    [pytest.param(*c[1:], id=c[0]) for c in MTLS_CASES],
)
def test_mtls_mode(policies: str, dst: str, port: int, root: str, mode: str, by: str | None) -> None:
    snap = snapshot(policies, root)
    wl = snap.workload(dst)
    assert wl is not None
    assert mtls_mode(wl, port, snap.policies) == mode
    assert mtls_policy(wl, port, snap.policies) == (mode, by)
