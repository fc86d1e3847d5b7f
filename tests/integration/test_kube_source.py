"""The `kubernetes` cluster source and pod annotator against a double of the API server.

No API server can run on these machines, so `kubeapi_double.KubeApiDouble`
stands in for it on 127.0.0.1: it serves recorded lists, streams watch events
as chunked JSON, breaks watches mid-chunk, answers 410 Gone for compacted
resourceVersions and applies merge patches. The official `kubernetes` client
talks to it over real HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from agent.kubeannotate import KubePodAnnotator
from ambit.cluster import REDIRECTION, ClusterError, Meta
from ambit.sources import open_source
from ambit.sources.kube import KubeError, KubernetesSource, api_client_from_spec
from tests.integration.kubeapi_double import KubeApiDouble, authz, peer_authn, pod, recorded

PODS = "/api/v1/pods"
NAMESPACES = "/api/v1/namespaces"


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def api_for(url: str) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


def make_source(url: str, **kw: Any) -> KubernetesSource:
    kw.setdefault("sync_timeout", 5.0)
    return KubernetesSource(api_for(url), backoff_base=0.02, backoff_max=0.1, debounce=0.005, **kw)


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    d = KubeApiDouble()
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def source(double: KubeApiDouble) -> Iterator[KubernetesSource]:
    src = make_source(double.url)
    try:
        yield src
    finally:
        src.close()


def test_initial_list(source: KubernetesSource, double: KubeApiDouble) -> None:
    st = source.current()
    assert source.synced and source.last_error is None
    assert set(st.namespaces) == {"kube-system", "shop", "legacy"}
    assert st.nodes["node-a"].addresses == ("172.18.0.2",)  # the Hostname entry is skipped
    web = st.pods[("shop", "web-0")]
    assert web.node_name == "node-a" and web.service_account == "web" and web.ip == "10.244.1.5"
    assert web.meta.uid.startswith("0f1e2d3c-") and web.qos_class == "Burstable"
    assert web.container_ids == ("containerd://" + "ab" * 32,)
    assert st.is_enrolled(web) and not st.is_enrolled(st.pods[("legacy", "old-0")])
    # pods of every node, not only one
    assert {p.node_name for p in st.pods.values()} == {"node-a", "node-b"}
    # the named targetPort "http" is resolved through the EndpointSlice
    svc = st.services[("shop", "web")]
    assert svc.cluster_ip == "10.96.0.10" and svc.ports[0].target_port == 8080
    assert [p.name for p in st.service_endpoints(svc)] == ["web-0"]
    assert sorted(p.key for p in st.policies) == [
        "AuthorizationPolicy/shop/allow-web",
        "PeerAuthentication/shop/strict",
    ]
    assert all(p.api_version == "security.istio.io/v1" for p in st.policies)
    # objects as written, with kind filled in and managedFields dropped
    raw = st.objects[("Pod", "shop", "web-0")]
    assert raw["kind"] == "Pod" and "managedFields" not in raw["metadata"]
    stats = source.stats()
    assert stats["pods"]["lists"] == 1
    assert stats["authorizationpolicies"]["api_version"] == "security.istio.io/v1"
    # list calls are paginated requests without watch=true
    assert double.count("GET", "/api/v1/pods?", watch=False) >= 1


def test_watch_events_add_modify_delete(source: KubernetesSource, double: KubeApiDouble) -> None:
    double.apply(PODS, pod("shop", "web-1", "node-b", "10.244.2.8", sa="web", labels={"app": "web"}))
    wait_for(lambda: ("shop", "web-1") in source.current().pods)
    assert len(source.current().service_endpoints(source.current().services[("shop", "web")])) == 2
    double.apply(PODS, pod("shop", "web-1", "node-b", "10.244.2.9", sa="web", labels={"app": "web"}))
    wait_for(lambda: source.current().pods[("shop", "web-1")].ip == "10.244.2.9")
    double.delete(PODS, "shop", "web-1")
    wait_for(lambda: ("shop", "web-1") not in source.current().pods)
    assert source.stats()["pods"]["lists"] == 1  # all of it came over the one watch
    assert source.stats()["pods"]["resource_version"] == str(double.rv)


def test_label_changes_enroll_and_unenroll(source: KubernetesSource, double: KubeApiDouble) -> None:
    st = source.current()
    assert not st.is_enrolled(st.pods[("legacy", "old-0")])
    # pod label enrolls a pod of a namespace that is not enrolled
    old = double.get(PODS, "legacy", "old-0")
    old["metadata"]["labels"]["ambit.dev/dataplane-mode"] = "ambient"
    double.apply(PODS, old)
    wait_for(lambda: source.current().is_enrolled(source.current().pods[("legacy", "old-0")]))
    # pod label `none` opts a pod of an enrolled namespace out
    web = double.get(PODS, "shop", "web-0")
    web["metadata"]["labels"]["ambit.dev/dataplane-mode"] = "none"
    double.apply(PODS, web)
    wait_for(lambda: not source.current().is_enrolled(source.current().pods[("shop", "web-0")]))
    # removing the namespace label unenrolls the rest of the namespace
    db = source.current().pods[("shop", "db-0")]
    assert source.current().is_enrolled(db)
    ns = double.get(NAMESPACES, "", "shop")
    del ns["metadata"]["labels"]["ambit.dev/dataplane-mode"]
    double.apply(NAMESPACES, ns)
    wait_for(lambda: not source.current().is_enrolled(source.current().pods[("shop", "db-0")]))


def test_broken_watch_reconnects_from_resource_version(source: KubernetesSource, double: KubeApiDouble) -> None:
    wait_for(lambda: double.count("GET", PODS, watch=True) >= 1)
    double.break_watches(PODS)
    double.apply(PODS, pod("shop", "late", "node-a", "10.244.1.20"))
    wait_for(lambda: ("shop", "late") in source.current().pods)
    stats = source.stats()["pods"]
    assert stats["lists"] == 1, "a broken watch resumes from its resourceVersion, it does not relist"
    assert stats["watches"] >= 2
    # the resumed watch asked for the version it had seen, not for "now"
    watch_reqs = [p for m, p in double.requests if m == "GET" and p.startswith(PODS) and "watch=true" in p]
    assert all("resourceVersion=" in p for p in watch_reqs)


@pytest.mark.parametrize("as_event", [True, False], ids=["error-event-410", "http-410"])
def test_gone_forces_relist(as_event: bool) -> None:
    d = KubeApiDouble(gone_as_event=as_event)
    d.start()
    src = make_source(d.url)
    try:
        wait_for(lambda: d.count("GET", PODS, watch=True) >= 1)
        # Changes happen while the history is compacted away: only a relist can see them.
        d.compact(PODS)
        d.collections[PODS].items.pop(("legacy", "old-0"))  # gone without a DELETED event
        d.apply(PODS, pod("shop", "after-410", "node-a", "10.244.1.30"))
        d.compact(PODS)
        wait_for(lambda: ("shop", "after-410") in src.current().pods)
        wait_for(lambda: ("legacy", "old-0") not in src.current().pods)
        assert src.stats()["pods"]["lists"] >= 2
    finally:
        src.close()
        d.stop()


def test_policies_fall_back_to_v1beta1() -> None:
    objs = recorded()
    objs.pop("/apis/security.istio.io/v1/authorizationpolicies")
    objs.pop("/apis/security.istio.io/v1/peerauthentications")
    objs["/apis/security.istio.io/v1beta1/authorizationpolicies"] = [
        authz("shop", "deny-all", {"action": "DENY", "rules": [{}]}, version="v1beta1")]
    objs["/apis/security.istio.io/v1beta1/peerauthentications"] = [
        peer_authn("istio-system", "default", "PERMISSIVE", version="v1beta1")]
    d = KubeApiDouble(objs)
    d.served -= {"/apis/security.istio.io/v1/authorizationpolicies",
                 "/apis/security.istio.io/v1/peerauthentications"}
    d.start()
    src = make_source(d.url)
    try:
        st = src.current()
        assert {(p.key, p.api_version) for p in st.policies} == {
            ("AuthorizationPolicy/shop/deny-all", "security.istio.io/v1beta1"),
            ("PeerAuthentication/istio-system/default", "security.istio.io/v1beta1"),
        }
        # and the watch on v1beta1 delivers changes
        d.apply("/apis/security.istio.io/v1beta1/authorizationpolicies",
                authz("shop", "allow-2", {"action": "ALLOW"}, version="v1beta1"))
        wait_for(lambda: any(p.meta.name == "allow-2" for p in src.current().policies))
    finally:
        src.close()
        d.stop()


def test_v1_preferred_when_both_served() -> None:
    objs = recorded()
    objs["/apis/security.istio.io/v1beta1/authorizationpolicies"] = [
        authz("shop", "only-in-beta", {"action": "DENY"}, version="v1beta1")]
    d = KubeApiDouble(objs)
    d.start()
    src = make_source(d.url)
    try:
        names = {p.meta.name for p in src.current().policies}
        assert "allow-web" in names and "only-in-beta" not in names
        assert src.stats()["authorizationpolicies"]["api_version"] == "security.istio.io/v1"
    finally:
        src.close()
        d.stop()


def test_no_istio_crds_is_reported_not_fatal() -> None:
    d = KubeApiDouble()
    d.served = {p for p in d.served if "security.istio.io" not in p}
    d.start()
    src = make_source(d.url)
    try:
        assert src.synced and src.current().policies == ()
        assert src.last_error and "security.istio.io CRDs" in src.last_error
        assert ("shop", "web-0") in src.current().pods
    finally:
        src.close()
        d.stop()


def test_invalid_object_keeps_last_good_version(source: KubernetesSource, double: KubeApiDouble) -> None:
    bad = double.get(PODS, "shop", "web-0")
    bad["status"]["podIP"] = "not-an-ip"
    bad["metadata"]["labels"]["marker"] = "bad"
    double.apply(PODS, bad)
    wait_for(lambda: source.last_error is not None)
    assert "shop/web-0" in (source.last_error or "") and "status.podIP" in (source.last_error or "")
    web = source.current().pods[("shop", "web-0")]
    assert web.ip == "10.244.1.5" and "marker" not in web.meta.labels
    good = copy.deepcopy(bad)
    good["status"]["podIP"] = "10.244.1.6"
    double.apply(PODS, good)
    wait_for(lambda: source.current().pods[("shop", "web-0")].ip == "10.244.1.6")
    wait_for(lambda: source.last_error is None)


def test_unresolvable_named_port_is_left_out_and_reported(double: KubeApiDouble) -> None:
    svc = double.get("/api/v1/services", "shop", "web")
    svc["spec"]["ports"].append({"name": "grpc", "port": 9090, "targetPort": "grpc"})
    double.apply("/api/v1/services", svc)
    src = make_source(double.url)
    try:
        ports = src.current().services[("shop", "web")].ports
        assert [(p.port, p.target_port) for p in ports] == [(80, 8080)]
        assert "spec.ports[1].targetPort 'grpc'" in (src.last_error or "")
    finally:
        src.close()


def test_every_unresolvable_named_port_is_reported(double: KubeApiDouble) -> None:
    svc = double.get("/api/v1/services", "shop", "web")
    svc["spec"]["ports"].append({"name": "grpc", "port": 9090, "targetPort": "grpc"})
    svc["spec"]["ports"].append({"name": "admin", "port": 9091, "targetPort": "admin"})
    double.apply("/api/v1/services", svc)
    src = make_source(double.url)
    try:
        err = src.last_error or ""
        assert "spec.ports[1].targetPort 'grpc'" in err and "spec.ports[2].targetPort 'admin'" in err
    finally:
        src.close()


async def test_changes_yields_new_states(source: KubernetesSource, double: KubeApiDouble) -> None:
    it = source.changes(interval=0.01)
    first = await asyncio.wait_for(it.__anext__(), 2)
    assert ("shop", "web-0") in first.pods
    await asyncio.to_thread(double.apply, PODS, pod("shop", "new", "node-a", "10.244.1.40"))
    nxt = await asyncio.wait_for(it.__anext__(), 5)
    while ("shop", "new") not in nxt.pods:
        nxt = await asyncio.wait_for(it.__anext__(), 5)
    await it.aclose()  # type: ignore[attr-defined]


def test_annotation_patch_reaches_the_api(source: KubernetesSource, double: KubeApiDouble) -> None:
    annotator = KubePodAnnotator(api_for(double.url))
    web = source.current().pods[("shop", "web-0")]
    annotator.set_annotation(web, REDIRECTION, "enabled")
    path, ctype, body = double.patches[-1]
    assert path == "/api/v1/namespaces/shop/pods/web-0"
    assert ctype == "application/merge-patch+json"
    assert body == {"metadata": {"annotations": {REDIRECTION: "enabled"}}}
    wait_for(lambda: source.current().pods[("shop", "web-0")].meta.annotations.get(REDIRECTION) == "enabled")
    # other annotations are untouched; None removes ours
    assert "kubectl.kubernetes.io/restartedAt" in source.current().pods[("shop", "web-0")].meta.annotations
    annotator.set_annotation(web, REDIRECTION, None)
    wait_for(lambda: REDIRECTION not in source.current().pods[("shop", "web-0")].meta.annotations)
    gone = dataclasses.replace(web, meta=Meta(name="nope", namespace="shop"))
    with pytest.raises(KubeError, match=r"shop/nope.*404"):
        annotator.set_annotation(gone, REDIRECTION, "enabled")


def write_kubeconfig(path: Path, url: str, token: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "double",
        "clusters": [{"name": "double", "cluster": {"server": url}}],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "agent"}}],
    }))


def test_kubeconfig_pointing_at_the_double(tmp_path: Path) -> None:
    d = KubeApiDouble(token="s3cret")
    d.start()
    try:
        cfg = tmp_path / "kubeconfig"
        write_kubeconfig(cfg, d.url, "s3cret")
        src = open_source(f"kubernetes:{cfg}")
        try:
            assert isinstance(src, KubernetesSource) and src.description == f"kubernetes:{cfg}"
            assert ("shop", "web-0") in src.current().pods
        finally:
            src.close()
        # a wrong token fails the first sync with a message naming the cause
        write_kubeconfig(cfg, d.url, "wrong")
        with pytest.raises(KubeError, match=r"401.*credentials were rejected"):
            KubernetesSource(api_client_from_spec(f"kubernetes:{cfg}"), sync_timeout=1.0,
                             backoff_base=0.05, backoff_max=0.1)
    finally:
        d.stop()


def test_bad_specs() -> None:
    with pytest.raises(ClusterError, match="does not exist"):
        api_client_from_spec("kubernetes:/nonexistent/kubeconfig")
    with pytest.raises(ClusterError, match="expected kubernetes"):
        api_client_from_spec("kube")


def test_close_stops_open_watches_promptly(double: KubeApiDouble) -> None:
    src = make_source(double.url)
    wait_for(lambda: double.count("GET", PODS, watch=True) >= 1)
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 2.0
    assert not any(r.thread.is_alive() for r in src._reflectors)
