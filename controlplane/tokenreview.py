"""Node authentication for the CA in a Kubernetes cluster, by TokenReview.

Owns one question: which node does this bearer token speak for? A ztunnel
sends the projected ServiceAccount token of its DaemonSet pod; the API server
(TokenReview) says whether it is valid and for whom. Only the tokens of the
configured ServiceAccounts (the ambit DaemonSet's) count, and only when the
token is bound to a pod: the node is the token's
`authentication.kubernetes.io/node-name` extra field (Kubernetes >= 1.30), or
else the `spec.nodeName` of the pod named in `.../pod-name` whose uid matches
`.../pod-uid`. A token of any other workload names no node, even though the
API server accepts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane import ControlPlaneError

log = logging.getLogger("ambit.ca.tokenreview")

SA_PREFIX = "system:serviceaccount:"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
DEFAULT_SERVICE_ACCOUNTS = ("ambit-system/ambit",)
DEFAULT_AUDIENCES = ("ambit-ca",)


class TokenReviewError(ControlPlaneError):
    """The API server could not answer (unreachable, RBAC): not a verdict on the token."""


class TokenReviewAuthenticator:
    """`authenticate(token) -> node name | None`; raises TokenReviewError when the API cannot answer.

    `service_accounts` are `namespace/name` pairs whose tokens may speak for a
    node; `audiences` the audiences the token must carry (the DaemonSet projects
    its token with audience `ambit-ca`; empty means the API server's default).
    Positive answers are cached for `cache_ttl` seconds by a hash of the token.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        service_accounts: Iterable[str] = DEFAULT_SERVICE_ACCOUNTS,
        audiences: Sequence[str] = DEFAULT_AUDIENCES,
        request_timeout: float = 5.0,
        cache_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self.service_accounts = frozenset(service_accounts)
        for sa in self.service_accounts:
            ns, _, name = sa.partition("/")
            if not ns or not name or "/" in name:
                raise ValueError(f"service account {sa!r}: expected NAMESPACE/NAME, e.g. ambit-system/ambit")
        self.audiences = list(audiences)
        self._timeout = request_timeout
        self._ttl = cache_ttl
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str = "kubernetes", **kw: Any) -> TokenReviewAuthenticator:
        """Credentials as for the cluster source: `kubernetes` (in-cluster) or `kubernetes:KUBECONFIG`."""
        from ambit.sources.kube import api_client_from_spec

        return cls(api_client_from_spec(spec), **kw)

    def authenticate(self, token: str) -> str | None:
        token = token.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            if hit and hit[1] > now:
                return hit[0]
        node = self._review(token)
        if node is not None and self._ttl > 0:
            with self._lock:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                self._cache[digest] = (node, now + self._ttl)
        return node

    def _review(self, token: str) -> str | None:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, **({"audiences": self.audiences} if self.audiences else {})},
        }
        try:
            resp: Any = self._auth.create_token_review(
                body, _preload_content=False, _request_timeout=self._timeout  # type: ignore[arg-type]
            )
            review = json.loads(resp.data)
            resp.release_conn()
        except ApiException as e:
            raise TokenReviewError(
                f"TokenReview failed: HTTP {e.status} {e.reason or ''}"
                + (": the CA's ServiceAccount needs create on tokenreviews (see daemonset/rbac.yaml)"
                   if e.status == 403 else "")
            ) from e
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise TokenReviewError(f"TokenReview failed: {type(e).__name__}: {e} (is the API server reachable?)") from e
        status = review.get("status") or {}
        if not status.get("authenticated"):
            log.info("node token rejected by the API server: %s", status.get("error") or "not authenticated")
            return None
        user = status.get("user") or {}
        username = str(user.get("username") or "")
        if not username.startswith(SA_PREFIX):
            log.warning("node token rejected: %s is not a ServiceAccount", username)
            return None
        sa_ns, _, sa_name = username.removeprefix(SA_PREFIX).partition(":")
        if f"{sa_ns}/{sa_name}" not in self.service_accounts:
            log.warning(
                "node token rejected: ServiceAccount %s/%s is not one of %s",
                sa_ns, sa_name, ", ".join(sorted(self.service_accounts)),
            )
            return None
        extra = user.get("extra") or {}
        node = _first(extra.get(EXTRA_NODE_NAME))
        if node:
            return node
        pod_name, pod_uid = _first(extra.get(EXTRA_POD_NAME)), _first(extra.get(EXTRA_POD_UID))
        if not pod_name:
            log.warning(
                "node token of %s/%s rejected: not bound to a pod (use a projected ServiceAccount token)",
                sa_ns, sa_name,
            )
            return None
        return self._node_of_pod(sa_ns, pod_name, pod_uid)

    def _node_of_pod(self, namespace: str, name: str, uid: str | None) -> str | None:
        try:
            resp: Any = self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
            pod = json.loads(resp.data)
            resp.release_conn()
        except ApiException as e:
            if e.status == 404:
                log.warning("node token rejected: its pod %s/%s no longer exists", namespace, name)
                return None
            raise TokenReviewError(f"reading pod {namespace}/{name} failed: HTTP {e.status} {e.reason or ''}") from e
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise TokenReviewError(f"reading pod {namespace}/{name} failed: {type(e).__name__}: {e}") from e
        md = pod.get("metadata") or {}
        if uid and md.get("uid") != uid:
            # A new pod with the same name: the token belonged to its predecessor.
            log.warning("node token rejected: pod %s/%s has uid %s, the token names %s",
                        namespace, name, md.get("uid"), uid)
            return None
        node = (pod.get("spec") or {}).get("nodeName")
        return str(node) if node else None


def _first(values: Any) -> str | None:
    if isinstance(values, list) and values:
        return str(values[0]) or None
    if isinstance(values, str):
        return values or None
    return None
