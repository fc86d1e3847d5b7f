"""`kubernetes`: cluster state from the Kubernetes API server (list+watch), and pod annotations.

Owns one reflector thread per resource (Namespaces, Nodes, Pods of every node,
Services, EndpointSlices, and Istio's AuthorizationPolicy/PeerAuthentication in
`security.istio.io/v1`, falling back to `v1beta1`). Each reflector lists, then
watches from the list's resourceVersion; a `410 Gone` relists, a broken watch
reconnects from the last seen resourceVersion after a jittered backoff. The
objects stay plain dicts, exactly as the API served them, and are fed to
`ambit.cluster.build_state`, so this source and `local:PATH` share one
model. An object that does not parse keeps its last good version in force and
is reported in `last_error`.

Also `KubePodAnnotator` (the `agent.runtime.PodAnnotator` for Kubernetes) and
`api_client_from_spec`, which the CA's TokenReview authenticator reuses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from ambit.cluster import ClusterError, ClusterState, build_state, parse_object

log = logging.getLogger("ambit.cluster.kube")

ISTIO_SECURITY_GROUP = "security.istio.io"
# Preferred first: a cluster that serves v1 gets v1 objects.
ISTIO_SECURITY_VERSIONS = ("v1", "v1beta1")
GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSIONS = ("v1", "v1beta1")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
LIST_PAGE = 500


class KubeError(ClusterError):
    """The API server could not be reached or refused a request; the message says which and why."""


# ---------------------------------------------------------------------------
# configuration


def api_client_from_spec(spec: str = "kubernetes") -> client.ApiClient:
    """An ApiClient for `kubernetes` (in-cluster, else $KUBECONFIG / ~/.kube/config) or `kubernetes:PATH`."""
    if spec != "kubernetes" and not spec.startswith("kubernetes:"):
        raise KubeError(f"cluster source {spec!r}: expected kubernetes or kubernetes:/path/to/kubeconfig")
    path = spec.removeprefix("kubernetes").removeprefix(":")
    cfg = client.Configuration()
    try:
        if path:
            if not os.path.isfile(path):
                raise KubeError(f"cluster source {spec!r}: kubeconfig {path} does not exist")
            config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)  # type: ignore[no-untyped-call]
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(client_configuration=cfg, persist_config=False)  # type: ignore[no-untyped-call]
    except ConfigException as e:
        where = path or "in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise KubeError(f"cluster source {spec!r}: cannot load Kubernetes credentials ({where}): {e}") from e
    # One connection per watch plus lists and patches; urllib3's default pool is
    # sized by CPU count, too small for 7 long-lived watches on a 2-core node.
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, 16)
    return client.ApiClient(cfg)


def describe_api_error(e: BaseException, what: str) -> str:
    """One line naming the request, the status and the likely cause."""
    if isinstance(e, ApiException):
        hint = {
            401: "the credentials were rejected (expired token or wrong kubeconfig user)",
            403: "RBAC does not allow it (see daemonset/rbac.yaml)",
            404: "the resource is not served (CRD not installed or API version missing)",
            410: "the resourceVersion is too old (relisting)",
        }.get(int(e.status or 0), "")
        reason = e.reason or ""
        return f"{what}: HTTP {e.status} {reason}" + (f": {hint}" if hint else "")
    return f"{what}: {type(e).__name__}: {e} (is the API server reachable?)"


# ---------------------------------------------------------------------------
# reflectors


class _Gone(Exception):
    """The watch's resourceVersion expired (HTTP 410 or an ERROR event with code 410)."""


@dataclass(frozen=True)
class _Resource:
    """How to list/watch one kind; `call(**kwargs)` returns the raw urllib3 response."""

    kind: str
    api_version: str
    call: Callable[..., Any]
    namespaced: bool = True


