"""A test double for the Kubernetes API server, which cannot run on these machines.

A small HTTP/1.1 server on 127.0.0.1 that answers the requests ambit makes, in
the API server's wire format: paginated lists with `metadata.resourceVersion`,
watches as chunked newline-delimited JSON (ADDED/MODIFIED/DELETED/BOOKMARK and
ERROR events) starting after the requested resourceVersion, `410 Gone` for a
compacted resourceVersion (as an HTTP status or as an ERROR event), watches
that break mid-chunk, merge-patches of pods, TokenReviews, and bearer-token
authentication. The objects it starts with (`RECORDED`) are shaped like ones
recorded from a kind cluster (managedFields, Hostname node addresses, named
target ports, containerStatuses).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# collection path -> (kind, apiVersion)
COLLECTIONS: dict[str, tuple[str, str]] = {
    "/api/v1/namespaces": ("Namespace", "v1"),
    "/api/v1/nodes": ("Node", "v1"),
    "/api/v1/pods": ("Pod", "v1"),
    "/api/v1/services": ("Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "/apis/security.istio.io/v1/authorizationpolicies": ("AuthorizationPolicy", "security.istio.io/v1"),
    "/apis/security.istio.io/v1/peerauthentications": ("PeerAuthentication", "security.istio.io/v1"),
    "/apis/security.istio.io/v1beta1/authorizationpolicies": ("AuthorizationPolicy", "security.istio.io/v1beta1"),
    "/apis/security.istio.io/v1beta1/peerauthentications": ("PeerAuthentication", "security.istio.io/v1beta1"),
    "/apis/security.istio.io/v1/requestauthentications": ("RequestAuthentication", "security.istio.io/v1"),
    "/apis/gateway.networking.k8s.io/v1/gateways": ("Gateway", "gateway.networking.k8s.io/v1"),
}
POD_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)$")


def _managed() -> list[dict[str, Any]]:
    return [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
             "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]


def namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-ns-{name}", "labels": dict(labels or {}),
                         "managedFields": _managed()},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def node(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-node-{name}",
                         "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                     {"type": "Hostname", "address": name}]}}


def pod(ns: str, name: str, node_name: str, ip: str, *, sa: str = "default",
        labels: Mapping[str, str] | None = None, qos: str = "Burstable",
        ports: Mapping[str, int] | None = None) -> dict[str, Any]:
    uid = f"0f1e2d3c-{abs(hash((ns, name))) % 10**4:04d}-4000-8000-00000000{len(name):04d}"
    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": dict(labels or {}),
                     "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                     "managedFields": _managed()},
        "spec": {"nodeName": node_name, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9",
                                 "ports": [{"name": n, "containerPort": p, "protocol": "TCP"}
                                           for n, p in (ports or {}).items()]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": qos,
                   "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0,
                                          "image": "registry.k8s.io/pause:3.9",
                                          "imageID": "registry.k8s.io/pause@sha256:" + "0" * 64,
                                          "containerID": f"containerd://{'ab' * 32}"}]},
    }


def service(ns: str, name: str, vip: str, selector: Mapping[str, str],
            ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-svc-{name}"},
            "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                     "selector": dict(selector), "ports": ports}}


def endpoint_slice(ns: str, svc: str, ports: list[dict[str, Any]], ips: list[str]) -> dict[str, Any]:
    return {"metadata": {"name": f"{svc}-abcde", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


def authz(ns: str, name: str, spec: Mapping[str, Any], version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns, "generation": 1}, "spec": dict(spec)}


def peer_authn(ns: str, name: str, mode: str, version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns, "generation": 1}, "spec": {"mtls": {"mode": mode}}}


def recorded() -> dict[str, list[dict[str, Any]]]:
    """The cluster the double starts with: two nodes, an enrolled namespace, a named-port service."""
    return {
        "/api/v1/namespaces": [namespace("kube-system"),
                               namespace("shop", {"ambit.dev/dataplane-mode": "ambient"}),
                               namespace("legacy")],
        "/api/v1/nodes": [node("node-a", "172.18.0.2"), node("node-b", "172.18.0.3")],
        "/api/v1/pods": [
            pod("shop", "web-0", "node-a", "10.244.1.5", sa="web", labels={"app": "web"},
                ports={"http": 8080}),
            pod("shop", "db-0", "node-b", "10.244.2.7", sa="db", labels={"app": "db"}, qos="Guaranteed"),
            pod("legacy", "old-0", "node-a", "10.244.1.9", labels={"app": "old"}, qos="BestEffort"),
        ],
        "/api/v1/services": [
            service("shop", "web", "10.96.0.10", {"app": "web"},
                    [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]),
        ],
        "/apis/discovery.k8s.io/v1/endpointslices": [
            endpoint_slice("shop", "web", [{"name": "http", "port": 8080, "protocol": "TCP"}], ["10.244.1.5"]),
        ],
        "/apis/security.istio.io/v1/authorizationpolicies": [
            authz("shop", "allow-web", {"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW",
                                        "rules": [{"from": [{"source": {"principals": [
                                            "cluster.local/ns/shop/sa/web"]}}]}]}),
        ],
        "/apis/security.istio.io/v1/peerauthentications": [peer_authn("shop", "strict", "STRICT")],
    }


@dataclass
class Collection:
    items: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (rv, type, obj)
    compacted: int = 0  # watches from a resourceVersion below this get 410


@dataclass
class TokenInfo:
    username: str
    extra: dict[str, list[str]]
    audiences: list[str]


class KubeApiDouble:
    """Start with `start()`; `url` is then `http://127.0.0.1:PORT`. Always `stop()` (fixtures do)."""

    def __init__(self, objects: Mapping[str, list[dict[str, Any]]] | None = None,
                 token: str | None = None, gone_as_event: bool = True) -> None:
        self.lock = threading.Condition()
        self.rv = 100
        self.collections: dict[str, Collection] = {p: Collection() for p in COLLECTIONS}
        self.served: set[str] = set(COLLECTIONS)
        self.token = token
        self.gone_as_event = gone_as_event
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.patches: list[tuple[str, str, dict[str, Any]]] = []  # (path, content-type, body)
        self.token_reviews: list[dict[str, Any]] = []
        self.tokens: dict[str, TokenInfo] = {}
        self._break: dict[str, int] = {}  # path -> generation; watches of an older generation break
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for path, objs in (objects if objects is not None else recorded()).items():
            for o in objs:
                self._put(path, o, record=False)

    # -- lifecycle

    def start(self) -> str:
        double = self

        class Handler(_Handler):
            api = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="kubeapi-double", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- mutations (tests call these; watchers see them as events)

    def _put(self, path: str, obj: dict[str, Any], record: bool = True) -> str:
        col = self.collections[path]
        self.rv += 1
        o = copy.deepcopy(obj)
        o["metadata"]["resourceVersion"] = str(self.rv)
        key = (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        typ = "MODIFIED" if key in col.items else "ADDED"
        col.items[key] = o
        if record:
            col.events.append((self.rv, typ, o))
        return typ

    def apply(self, path: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self._put(path, obj)
            self.lock.notify_all()

    def delete(self, path: str, ns: str, name: str) -> None:
        with self.lock:
            col = self.collections[path]
            o = col.items.pop((ns, name))
            self.rv += 1
            o = copy.deepcopy(o)
            o["metadata"]["resourceVersion"] = str(self.rv)
            col.events.append((self.rv, "DELETED", o))
            self.lock.notify_all()

    def get(self, path: str, ns: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.collections[path].items[(ns, name)])

    def compact(self, path: str) -> None:
        """Forget the event history: watches from any older resourceVersion now get 410 Gone."""
        with self.lock:
            col = self.collections[path]
            col.events.clear()
            col.compacted = self.rv + 1
            self._break[path] = self._break.get(path, 0) + 1
            self.lock.notify_all()

    def break_watches(self, path: str) -> None:
        """Cut every open watch of `path` in the middle of a chunk."""
        with self.lock:
            self._break[path] = self._break.get(path, 0) + 1
            self.lock.notify_all()

    def count(self, method: str, prefix: str, *, watch: bool | None = None) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix)
                       and (watch is None or ("watch=true" in p) == watch))


class _Handler(BaseHTTPRequestHandler):
    api: KubeApiDouble
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing

    def _send_json(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send_json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "message": message, "reason": reason, "code": code})

    def _authorized(self) -> bool:
        with self.api.lock:
            self.api.requests.append((self.command, self.path))
        if self.api.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.api.token}":
            return True
        self._status(401, "Unauthorized", "Unauthorized")
        return False

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        out: dict[str, Any] = json.loads(self.rfile.read(n) or b"{}")
        return out

    # -- verbs

    def do_GET(self) -> None:
        if not self._authorized():
            return
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        m = POD_PATH.match(url.path)
        if m:
            with self.api.lock:
                obj = self.api.collections["/api/v1/pods"].items.get((m.group(1), m.group(2)))
            if obj is None:
                self._status(404, "NotFound", f'pods "{m.group(2)}" not found')
            else:
                self._send_json(200, {"kind": "Pod", "apiVersion": "v1", **obj})
            return
        if url.path not in self.api.served:
            self._status(404, "NotFound", "the server could not find the requested resource")
            return
        if q.get("watch") == "true":
            self._watch(url.path, q)
        else:
            self._list(url.path, q)

    def _list(self, path: str, q: Mapping[str, str]) -> None:
        kind, api_version = COLLECTIONS[path]
        with self.api.lock:
            col = self.api.collections[path]
            items = [copy.deepcopy(o) for _, o in sorted(col.items.items())]
            rv = str(self.api.rv)
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        md: dict[str, Any] = {"resourceVersion": rv}
        if start + limit < len(items):
            md["continue"] = str(start + limit)
        if api_version.startswith(("security.istio.io", "gateway.networking.k8s.io")):
            # Custom resources come back with kind/apiVersion on each item; built-in kinds do not.
            page = [{"apiVersion": api_version, "kind": kind, **o} for o in page]
        self._send_json(200, {"kind": f"{kind}List", "apiVersion": api_version, "metadata": md, "items": page})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, path: str, q: Mapping[str, str]) -> None:
        api = self.api
        since = int(q.get("resourceVersion") or 0)
        timeout = float(q.get("timeoutSeconds") or 300)
        with api.lock:
            col = api.collections[path]
            gone = since < col.compacted
            generation = api._break.get(path, 0)
        if gone and not api.gone_as_event:
            self._status(410, "Expired", f"too old resource version: {since} ({col.compacted})")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if gone:
            ev = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                              "message": f"too old resource version: {since}",
                                              "reason": "Expired", "code": 410}}
            self._chunk(json.dumps(ev).encode() + b"\n")
            self._chunk(b"")
            return
        sent = since
        deadline = time.monotonic() + timeout
        while True:
            with api.lock:
                while True:
                    pending = [e for e in col.events if e[0] > sent]
                    broken = api._break.get(path, 0) != generation
                    if pending or broken or api._stopping or time.monotonic() >= deadline:
                        break
                    api.lock.wait(0.1)
            if broken:
                # A chunk header that promises more than arrives, then the connection drops.
                self.wfile.write(b"400\r\n{\"type\": \"MODIF")
                self.wfile.flush()
                self.close_connection = True
                return
            if api._stopping or (not pending and time.monotonic() >= deadline):
                self._chunk(b"")
                return
            for rv, typ, obj in pending:
                kind, api_version = COLLECTIONS[path]
                self._chunk(json.dumps({"type": typ, "object": {"apiVersion": api_version, "kind": kind,
                                                                **obj}}).encode() + b"\n")
                sent = rv
            if q.get("allowWatchBookmarks") == "true":
                self._chunk(json.dumps({"type": "BOOKMARK", "object": {
                    "kind": COLLECTIONS[path][0], "apiVersion": COLLECTIONS[path][1],
                    "metadata": {"resourceVersion": str(sent)}}}).encode() + b"\n")

    def do_PATCH(self) -> None:
        if not self._authorized():
            return
        m = POD_PATH.match(urlsplit(self.path).path)
        ctype = self.headers.get("Content-Type", "")
        body = self._body()
        if not m:
            self._status(404, "NotFound", "not found")
            return
        with self.api.lock:
            self.api.patches.append((self.path, ctype, body))
            obj = self.api.collections["/api/v1/pods"].items.get((m.group(1), m.group(2)))
        if obj is None:
            self._status(404, "NotFound", f'pods "{m.group(2)}" not found')
            return
        if ctype != "application/merge-patch+json":
            self._status(415, "UnsupportedMediaType", f"the double only takes merge patches, got {ctype}")
            return
        new = _merge(copy.deepcopy(obj), body)
        self.api.apply("/api/v1/pods", new)
        self._send_json(200, {"kind": "Pod", "apiVersion": "v1", **self.api.get("/api/v1/pods", *m.groups())})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if urlsplit(self.path).path != "/apis/authentication.k8s.io/v1/tokenreviews":
            self._status(404, "NotFound", "not found")
            return
        body = self._body()
        with self.api.lock:
            self.api.token_reviews.append(body)
            info = self.api.tokens.get((body.get("spec") or {}).get("token", ""))
        wanted = (body.get("spec") or {}).get("audiences") or []
        status: dict[str, Any]
        if info is None:
            status = {"authenticated": False, "error": "invalid bearer token"}
        elif wanted and not set(wanted) & set(info.audiences):
            status = {"authenticated": False, "error": "token audiences do not match"}
        else:
            status = {"authenticated": True, "audiences": info.audiences or wanted,
                      "user": {"username": info.username, "uid": "u-1",
                               "groups": ["system:serviceaccounts"], "extra": info.extra}}
        self._send_json(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                              "metadata": {"creationTimestamp": None}, "spec": body.get("spec"),
                              "status": status})


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge(target.get(k), v)
    return target
