"""The gateway's Kubernetes source (against the API server double): HTTPRoutes and RateLimitPolicies
listed and watched, and the kubernetes.io/tls Secrets of the gateway's namespace only; an agent's
source (no gateway namespace) never asks for Secrets."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client

from ambit.sources.kube import KubernetesSource
from tests.integration import kubeapi_double
from tests.integration.kubeapi_double import KubeApiDouble, recorded

ROUTES = "/apis/gateway.networking.k8s.io/v1/httproutes"
LIMITS = "/apis/ambit.dev/v1alpha1/ratelimitpolicies"
SECRETS = "/api/v1/namespaces/edge/secrets"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeApiDouble]:
    monkeypatch.setitem(kubeapi_double.COLLECTIONS, ROUTES, ("HTTPRoute", "gateway.networking.k8s.io/v1"))
    monkeypatch.setitem(kubeapi_double.COLLECTIONS, LIMITS, ("RateLimitPolicy", "ambit.dev/v1alpha1"))
    monkeypatch.setitem(kubeapi_double.COLLECTIONS, SECRETS, ("Secret", "v1"))
    objs = recorded()
    objs[ROUTES] = [{"metadata": {"name": "orders", "namespace": "shop"},
                     "spec": {"parentRefs": [{"name": "ingress", "namespace": "edge"}],
                              "rules": [{"backendRefs": [{"name": "orders", "port": 80}]}]}}]
    objs[LIMITS] = [{"metadata": {"name": "per-user", "namespace": "shop"},
                     "spec": {"targetRefs": [{"kind": "HTTPRoute", "name": "orders"}],
                              "limits": [{"requests": 5, "period": "60s"}]}}]
    b64 = base64.b64encode(PEM.encode()).decode()
    objs[SECRETS] = [{"metadata": {"name": "shop-tls", "namespace": "edge"}, "type": "kubernetes.io/tls",
                      "data": {"tls.crt": b64, "tls.key": base64.b64encode(b"-----BEGIN KEY-----\n").decode()}}]
    d = KubeApiDouble(objs)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def source(url: str, **kw: object) -> KubernetesSource:
    cfg = client.Configuration()
    cfg.host = url
    return KubernetesSource(client.ApiClient(cfg), sync_timeout=5.0, backoff_base=0.02, backoff_max=0.1,
                            debounce=0.005, **kw)  # type: ignore[arg-type]


def test_the_gateways_source_reads_routes_limits_and_its_namespaces_tls_secrets(double: KubeApiDouble) -> None:
    src = source(double.url, gateway_namespace="edge")
    try:
        state = src.current()
        assert [r.key for r in state.routes] == ["HTTPRoute/shop/orders", "RateLimitPolicy/shop/per-user"]
        assert list(state.secrets) == [("edge", "shop-tls")]
        assert ("Secret", "edge", "shop-tls") not in state.objects
        # only the gateway's namespace, only TLS Secrets
        asked = [p for m, p in double.requests if "/secrets" in p]
        assert asked and all(p.startswith(SECRETS) and "fieldSelector=type%3Dkubernetes.io/tls" in p
                             for p in asked), asked
        double.apply(ROUTES, {"metadata": {"name": "more", "namespace": "shop"},
                              "spec": {"parentRefs": [{"name": "ingress", "namespace": "edge"}]}})
        wait_for(lambda: any(r.meta.name == "more" for r in src.current().routes))
    finally:
        src.close()


def test_an_agents_source_never_lists_secrets(double: KubeApiDouble) -> None:
    src = source(double.url)
    try:
        assert src.current().secrets == {} and src.current().routes == ()
        assert not any("/secrets" in p or "httproutes" in p for _, p in double.requests)
    finally:
        src.close()
