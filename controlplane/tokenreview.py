"""Node authentication for the CA in a Kubernetes cluster, by TokenReview.

Owns one question: whom does this bearer token speak for? The API server
(TokenReview) says whether it is valid and for which ServiceAccount; then:

- a node (`NodeCaller`): a ztunnel sends the projected token of its DaemonSet
  pod. Only the configured ServiceAccounts (the ambit DaemonSet's) speak for a
  node, and only when the token is bound to a pod: the node is the token's
  `authentication.kubernetes.io/node-name` extra field (Kubernetes >= 1.30), or
  else the `spec.nodeName` of the pod named in `.../pod-name` whose uid matches
  `.../pod-uid`.
- a workload (`WorkloadCaller`): any other ServiceAccount's token speaks for
  that ServiceAccount alone (a waypoint's pod asking for its own identity),
  when it is bound to a pod (`.../pod-name` and `.../pod-uid`) that still
  exists with that uid, runs as that ServiceAccount and is Running. What it may
  obtain is decided by `authz.authorize_caller`: its own identity, nothing else.

A token that is not bound to a pod speaks for no one, even though the API
server accepts it.
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
from controlplane.authz import Caller, NodeCaller, WorkloadCaller

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
    """`identify(token) -> Caller | None`; raises TokenReviewError when the API cannot answer.

    `service_accounts` are `namespace/name` pairs whose tokens may speak for a
    node; `audiences` the audiences the token must carry (the DaemonSet projects
    its token with audience `ambit-ca`; empty means the API server's default);
    `workloads`: whether other ServiceAccounts' pod-bound tokens speak for
    themselves (waypoints need it). Positive answers are cached for `cache_ttl`
    seconds by a hash of the token.
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
        workloads: bool = True,
    ) -> None:
        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self.service_accounts = frozenset(service_accounts)
        for sa in self.service_accounts:
            ns, _, name = sa.partition("/")
            if not ns or not name or "/" in name:
                raise ValueError(f"service account {sa!r}: expected NAMESPACE/NAME, e.g. ambit-system/ambit")
        self.audiences = list(audiences)
        self.workloads = workloads
        self._timeout = request_timeout
        self._ttl = cache_ttl
        self._clock = clock
        self._cache: dict[str, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: str = "kubernetes", **kw: Any) -> TokenReviewAuthenticator:
        """Credentials as for the cluster source: `kubernetes` (in-cluster) or `kubernetes:KUBECONFIG`."""
        from ambit.sources.kube import api_client_from_spec

        return cls(api_client_from_spec(spec), **kw)

    def authenticate(self, token: str) -> str | None:
        """The node a token speaks for, or None (a workload's token speaks for no node)."""
        caller = self.identify(token)
        return caller.node if isinstance(caller, NodeCaller) else None

    def identify(self, token: str) -> Caller | None:
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
        caller = self._review(token)
        if caller is not None and self._ttl > 0:
            with self._lock:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                self._cache[digest] = (caller, now + self._ttl)
        return caller

    def _review(self, token: str) -> Caller | None:
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
        extra = user.get("extra") or {}
        if f"{sa_ns}/{sa_name}" not in self.service_accounts:
            if self.workloads:
                return self._workload(sa_ns, sa_name, extra)
            log.warning(
                "node token rejected: ServiceAccount %s/%s is not one of %s",
                sa_ns, sa_name, ", ".join(sorted(self.service_accounts)),
            )
            return None
        node = _first(extra.get(EXTRA_NODE_NAME))
        if node:
            return NodeCaller(node)
        pod_name, pod_uid = _first(extra.get(EXTRA_POD_NAME)), _first(extra.get(EXTRA_POD_UID))
        if not pod_name:
            log.warning(
                "node token of %s/%s rejected: not bound to a pod (use a projected ServiceAccount token)",
                sa_ns, sa_name,
            )
            return None
        pod = self._pod(sa_ns, pod_name, pod_uid)
        node = (pod.get("spec") or {}).get("nodeName") if pod is not None else None
        return NodeCaller(str(node)) if node else None

    def _workload(self, namespace: str, sa: str, extra: dict[str, Any]) -> WorkloadCaller | None:
        """A workload's token: it speaks for its ServiceAccount while its pod runs as it."""
        pod_name, pod_uid = _first(extra.get(EXTRA_POD_NAME)), _first(extra.get(EXTRA_POD_UID))
        if not pod_name or not pod_uid:
            log.warning("token of %s/%s rejected: not bound to a pod (use a projected ServiceAccount "
                        "token with audience %s)", namespace, sa, " or ".join(self.audiences) or "the default")
            return None
        pod = self._pod(namespace, pod_name, pod_uid)
        if pod is None:
            return None
        spec, status = pod.get("spec") or {}, pod.get("status") or {}
        runs_as = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if runs_as != sa:
            log.warning("token of %s/%s rejected: its pod %s/%s runs as %s", namespace, sa, namespace, pod_name, runs_as)
            return None
        if status.get("phase") != "Running":
            log.warning("token of %s/%s rejected: its pod %s/%s is %s, not Running",
                        namespace, sa, namespace, pod_name, status.get("phase") or "without a phase")
            return None
        node = spec.get("nodeName")
        return WorkloadCaller(namespace, sa, pod_name, str(node) if node else None)

    def _pod(self, namespace: str, name: str, uid: str | None) -> dict[str, Any] | None:
        """The token's pod, if it still exists with the token's uid."""
        try:
            resp: Any = self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
            pod = json.loads(resp.data)
            resp.release_conn()
        except ApiException as e:
            if e.status == 404:
                log.warning("token rejected: its pod %s/%s no longer exists", namespace, name)
                return None
            raise TokenReviewError(f"reading pod {namespace}/{name} failed: HTTP {e.status} {e.reason or ''}") from e
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise TokenReviewError(f"reading pod {namespace}/{name} failed: {type(e).__name__}: {e}") from e
        md = pod.get("metadata") or {}
        if uid and md.get("uid") != uid:
            # A new pod with the same name: the token belonged to its predecessor.
            log.warning("token rejected: pod %s/%s has uid %s, the token names %s",
                        namespace, name, md.get("uid"), uid)
            return None
        return dict(pod)


def _first(values: Any) -> str | None:
    if isinstance(values, list) and values:
        return str(values[0]) or None
    if isinstance(values, str):
        return values or None
    return None