class _Reflector:
    """List+watch of one resource kind into a dict of raw objects, in its own named thread."""

    def __init__(self, owner: KubernetesSource, name: str, resources: Callable[[], list[_Resource]]) -> None:
        self.owner = owner
        self.name = name
        # A callable so the policy reflectors can rediscover which version is served.
        self._resources = resources
        self.resource: _Resource | None = None
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = threading.Event()
        self.error: str | None = None
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self._resp: Any = None
        self.thread = threading.Thread(target=self._run, name=f"ambit-kube-{name}", daemon=True)

    # -- loop

    def _run(self) -> None:
        failures = 0
        while not self.owner._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                failures = 0
                self._watch()
            except _Gone:
                log.info("%s: resourceVersion %s expired, relisting", self.name, self.resource_version)
                self.resource_version = None
            except _NotServed as e:
                # No Istio CRDs: no policies, and look again later (they may get installed).
                self._set_error(str(e))
                self._replace([])
                self.resource_version = None
                self.synced.set()
                self.owner._stop.wait(self.owner.rediscover_interval)
            except Exception as e:
                if self.owner._stop.is_set():
                    break
                if isinstance(e, ApiException) and e.status == 410:
                    self.resource_version = None
                    continue
                failures += 1
                self._set_error(describe_api_error(e, f"{self.name}"))
                self.owner._stop.wait(self.owner._backoff(failures))

    def _set_error(self, message: str | None) -> None:
        if message and message != self.error:
            log.warning("kubernetes source: %s", message)
        self.error = message
        self.owner._errors_changed()

    def _list(self) -> None:
        candidates = self._resources()
        items: list[dict[str, Any]] = []
        md: dict[str, Any] = {}
        for i, res in enumerate(candidates):
            try:
                items, md = self._list_pages(res)
            except ApiException as e:
                # Not served (e.g. v1 of an older Istio CRD): try the next version.
                if e.status == 404 and i + 1 < len(candidates):
                    continue
                if e.status == 404 and len(candidates) > 1:
                    versions = ", ".join(r.api_version for r in candidates)
                    what = ("the Gateway API CRDs: no waypoints exist until then" if self.name == "gateways"
                            else "Istio's security.istio.io CRDs: no policies apply until then")
                    raise _NotServed(
                        f"{self.name}: none of {versions} is served: install {what} (see docs/kubernetes.md)"
                    ) from e
                raise
            self.resource = res
            break
        self.lists += 1
        self._replace(items)
        self.resource_version = str(md.get("resourceVersion") or "") or None
        if self.resource_version is None:
            # Without a version a watch would start "from now" and miss changes; relist later.
            raise KubeError(f"{self.name}: the list response carries no metadata.resourceVersion")
        self._set_error(None)
        self.synced.set()

    def _list_pages(self, res: _Resource) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE}
            if token:
                kwargs["_continue"] = token
            resp = res.call(_preload_content=False, _request_timeout=self.owner.request_timeout, **kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items.extend(body.get("items") or [])
            md: dict[str, Any] = body.get("metadata") or {}
            token = md.get("continue") or None
            if not token:
                return items, md

    def _watch(self) -> None:
        assert self.resource is not None
        self.watches += 1
        resp = self.resource.call(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.owner.watch_timeout,
            _preload_content=False,
            _request_timeout=(self.owner.request_timeout, self.owner.watch_timeout + 30),
        )
        self._resp = resp
        try:
            if self.owner._stop.is_set():
                return
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if not line.strip():
                    continue
                self._event(json.loads(line))
                if self.owner._stop.is_set():
                    return
        except urllib3.exceptions.ProtocolError:
            # The server (or a proxy) cut the stream mid-chunk: reconnect from the last version.
            if not self.owner._stop.is_set():
                log.info("%s: watch broke, reconnecting from resourceVersion %s", self.name, self.resource_version)
                self.owner._stop.wait(self.owner._backoff(1))
        finally:
            self._resp = None
            resp.release_conn()

    def _event(self, ev: Mapping[str, Any]) -> None:
        kind = ev.get("type")
        obj = ev.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise ApiException(status=code, reason=f"{obj.get('reason')}: {obj.get('message')}")
        md = obj.get("metadata") or {}
        rv = md.get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            with self.owner._lock:
                self.objects[self._key(obj)] = self._complete(obj)
            self.owner._changed()
        elif kind == "DELETED":
            with self.owner._lock:
                self.objects.pop(self._key(obj), None)
            self.owner._changed()
        elif kind != "BOOKMARK":
            log.warning("%s: ignoring unknown watch event type %r", self.name, kind)
        if rv:
            self.resource_version = str(rv)

    def _key(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        md = obj.get("metadata") or {}
        return (str(md.get("namespace") or ""), str(md.get("name") or ""))

    def _complete(self, obj: dict[str, Any]) -> dict[str, Any]:
        # List items carry no kind/apiVersion; the model needs both. managedFields is
        # bulky server bookkeeping that nothing downstream reads.
        assert self.resource is not None
        out = dict(obj)
        out["kind"] = self.resource.kind
        out["apiVersion"] = obj.get("apiVersion") or self.resource.api_version
        md = out.get("metadata")
        if isinstance(md, dict) and "managedFields" in md:
            out["metadata"] = {k: v for k, v in md.items() if k != "managedFields"}
        return out

    def _replace(self, items: list[dict[str, Any]]) -> None:
        objects = {self._key(o): self._complete(o) for o in items}
        with self.owner._lock:
            self.objects = objects
        self.owner._changed()

    def stop(self) -> None:
        resp = self._resp
        if resp is not None:
            try:
                # Unblocks the thread's read; urllib3 >= 2.3 (the watch loop then exits).
                resp.shutdown()
            except Exception:
                pass


class _NotServed(Exception):
    """None of a resource's API versions is served (e.g. the Istio CRDs are not installed)."""


# ---------------------------------------------------------------------------
# the source


class KubernetesSource:
    """`kubernetes`: the cluster as the API server sees it. Implements `ClusterSource`."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        description: str = "kubernetes",
        sync_timeout: float = 30.0,
        watch_timeout: int = 300,
        request_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        rediscover_interval: float = 60.0,
        debounce: float = 0.05,
        rng: random.Random | None = None,
        resources: Collection[str] | None = None,
        gateway_namespace: str | None = None,
    ) -> None:
        """`resources`: the reflector names to list and watch (e.g. only `pods` for the CA,
        which then needs RBAC for nothing else); None: all of them. `gateway_namespace`: an
        ingress gateway's namespace: HTTPRoutes and RateLimitPolicies are listed too, and the
        kubernetes.io/tls Secrets of that namespace only (no other process reads Secrets)."""
        self.description = description
        self.api_client = api_client
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.rediscover_interval = rediscover_interval
        self.debounce = debounce
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        self._state = ClusterState()
        self._version = 0
        self._last_good: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._object_errors: dict[tuple[str, str, str], str] = {}
        self._last_error: str | None = None
        core = client.CoreV1Api(api_client)
        disc = client.DiscoveryV1Api(api_client)
        custom = client.CustomObjectsApi(api_client)

        def fixed(res: _Resource) -> Callable[[], list[_Resource]]:
            return lambda: [res]

        def crd(group: str, versions: tuple[str, ...], kind: str, plural: str) -> Callable[[], list[_Resource]]:
            def call_for(version: str) -> Callable[..., Any]:
                def call(**kw: Any) -> Any:
                    return custom.list_cluster_custom_object(group, version, plural, **kw)

                return call

            res = [_Resource(kind, f"{group}/{v}", call_for(v)) for v in versions]
            return lambda: res

        def istio(kind: str, plural: str) -> Callable[[], list[_Resource]]:
            return crd(ISTIO_SECURITY_GROUP, ISTIO_SECURITY_VERSIONS, kind, plural)

        self._reflectors = [
            _Reflector(self, "namespaces", fixed(_Resource("Namespace", "v1", core.list_namespace, False))),
            _Reflector(self, "nodes", fixed(_Resource("Node", "v1", core.list_node, False))),
            _Reflector(self, "pods", fixed(_Resource("Pod", "v1", core.list_pod_for_all_namespaces))),
            _Reflector(self, "services", fixed(_Resource("Service", "v1", core.list_service_for_all_namespaces))),
            _Reflector(
                self,
                "endpointslices",
                fixed(
                    _Resource("EndpointSlice", "discovery.k8s.io/v1", disc.list_endpoint_slice_for_all_namespaces)
                ),
            ),
            _Reflector(self, "authorizationpolicies", istio("AuthorizationPolicy", "authorizationpolicies")),
            _Reflector(self, "peerauthentications", istio("PeerAuthentication", "peerauthentications")),
            _Reflector(self, "requestauthentications", istio("RequestAuthentication", "requestauthentications")),
            _Reflector(self, "gateways", crd(GATEWAY_GROUP, GATEWAY_VERSIONS, "Gateway", "gateways")),
        ]
        if gateway_namespace is not None:
            ns = gateway_namespace

            def tls_secrets(**kw: Any) -> Any:
                return core.list_namespaced_secret(ns, field_selector="type=kubernetes.io/tls", **kw)

            self._reflectors += [
                _Reflector(self, "httproutes", crd(GATEWAY_GROUP, GATEWAY_VERSIONS, "HTTPRoute", "httproutes")),
                _Reflector(self, "ratelimitpolicies", crd("ambit.dev", ("v1alpha1",), "RateLimitPolicy",
                                                          "ratelimitpolicies")),
                _Reflector(self, "secrets", fixed(_Resource("Secret", "v1", tls_secrets))),
            ]
        if resources is not None:
            unknown = set(resources) - {r.name for r in self._reflectors}
            if unknown:
                raise ValueError(f"unknown resources {sorted(unknown)}; known: {[r.name for r in self._reflectors]}")
            self._reflectors = [r for r in self._reflectors if r.name in resources]
        self._builder = threading.Thread(target=self._build_loop, name="ambit-kube-build", daemon=True)
        for r in self._reflectors:
            r.thread.start()
        self._builder.start()
        if sync_timeout > 0:
            self.wait_synced(sync_timeout)

    @classmethod
    def from_spec(cls, spec: str, **kw: Any) -> KubernetesSource:
        """`kubernetes` (in-cluster config, else the default kubeconfig) or `kubernetes:/path/to/kubeconfig`."""
        return cls(api_client_from_spec(spec), description=spec, **kw)

    # -- ClusterSource

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def version(self) -> int:
        """Increases each time a new state is published."""
        return self._version

    def current(self) -> ClusterState:
        return self._state

    async def changes(self, interval: float = 0.25) -> AsyncIterator[ClusterState]:
        while not self.synced:
            await asyncio.sleep(interval)
        seen = self._version
        yield self._state
        while True:
            await asyncio.sleep(interval)
            if self._version != seen:
                seen = self._version
                yield self._state

    def close(self) -> None:
        """Stop every watch and thread; returns once they have exited (bounded wait)."""
        self._stop.set()
        self._dirty.set()
        for r in self._reflectors:
            r.stop()
        deadline = time.monotonic() + 5.0
        for t in [*(r.thread for r in self._reflectors), self._builder]:
            t.join(max(0.0, deadline - time.monotonic()))
        self.api_client.close()  # type: ignore[no-untyped-call]

    # -- extras

    @property
    def synced(self) -> bool:
        """True once every resource has been listed at least once (and a state was built)."""
        return all(r.synced.is_set() for r in self._reflectors) and self._version > 0

    def wait_synced(self, timeout: float) -> None:
        """Block until the first full list; raises KubeError naming what did not sync and why."""
        deadline = time.monotonic() + timeout
        while not self.synced and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.01)
        if not self.synced:
            missing = [r for r in self._reflectors if not r.synced.is_set()]
            why = "; ".join(r.error or f"{r.name}: no answer yet" for r in missing) or "no state built"
            self.close()
            raise KubeError(f"{self.description}: the first list did not complete within {timeout:g}s: {why}")

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per resource: objects held, lists and watches made, resourceVersion, error (for admin/tests)."""
        return {
            r.name: {
                "objects": len(r.objects),
                "lists": r.lists,
                "watches": r.watches,
                "resource_version": r.resource_version,
                "api_version": r.resource.api_version if r.resource else None,
                "error": r.error,
            }
            for r in self._reflectors
        }

    # -- internals

    def _backoff(self, failures: int) -> float:
        # Full jitter, so that every agent of a big cluster does not reconnect in step.
        cap = min(self.backoff_max, self.backoff_base * (2 ** min(failures - 1, 16)))
        return self._rng.uniform(cap / 2, cap)

    def _changed(self) -> None:
        self._dirty.set()

    def _errors_changed(self) -> None:
        self._refresh_last_error()

    def _refresh_last_error(self) -> None:
        msgs = [r.error for r in self._reflectors if r.error]
        msgs += list(self._object_errors.values())
        self._last_error = "; ".join(msgs) if msgs else None

    def _build_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            # Coalesce bursts of events (a rollout) into one rebuild.
            time.sleep(self.debounce)
            self._dirty.clear()
            if not all(r.synced.is_set() for r in self._reflectors):
                continue
            try:
                self._build()
            except Exception as e:  # never let the builder die silently
                log.exception("kubernetes source: building the state failed")
                self._object_errors[("", "", "<build>")] = f"building the state failed: {e}"
                self._refresh_last_error()

    def _snapshot(self) -> dict[str, list[dict[str, Any]]]:
        # The reflector threads mutate their dicts; copy them under the lock.
        with self._lock:
            return {r.name: list(r.objects.values()) for r in self._reflectors}

    def _build(self) -> None:
        raw = self._snapshot()
        slices = raw.pop("endpointslices", [])  # a source of `resources` lacks the others
        pods = raw.get("pods", [])
        objects: list[dict[str, Any]] = []
        errors: dict[tuple[str, str, str], str] = {}
        last_good: dict[tuple[str, str, str], dict[str, Any]] = {}
        for group in ("namespaces", "nodes", "pods", "services", "authorizationpolicies", "peerauthentications",
                      "requestauthentications", "gateways", "httproutes", "ratelimitpolicies", "secrets"):
            for obj in raw.get(group, []):
                md = obj.get("metadata") or {}
                key = (str(obj.get("kind")), str(md.get("namespace") or ""), str(md.get("name") or ""))
                if obj.get("kind") == "Service":
                    obj, problems = resolve_target_ports(obj, slices, pods)
                    if problems:
                        errors[key] = "; ".join(problems)
                try:
                    parse_object(obj)
                except ClusterError as e:
                    # keep the port messages too: both are about this object
                    errors[key] = "; ".join([*filter(None, [errors.get(key)]), str(e)])
                    prev = self._last_good.get(key)
                    if prev is not None:
                        objects.append(prev)
                        last_good[key] = prev
                    continue
                objects.append(obj)
                last_good[key] = obj
        state = build_state(objects)
        with self._lock:
            self._last_good = last_good
            self._object_errors = errors
            self._state = state
            self._version += 1
        self._refresh_last_error()


# ---------------------------------------------------------------------------
# services: named target ports


def resolve_target_ports(
    svc: dict[str, Any], slices: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """Replace named `targetPort`s by numbers (the model needs numbers).

    Looked up in the Service's EndpointSlices (which carry the resolved number
    per service port name), else in the selected pods' container ports. A port
    that cannot be resolved yet is left out, with a message naming it.
    """
    spec = svc.get("spec") or {}
    ports = spec.get("ports") or []
    if not any(isinstance(p.get("targetPort"), str) and not p["targetPort"].isdigit() for p in ports):
        return svc, []
    md = svc.get("metadata") or {}
    ns, name = md.get("namespace") or "default", md.get("name")
    by_port_name: dict[str, int] = {}
    for s in slices:
        smd = s.get("metadata") or {}
        if smd.get("namespace") == ns and (smd.get("labels") or {}).get(SERVICE_NAME_LABEL) == name:
            for sp in s.get("ports") or []:
                if isinstance(sp.get("port"), int):
                    by_port_name[str(sp.get("name") or "")] = sp["port"]
    selector = spec.get("selector") or {}
    by_container_port: dict[str, int] = {}
    if selector:
        for p in pods:
            pmd = p.get("metadata") or {}
            labels = pmd.get("labels") or {}
            if pmd.get("namespace") != ns or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for c in (p.get("spec") or {}).get("containers") or []:
                for cp in c.get("ports") or []:
                    if cp.get("name") and isinstance(cp.get("containerPort"), int):
                        by_container_port.setdefault(cp["name"], cp["containerPort"])
    new_ports = []
    problems = []
    for i, p in enumerate(ports):
        tp = p.get("targetPort")
        if isinstance(tp, str) and not tp.isdigit():
            number = by_port_name.get(str(p.get("name") or "")) or by_container_port.get(tp)
            if number is None:
                problems.append(
                    f"Service {ns}/{name}: spec.ports[{i}].targetPort {tp!r} is a named port that no "
                    "EndpointSlice or selected pod resolves yet; that port is left out"
                )
                continue
            p = {**p, "targetPort": number}
        new_ports.append(p)
    return {**svc, "spec": {**spec, "ports": new_ports}}, problems
