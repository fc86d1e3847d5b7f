"""The compiled snapshot on the wire: what the agent compiles is what the ztunnel decodes, exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from ambit.cluster import build_state, load_documents
from ambit.policy import ConnectionFacts, HttpFacts, authenticate, authorize, authorize_http
from ambit.snapshot import Snapshot, build_snapshot
from ambit.spiffe import SpiffeId
from ambit.wire.snapshot import (
    WireError,
    decode_snapshot,
    decode_value,
    encode_snapshot,
    encode_value,
)

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.0.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.1.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}, annotations: {x: y}}
spec: {nodeName: node-b, serviceAccountName: db}
status: {podIP: 10.2.0.5, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: every-shape, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/*"], notNamespaces: [legacy], ipBlocks: [10.0.0.0/8, "fd00::/8"]}
    - source: {serviceAccounts: [shop/api, front], notIpBlocks: [10.9.9.9]}
    to:
    - operation: {ports: ["8080"], notPorts: ["9"], methods: [GET, POST], paths: [/api/*, "*.css", "/v1/{*}/items/{**}"], hosts: ["*.shop.example", "web:80"]}
    when:
    - {key: "request.headers[x-tenant]", values: [gold], notValues: [lead]}
    - {key: source.ip, values: [10.1.0.0/16]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-by-ref, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: PERMISSIVE}, "9090": {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt-file, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules:
  - issuer: https://idp.example
    audiences: [shop, pay]
    jwksUri: file:///etc/ambit/jwks/idp.json
    fromHeaders: [{name: X-Token, prefix: "Bearer "}]
    fromParams: [t]
    fromCookies: [session]
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    spaceDelimitedClaims: [roles]
"""


def compiled() -> Snapshot:
    return build_snapshot(build_state(load_documents(CLUSTER)), "node-a")


def over_the_wire(snap: Snapshot) -> Snapshot:
    # through JSON text, as the feed and the last-good file carry it
    objects = {k: json.loads(json.dumps(v)) for k, v in encode_snapshot(snap).items()}
    return decode_snapshot(objects)


def test_the_decoded_snapshot_is_the_compiled_one() -> None:
    snap = compiled()
    assert not snap.errors
    assert len(snap.policies.request_authn) == 1
    got = over_the_wire(snap)
    assert got.policies == snap.policies
    assert dict(got.workloads) == dict(snap.workloads)
    assert dict(got.services) == dict(snap.services)
    assert dict(got.nodes) == dict(snap.nodes)
    assert (got.node, got.trust_domain, got.version, got.errors) == (snap.node, snap.trust_domain,
                                                                      snap.version, snap.errors)


@pytest.mark.parametrize(
    ("sa", "src_ip", "method", "path", "host", "headers"),
    [
        ("api", "10.1.0.7", "GET", "/api/x", "web:80", {"x-tenant": "gold"}),
        ("api", "10.1.0.7", "GET", "/v1/a/items/b/c", "a.shop.example", {"x-tenant": "gold"}),
        ("api", "10.1.0.7", "DELETE", "/api/x", "web:80", {"x-tenant": "gold"}),
        ("api", "10.9.9.9", "GET", "/site.css", "web", {"x-tenant": "gold"}),
        ("front", "10.1.0.7", "POST", "/api/x", "web:80", {"x-tenant": "lead"}),
    ],
)
def test_decisions_are_the_same_on_both_ends(sa: str, src_ip: str, method: str, path: str, host: str,
                                             headers: dict[str, str]) -> None:
    snap = compiled()
    got = over_the_wire(snap)
    for s in (snap, got):
        assert s.workload("shop/web-0") is not None
    src = SpiffeId("cluster.local", "shop", sa)
    results = []
    for s in (snap, got):
        dst = s.workload("shop/web-0")
        assert dst is not None
        facts = ConnectionFacts(src_ip, src, dst, 8080, True)
        results.append((authorize(facts, s.policies), authorize_http(facts, HttpFacts(method, path, host, headers),
                                                                      s.policies)))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"$": "Popen", "args": "rm -rf /"}, "unknown snapshot type"),
        ({"value": 1}, "untagged"),
        ({"$": "PortMatch", "raw": "80"}, "does not decode"),
        ({"$": "SpiffeId", "trust_domain": "cluster.local", "namespace": "", "service_account": "x"},
         "does not decode"),
    ],
)
def test_decoding_refuses_what_it_did_not_encode(raw: Any, why: str) -> None:
    with pytest.raises(WireError, match=why):
        decode_value(raw)


