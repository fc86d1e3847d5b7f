"""Snapshots: workloads, services and endpoint resolution, last-good policies, the store and its source."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ambit.cluster import ClusterState, build_state, load_documents
from ambit.policy import ConnectionFacts, authorize
from ambit.snapshot import Snapshot, build_snapshot
from ambit.sources import LocalDirSource
from ambit.spiffe import SpiffeId
from ztunnel.state import LocalStateSource, StateStore

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: shop-wp}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.200.0.10}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.200.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.101.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web, ambit.dev/dataplane-mode: none}}
spec: {nodeName: node-b, serviceAccountName: web}
status: {podIP: 10.102.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: shop-wp, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: shop-wp}}
spec: {nodeName: node-b, serviceAccountName: shop-wp}
status: {podIP: 10.102.0.9, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: 10.101.0.99, phase: Succeeded}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}, {port: 443, targetPort: 8443}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {selector: {app: web}, clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {selector: {app: nothing}, clusterIP: 10.96.0.11, ports: [{port: 80}]}
"""

DENY_LEGACY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [legacy]}
"""


def state(extra: str = "") -> ClusterState:
    return build_state(load_documents(CLUSTER + "\n---\n" + extra))


def test_workloads_by_ip_with_identity_node_and_waypoint() -> None:
    snap = build_snapshot(state(), "node-a", trust_domain="example.org")
    assert not snap.errors
    assert set(snap.workloads) == {"10.101.0.5", "10.102.0.5", "10.102.0.9"}  # no pending/finished pods
    w = snap.workload_by_ip("10.101.0.5")
    assert w is not None and w.uid == "shop/web-1" and w.service_account == "web"
    assert w.identity == SpiffeId("example.org", "shop", "web")
    assert str(w.identity) == "spiffe://example.org/ns/shop/sa/web"
    assert (w.node, w.node_address) == ("node-a", "10.200.0.10")
    assert w.enrolled and w.waypoint == "shop-wp" and w.services == ("shop/headless", "shop/web")
    opted_out = snap.workload("shop/web-2")
    assert opted_out is not None and not opted_out.enrolled
    waypoint_pod = snap.workload("shop/shop-wp")
    assert waypoint_pod is not None and waypoint_pod.waypoint is None  # never routed through itself
    assert [x.uid for x in snap.local_workloads()] == ["shop/web-1"]
    assert dict(snap.nodes) == {"node-a": "10.200.0.10", "node-b": "10.200.0.11"}
    assert snap.version == 1 and snap.trust_domain == "example.org" and snap.node == "node-a"


SHOP_WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shop-wp, namespace: shop}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""

IMPOSTOR = """
apiVersion: v1
kind: Pod
metadata: {name: evil, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: shop-wp}}
spec: {nodeName: node-a, serviceAccountName: aaa-evil}
status: {podIP: 10.101.0.66, phase: Running}
"""


def test_the_waypoint_identity_is_its_gateways_service_account() -> None:
    snap = build_snapshot(state(SHOP_WAYPOINT), "node-a")
    wp = snap.waypoints["shop/shop-wp"]
    assert wp.identity == SpiffeId("cluster.local", "shop", "shop-wp") and wp.addresses == ("10.102.0.9",)
    assert not snap.errors


def test_a_pod_with_the_gateway_label_and_another_account_is_not_the_waypoint() -> None:
    # it would otherwise take the waypoint's identity (sorted first) and skip its own waypoint
    snap = build_snapshot(state(SHOP_WAYPOINT + "---\n" + IMPOSTOR), "node-a")
    wp = snap.waypoints["shop/shop-wp"]
    assert wp.identity == SpiffeId("cluster.local", "shop", "shop-wp") and wp.addresses == ("10.102.0.9",)
    assert any("shop/evil" in e and "aaa-evil" in e for e in snap.errors), snap.errors
    evil = snap.workload("shop/evil")
    assert evil is not None and evil.waypoint == "shop-wp"  # its traffic goes through the waypoint


def test_service_vip_resolves_to_endpoints_and_target_ports() -> None:
    snap = build_snapshot(state(), "node-a")
    svc = snap.service_by_vip("10.96.0.10")
    assert svc is not None and svc.uid == "shop/web" and dict(svc.ports) == {80: 8080, 443: 8443}
    assert svc.endpoints == ("shop/web-1", "shop/web-2")
    assert [(w.ip, p) for w, p in snap.service_endpoints("10.96.0.10", 443)] == [
        ("10.101.0.5", 8443),
        ("10.102.0.5", 8443),
    ]
    picked = snap.resolve("10.96.0.10", 80, pick=3)
    assert picked is not None and (picked[0].ip, picked[1]) == ("10.102.0.5", 8080)
    assert snap.resolve("10.96.0.10", 81) is None  # port not exposed
    assert snap.resolve("10.96.0.11", 80) is None  # no endpoints
    assert snap.service_endpoints("10.96.0.11", 80) == []
    direct = snap.resolve("10.101.0.5", 9000)
    assert direct is not None and direct[1] == 9000  # a pod IP goes straight through
    assert snap.resolve("10.9.9.9", 80) is None
    assert "None" not in snap.services and len(snap.services) == 2  # headless has no VIP


def test_duplicate_pod_ip_is_reported() -> None:
    dup = "apiVersion: v1\nkind: Pod\nmetadata: {name: zz, namespace: shop}\nspec: {nodeName: node-a}\nstatus: {podIP: 10.101.0.5, phase: Running}\n"
    snap = build_snapshot(state(dup), "node-a")
    assert snap.workload_by_ip("10.101.0.5").uid == "shop/web-1"  # type: ignore[union-attr]
    assert any("Pod shop/zz: status.podIP 10.101.0.5 is also used by Pod shop/web-1" in e for e in snap.errors)


def legacy_decision(snap: Snapshot) -> bool:
    w = snap.workload("shop/web-2")
    assert w is not None
    w = type(w)(**{**w.__dict__, "waypoint": None})  # judge the policy itself, not the waypoint rule
    return authorize(ConnectionFacts("10.9.0.1", SpiffeId("cluster.local", "legacy", "x"), w, 8080, True), snap.policies).allowed


def test_invalid_policy_keeps_last_good_version() -> None:
    good = build_snapshot(state(DENY_LEGACY), "node-a")
    assert not good.errors and not legacy_decision(good)
    broken = DENY_LEGACY.replace("namespaces: [legacy]", "namespaces: [legacy], ipBlocks: [10.0.0.0/99]")
    bad = build_snapshot(state(broken), "node-a", previous=good)
    assert bad.version == 2
    assert len(bad.errors) == 1
    assert "AuthorizationPolicy istio-system/deny-legacy: spec.rules[0].from[0].source.ipBlocks[0]" in bad.errors[0]
    assert "keeping the last good version in force" in bad.errors[0]
    assert not legacy_decision(bad)  # the old DENY still applies
    # A fixed version replaces it; a deleted object is gone.
    allowed_now = build_snapshot(state(DENY_LEGACY.replace("legacy]", "other]")), "node-a", previous=bad)
    assert not allowed_now.errors and legacy_decision(allowed_now)
    gone = build_snapshot(state(), "node-a", previous=good)
    assert legacy_decision(gone)


def test_never_valid_policy_is_absent() -> None:
    broken = DENY_LEGACY.replace("action: DENY", "action: DENYY")
    snap = build_snapshot(state(broken), "node-a")
    assert "not applied: no earlier valid version" in snap.errors[0]
    assert snap.policies.authz == () and legacy_decision(snap)


def test_root_namespace_is_configurable() -> None:
    moved = DENY_LEGACY.replace("istio-system", "mesh-root")
    assert legacy_decision(build_snapshot(state(moved), "node-a"))
    assert not legacy_decision(build_snapshot(state(moved), "node-a", root_namespace="mesh-root"))


async def test_store_publishes_to_readers() -> None:
    store = StateStore("node-a")
    assert store.current.version == 0 and store.current.workloads == {}
    seen: list[int] = []

    async def reader() -> None:
        async for snap in store.updates():
            seen.append(snap.version)
            if snap.version == 2:
                return

    task = asyncio.create_task(reader(), name="test-reader")
    await asyncio.sleep(0)
    store.apply(state())
    await asyncio.sleep(0)
    store.apply(state(DENY_LEGACY))
    await asyncio.wait_for(task, 2)
    assert seen == [0, 1, 2]
    assert store.current.policies.authz[0].ref == "istio-system/deny-legacy"


async def test_store_close_ends_readers() -> None:
    store = StateStore("node-a")

    async def drain() -> int:
        n = 0
        async for _ in store.updates():
            n += 1
        return n

    task = asyncio.create_task(drain(), name="test-drain")
    await asyncio.sleep(0)
    store.close()
    assert await asyncio.wait_for(task, 2) == 1


async def test_local_state_source_follows_directory(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text(CLUSTER)
    source = LocalStateSource(LocalDirSource(tmp_path), "node-a", interval=0.02)
    store = StateStore("node-a")
    task = asyncio.create_task(source.run(store), name="test-local-source")
    try:
        updates = store.updates()
        assert (await anext(updates)).version == 0
        first = await asyncio.wait_for(anext(updates), 2)
        assert first.workload("shop/web-1") is not None and not first.policies.authz
        (tmp_path / "policy.yaml").write_text(DENY_LEGACY)
        second = await asyncio.wait_for(anext(updates), 2)
        assert second.policies.authz[0].ref == "istio-system/deny-legacy"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_snapshot_objects_are_hashable_and_cache_applicable_policies() -> None:
    snap = build_snapshot(state(DENY_LEGACY), "node-a")
    w = snap.workload("shop/web-1")
    assert w is not None
    facts = ConnectionFacts("10.9.0.1", None, w, 80, False)
    assert len({w, snap.workload("shop/web-1")}) == 1 and hash(facts) == hash(facts)
    hash(snap)
    hash(snap.service_by_vip("10.96.0.10"))
    first = snap.policies.applicable(w)
    assert snap.policies.applicable(w) == first and [p.ref for p in first] == ["istio-system/deny-legacy"]
