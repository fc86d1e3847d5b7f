"""The CA's TokenReview node authenticator against a double of the API server.

No API server can run on these machines; `kubeapi_double.KubeApiDouble` answers
TokenReviews and pod reads on 127.0.0.1 in the API server's wire format.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from controlplane import ControlPlaneError
from controlplane.tokenreview import (
    EXTRA_NODE_NAME,
    EXTRA_POD_NAME,
    EXTRA_POD_UID,
    TokenReviewAuthenticator,
)
from tests.integration.kubeapi_double import KubeApiDouble, TokenInfo, pod, recorded

AGENT_SA = "system:serviceaccount:ambit-system:ambit"


@pytest.fixture
def double() -> Iterator[KubeApiDouble]:
    objs = recorded()
    objs["/api/v1/pods"].append(pod("ambit-system", "ambit-node-x1", "node-b", "172.18.0.3", sa="ambit"))
    d = KubeApiDouble(objs)
    uid = d.get("/api/v1/pods", "ambit-system", "ambit-node-x1")["metadata"]["uid"]
    d.tokens = {
        "tok-a": TokenInfo(AGENT_SA, {EXTRA_NODE_NAME: ["node-a"], EXTRA_POD_NAME: ["ambit-node-z9"]}, ["ambit-ca"]),
        "tok-b": TokenInfo(AGENT_SA, {EXTRA_POD_NAME: ["ambit-node-x1"], EXTRA_POD_UID: [uid]}, ["ambit-ca"]),
        "tok-stale": TokenInfo(AGENT_SA, {EXTRA_POD_NAME: ["ambit-node-x1"], EXTRA_POD_UID: ["old"]}, ["ambit-ca"]),
        "tok-deleted": TokenInfo(AGENT_SA, {EXTRA_POD_NAME: ["gone"]}, ["ambit-ca"]),
        "tok-unbound": TokenInfo(AGENT_SA, {}, ["ambit-ca"]),
        "tok-web": TokenInfo("system:serviceaccount:shop:web", {EXTRA_NODE_NAME: ["node-a"]}, ["ambit-ca"]),
        "tok-user": TokenInfo("alice", {}, ["ambit-ca"]),
        "tok-other-aud": TokenInfo(AGENT_SA, {EXTRA_NODE_NAME: ["node-a"]}, ["https://kubernetes.default.svc"]),
    }
    d.start()
    try:
        yield d
    finally:
        d.stop()


def authenticator(url: str, **kw: object) -> TokenReviewAuthenticator:
    cfg = client.Configuration()
    cfg.host = url
    return TokenReviewAuthenticator(client.ApiClient(cfg), **kw)  # type: ignore[arg-type]


def test_tokens_map_to_nodes(double: KubeApiDouble) -> None:
    auth = authenticator(double.url)
    assert auth.authenticate("tok-a") == "node-a"  # node-name extra (Kubernetes >= 1.30)
    assert auth.authenticate("Bearer tok-b") == "node-b"  # pod-name + pod-uid, node from the pod
    sent = double.token_reviews[0]["spec"]
    assert sent == {"token": "tok-a", "audiences": ["ambit-ca"]}


@pytest.mark.parametrize(
    "token",
    ["nonsense", "", "tok-stale", "tok-deleted", "tok-unbound", "tok-web", "tok-user", "tok-other-aud"],
)
def test_rejected_tokens_name_no_node(double: KubeApiDouble, token: str) -> None:
    assert authenticator(double.url).authenticate(token) is None


def test_other_service_accounts_can_be_allowed(double: KubeApiDouble) -> None:
    auth = authenticator(double.url, service_accounts=["shop/web"])
    assert auth.authenticate("tok-web") == "node-a"
    assert auth.authenticate("tok-a") is None


def test_positive_answers_are_cached_briefly(double: KubeApiDouble) -> None:
    now = [1000.0]
    auth = authenticator(double.url, cache_ttl=10.0, clock=lambda: now[0])
    assert auth.authenticate("tok-a") == "node-a"
    assert auth.authenticate("tok-a") == "node-a"
    assert len(double.token_reviews) == 1
    now[0] += 11
    assert auth.authenticate("tok-a") == "node-a"
    assert len(double.token_reviews) == 2
    assert auth.authenticate("nonsense") is None and auth.authenticate("nonsense") is None
    assert len(double.token_reviews) == 4  # rejections are not cached


def test_api_failures_raise_not_reject() -> None:
    d = KubeApiDouble(token="only-this")  # our client sends no credentials: 401 on the review itself
    d.start()
    try:
        with pytest.raises(ControlPlaneError, match="TokenReview failed: HTTP 401"):
            authenticator(d.url).authenticate("tok-a")
    finally:
        d.stop()
    with pytest.raises(ControlPlaneError, match="reachable"):
        authenticator(d.url, request_timeout=1.0).authenticate("tok-a")


def test_bad_service_account_setting() -> None:
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        authenticator("http://127.0.0.1:1", service_accounts=["ambit"])