def test_encoding_refuses_foreign_types() -> None:
    with pytest.raises(WireError, match="cannot encode"):
        encode_value(object())


def test_a_snapshot_without_its_meta_is_refused() -> None:
    objects = encode_snapshot(compiled())
    objects.pop(("SnapshotMeta", "", "meta"))
    with pytest.raises(WireError, match="SnapshotMeta"):
        decode_snapshot(objects)


WAYPOINTS = """
apiVersion: v1
kind: Namespace
metadata: {name: pay, labels: {ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: pay, labels: {ambit.dev/waypoint-for: all}}
spec:
  gatewayClassName: ambit-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata: {name: wp-0, namespace: pay, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {nodeName: node-a, serviceAccountName: wp}
status: {podIP: 10.1.0.9, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: charges, namespace: pay, labels: {app: charges}}
spec: {nodeName: node-a, serviceAccountName: charges}
status: {podIP: 10.1.0.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: pay, labels: {app: legacy, ambit.dev/use-waypoint: none}}
spec: {nodeName: node-a, serviceAccountName: legacy}
status: {podIP: 10.1.0.11, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: charges, namespace: pay, labels: {ambit.dev/use-waypoint: other}}
spec: {clusterIP: 10.96.0.20, selector: {app: charges}, ports: [{port: 80, targetPort: 8080}]}
"""


def test_waypoints_in_the_snapshot_and_on_the_wire() -> None:
    snap = build_snapshot(build_state(load_documents(WAYPOINTS)), "node-a")
    wp = snap.waypoint("pay", "wp")
    assert wp is not None and wp.ready and wp.addresses == ("10.1.0.9",) and wp.takes("workload")
    assert wp.identity == SpiffeId("cluster.local", "pay", "wp")
    charges = snap.workload("pay/charges")
    assert charges is not None and charges.waypoint == "wp"
    legacy, own = snap.workload("pay/legacy"), snap.workload("pay/wp-0")
    assert legacy is not None and legacy.waypoint is None  # `none` opts out
    assert own is not None and own.waypoint is None  # a waypoint is never routed through itself
    # the Service's own label wins over its namespace's; a waypoint that does not exist is listed, not ready
    svc = snap.service_by_vip("10.96.0.20")
    assert svc is not None and svc.waypoint == "other"
    missing = snap.waypoint("pay", "other")
    assert missing is not None and not missing.exists and not missing.ready
    got = over_the_wire(snap)
    assert dict(got.waypoints) == dict(snap.waypoints)
    assert got.service_by_vip("10.96.0.20") == svc


def test_request_authentication_round_trips_and_authenticates_alike() -> None:
    key = ECKey.generate_key("P-256", parameters={"kid": "k"})
    jwks = json.dumps({"keys": [key.as_dict(private=False)]})
    docs = CLUSTER + (
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt-inline, namespace: istio-system}\n"
        f"spec:\n  jwtRules:\n  - {{issuer: https://mesh.example, jwks: '{jwks}', outputPayloadToHeader: x-p}}\n"
    )
    snap = build_snapshot(build_state(load_documents(docs)), "node-a")
    assert not snap.errors, snap.errors
    got = over_the_wire(snap)
    assert got.policies.request_authn == snap.policies.request_authn
    assert decode_value(json.loads(json.dumps(encode_value(snap.policies.request_authn[0])))) == \
        snap.policies.request_authn[0]
    now = 1_800_000_000
    tok = jwt.encode({"alg": "ES256", "kid": "k"}, {"iss": "https://mesh.example", "sub": "a", "exp": now + 60}, key)
    results = []
    for s in (snap, got):
        dst = s.workload("shop/web-0")
        assert dst is not None
        rules = s.policies.jwt_rules(dst)
        assert [r.issuer for r in rules] == ["https://idp.example", "https://mesh.example"]
        results.append(authenticate(rules, {"authorization": f"Bearer {tok}"}, "/", now=now))
    assert results[0] == results[1] and results[0].ok and results[0].auth is not None
