"""Kubernetes-shaped cluster objects and the immutable `ClusterState` snapshot.

Pure: parses already-loaded YAML/JSON documents, never touches files or sockets.
Policies are kept as raw objects here; `ambit.policy` validates and compiles them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ambit import AmbitError


class ClusterError(AmbitError):
    """A cluster object or source is invalid; the message names the object and field."""


DATAPLANE_MODE = "ambit.dev/dataplane-mode"
USE_WAYPOINT = "ambit.dev/use-waypoint"
WAYPOINT_FOR = "ambit.dev/waypoint-for"
REDIRECTION = "ambit.dev/redirection"
# The Gateway API label a Gateway's own pods carry (a waypoint is never routed through itself).
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_CLASS = "ambit-waypoint"
INGRESS_CLASS = "ambit-ingress"
WAYPOINT_FOR_VALUES = ("service", "workload", "all")
GATEWAY_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")
# Kept as written, like policies; the ingress gateway compiles them (gateway/).
ROUTE_KINDS = {"HTTPRoute": GATEWAY_API_VERSIONS, "RateLimitPolicy": ("ambit.dev/v1alpha1",)}
TLS_SECRET_TYPE = "kubernetes.io/tls"
KNOWN_KINDS = ("Namespace", "Node", "Pod", "Service", "Gateway", *POLICY_KINDS, *ROUTE_KINDS, "Secret")


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A label selector's matchLabels against an object's labels (every pair present)."""
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""
    uid: str = ""


@dataclass(frozen=True)
class Namespace:
    meta: Meta

    @property
    def name(self) -> str:
        return self.meta.name


@dataclass(frozen=True)
class Node:
    meta: Meta
    addresses: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def address(self) -> str | None:
        return self.addresses[0] if self.addresses else None


@dataclass(frozen=True)
class Pod:
    meta: Meta
    node_name: str
    service_account: str = "default"
    ip: str | None = None
    phase: str = "Pending"
    command: tuple[str, ...] = ()
    # Kubernetes only: `status.qosClass` and `status.containerStatuses[].containerID`
    # (`<runtime>://<id>`), which locate the pod's cgroup on its node.
    qos_class: str = ""
    container_ids: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def key(self) -> str:
        """`<namespace>/<name>`, the form the CLI and logs use."""
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    meta: Meta
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None = None

    @property
    def key(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class Listener:
    name: str
    port: int
    protocol: str
    # an ingress Gateway's listeners: the hostname they serve (None: any), the TLS Secrets of
    # an HTTPS listener as (namespace, name), and from which namespaces routes may attach
    hostname: str | None = None
    certificate_refs: tuple[tuple[str, str], ...] = ()
    allowed_routes: str = "Same"  # Same | All


@dataclass(frozen=True)
class Gateway:
    """A Gateway API `Gateway`. Class `ambit-waypoint` is a waypoint: one listener
    `{name: mesh, port: 15008, protocol: HBONE}`; `ambit.dev/waypoint-for` says which traffic it
    takes (`service`, the default as in Istio, `workload` or `all`)."""

    meta: Meta
    class_name: str
    listeners: tuple[Listener, ...]

    @property
    def key(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"

    @property
    def is_waypoint(self) -> bool:
        return self.class_name == WAYPOINT_CLASS

    @property
    def is_ingress(self) -> bool:
        return self.class_name == INGRESS_CLASS

    @property
    def waypoint_for(self) -> str:
        return self.meta.labels.get(WAYPOINT_FOR, "service")


@dataclass(frozen=True)
class PolicyObject:
    """An `AuthorizationPolicy`, `PeerAuthentication` or `RequestAuthentication`, kept as written."""

    kind: str
    api_version: str
    meta: Meta
    spec: Mapping[str, Any]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class RouteObject:
    """An `HTTPRoute` or a `RateLimitPolicy`, kept as written (the ingress gateway compiles it)."""

    kind: str
    api_version: str
    meta: Meta
    spec: Mapping[str, Any]

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class TlsSecret:
    """A `kubernetes.io/tls` Secret: a certificate chain and its key, PEM. Never printed: the
    key is left out of repr, and the raw object is kept out of `ClusterState.objects`."""

    meta: Meta
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class ClusterState:
    """One consistent view of the cluster. Build it with `build_state`."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    nodes: Mapping[str, Node] = field(default_factory=dict)
    pods: Mapping[tuple[str, str], Pod] = field(default_factory=dict)
    services: Mapping[tuple[str, str], Service] = field(default_factory=dict)
    policies: tuple[PolicyObject, ...] = ()
    gateways: Mapping[tuple[str, str], Gateway] = field(default_factory=dict)
    # The objects as written, keyed by (kind, namespace, name): what the agent's
    # live feed sends to ztunnels, which rebuild the same state from them.
    objects: Mapping[tuple[str, str, str], Mapping[str, Any]] = field(default_factory=dict)
    routes: tuple[RouteObject, ...] = ()  # HTTPRoutes and RateLimitPolicies
    secrets: Mapping[tuple[str, str], TlsSecret] = field(default_factory=dict, repr=False)

    def pods_on_node(self, node: str) -> list[Pod]:
        return [p for p in self.pods.values() if p.node_name == node]

    def pod_by_ip(self, ip: str) -> Pod | None:
        for p in self.pods.values():
            if p.ip == ip:
                return p
        return None

    def service_by_ip(self, ip: str) -> Service | None:
        for s in self.services.values():
            if s.cluster_ip == ip:
                return s
        return None

    def service_endpoints(self, svc: Service) -> list[Pod]:
        """Pods in the service's namespace whose labels match its selector and that have an IP."""
        if not svc.selector:
            return []
        return [
            p
            for p in self.pods.values()
            if p.namespace == svc.meta.namespace
            and p.ip
            and selects(svc.selector, p.meta.labels)
        ]

    def node_hosts_identity(self, node: str, namespace: str, service_account: str) -> bool:
        """True while a pod with this namespace and service account is scheduled on `node`."""
        return any(
            p.node_name == node and p.namespace == namespace and p.service_account == service_account
            for p in self.pods.values()
        )

    def is_enrolled(self, pod: Pod) -> bool:
        """Enrollment rule: pod label wins (`none` opts out), else the namespace label."""
        mode = pod.meta.labels.get(DATAPLANE_MODE)
        if mode is not None:
            return mode == "ambient"
        ns = self.namespaces.get(pod.namespace)
        return ns is not None and ns.meta.labels.get(DATAPLANE_MODE) == "ambient"

    def _use_waypoint(self, labels: Mapping[str, str], namespace: str) -> str | None:
        # the object's own label wins over its namespace's; `none` opts out
        name = labels.get(USE_WAYPOINT)
        if name is None:
            ns = self.namespaces.get(namespace)
            name = ns.meta.labels.get(USE_WAYPOINT) if ns else None
        return None if not name or name == "none" else name

    def waypoint_for(self, pod: Pod) -> str | None:
        """The waypoint (a Gateway of the pod's namespace) the pod uses: its label, else its
        namespace's; None for `none`, for no label, and for the waypoint's own pods (its
        label, and its Gateway's service account)."""
        name = self._use_waypoint(pod.meta.labels, pod.namespace)
        if name is not None and pod.meta.labels.get(GATEWAY_NAME_LABEL) == name and pod.service_account == name:
            return None
        return name

    def service_waypoint(self, svc: Service) -> str | None:
        """The waypoint a Service uses: its label, else its namespace's (None: none)."""
        return self._use_waypoint(svc.meta.labels, svc.meta.namespace)

    def gateway_pods(self, gw: Gateway) -> list[Pod]:
        """The pods that carry a Gateway's label (gateway.networking.k8s.io/gateway-name)."""
        return sorted((p for p in self.pods.values() if p.namespace == gw.meta.namespace
                       and p.meta.labels.get(GATEWAY_NAME_LABEL) == gw.meta.name), key=lambda p: p.key)

    def serving_pods(self, gw: Gateway) -> list[Pod]:
        """The pods that serve a Gateway: those of its label that run as the service account
        named after it (Istio's convention). A pod labelled by mistake or by malice, running
        as another account, gets neither the Gateway's identity nor its traffic."""
        return [p for p in self.gateway_pods(gw) if p.service_account == gw.meta.name]


# ---------------------------------------------------------------------------
# parsing


def load_documents(text: str, origin: str = "<input>") -> list[dict[str, Any]]:
    """Split multi-document YAML (or JSON) into objects; `kind: List` is flattened."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ClusterError(f"{origin}: not valid YAML: {e}") from e
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ClusterError(f"{origin}: document {i + 1} is not a mapping")
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ClusterError(f"{origin}: document {i + 1}: items is not a list")
            out.extend(items)
        else:
            out.append(doc)
    return out


def _str_map(obj: Any, where: str) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ClusterError(f"{where}: expected a mapping of strings")
    return {str(k): str(v) for k, v in obj.items()}


def parse_meta(obj: Mapping[str, Any], namespaced: bool) -> Meta:
    kind = obj.get("kind", "?")
    md = obj.get("metadata")
    if not isinstance(md, dict) or not md.get("name"):
        raise ClusterError(f"{kind}: metadata.name is required")
    name = str(md["name"])
    where = f"{kind} {name}"
    ns = str(md.get("namespace") or ("default" if namespaced else ""))
    return Meta(
        name=name,
        namespace=ns,
        labels=_str_map(md.get("labels"), f"{where}: metadata.labels"),
        annotations=_str_map(md.get("annotations"), f"{where}: metadata.annotations"),
        resource_version=str(md.get("resourceVersion") or ""),
        uid=str(md.get("uid") or ""),
    )


def _ip(value: Any, where: str) -> str | None:
    if value in (None, "", "None"):
        return None
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError as e:
        raise ClusterError(f"{where}: {value!r} is not an IP address") from e


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ClusterError(f"{where}: {value!r} is not a port number")
    try:
        n = int(value)
    except ValueError as e:
        raise ClusterError(f"{where}: {value!r} is not a port number") from e
    if not 1 <= n <= 65535:
        raise ClusterError(f"{where}: port {n} is out of range 1-65535")
    return n


Parsed = Namespace | Node | Pod | Service | Gateway | PolicyObject | RouteObject | TlsSecret


def parse_object(obj: Mapping[str, Any]) -> Parsed:
    """Turn one Kubernetes-shaped mapping into its model type, naming the field that is wrong."""
    kind = obj.get("kind")
    if kind not in KNOWN_KINDS:
        raise ClusterError(f"unsupported kind {kind!r}; expected one of {', '.join(KNOWN_KINDS)}")
    if kind == "Namespace":
        return Namespace(parse_meta(obj, namespaced=False))
    if kind == "Node":
        meta = parse_meta(obj, namespaced=False)
        addrs = (obj.get("status") or {}).get("addresses") or []
        # Real nodes also list Hostname/InternalDNS entries, which are names, not IPs.
        ips = tuple(
            a
            for a in (
                _ip(x.get("address"), f"Node {meta.name}: status.addresses")
                for x in addrs
                if x.get("type") in (None, "InternalIP", "ExternalIP")
            )
            if a
        )
        return Node(meta, ips)
    meta = parse_meta(obj, namespaced=True)
    where = f"{kind} {meta.namespace}/{meta.name}"
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    if not isinstance(spec, dict):
        raise ClusterError(f"{where}: spec is not a mapping")
    if kind == "Pod":
        containers = spec.get("containers") or []
        command: tuple[str, ...] = ()
        if containers:
            c0 = containers[0]
            cmd = list(c0.get("command") or []) + list(c0.get("args") or [])
            command = tuple(str(x) for x in cmd)
        return Pod(
            meta=meta,
            node_name=str(spec.get("nodeName") or ""),
            service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
            ip=_ip(status.get("podIP"), f"{where}: status.podIP"),
            phase=str(status.get("phase") or "Pending"),
            command=command,
            qos_class=str(status.get("qosClass") or ""),
            container_ids=tuple(
                str(c["containerID"])
                for c in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
                if isinstance(c, dict) and c.get("containerID")
            ),
        )
    if kind == "Service":
        ports = []
        for i, p in enumerate(spec.get("ports") or []):
            pw = f"{where}: spec.ports[{i}]"
            port = _port(p.get("port"), f"{pw}.port")
            target = p.get("targetPort", port)
            ports.append(
                ServicePort(
                    port=port,
                    target_port=_port(target, f"{pw}.targetPort"),
                    name=str(p.get("name") or ""),
                    protocol=str(p.get("protocol") or "TCP"),
                )
            )
        return Service(
            meta=meta,
            selector=_str_map(spec.get("selector"), f"{where}: spec.selector"),
            ports=tuple(ports),
            cluster_ip=_ip(spec.get("clusterIP"), f"{where}: spec.clusterIP"),
        )
    api = str(obj.get("apiVersion") or "")
    if kind == "Gateway":
        return _gateway(meta, api, spec, where)
    if kind == "Secret":
        return _tls_secret(meta, obj, where)
    if kind in ROUTE_KINDS:
        if api not in ROUTE_KINDS[kind]:
            raise ClusterError(f"{where}: apiVersion {api!r} is not one of {', '.join(ROUTE_KINDS[kind])}")
        return RouteObject(str(kind), api, meta, spec)
    if api not in ("security.istio.io/v1", "security.istio.io/v1beta1"):
        raise ClusterError(
            f"{where}: apiVersion {api!r} is not security.istio.io/v1 or security.istio.io/v1beta1"
        )
    return PolicyObject(kind=str(kind), api_version=api, meta=meta, spec=spec)


def _gateway(meta: Meta, api: str, spec: Mapping[str, Any], where: str) -> Gateway:
    if api not in GATEWAY_API_VERSIONS:
        raise ClusterError(f"{where}: apiVersion {api!r} is not one of {', '.join(GATEWAY_API_VERSIONS)}")
    class_name = spec.get("gatewayClassName")
    if not isinstance(class_name, str) or not class_name:
        raise ClusterError(f"{where}: spec.gatewayClassName is required (ambit-waypoint for a waypoint)")
    listeners = []
    raw = spec.get("listeners") or []
    if not isinstance(raw, list):
        raise ClusterError(f"{where}: spec.listeners is not a list")
    for i, lst in enumerate(raw):
        lw = f"{where}: spec.listeners[{i}]"
        if not isinstance(lst, dict):
            raise ClusterError(f"{lw} is not a mapping")
        listeners.append(_listener(meta, lst, lw))
    gw = Gateway(meta, class_name, tuple(listeners))
    if gw.is_waypoint:
        if not any(x.port == 15008 and x.protocol == "HBONE" for x in listeners):
            raise ClusterError(f"{where}: spec.listeners: a waypoint needs the listener "
                               "{name: mesh, port: 15008, protocol: HBONE}")
        if gw.waypoint_for not in WAYPOINT_FOR_VALUES:
            raise ClusterError(f"{where}: metadata.labels.{WAYPOINT_FOR}: {gw.waypoint_for!r} is not one of "
                               f"{', '.join(WAYPOINT_FOR_VALUES)}")
    return gw


def _listener(meta: Meta, lst: Mapping[str, Any], lw: str) -> Listener:
    hostname = lst.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not hostname):
        raise ClusterError(f"{lw}.hostname: {hostname!r} is not a hostname")
    refs = []
    tls = lst.get("tls") or {}
    if not isinstance(tls, dict):
        raise ClusterError(f"{lw}.tls is not a mapping")
    for i, ref in enumerate(tls.get("certificateRefs") or []):
        if not isinstance(ref, dict) or not ref.get("name"):
            raise ClusterError(f"{lw}.tls.certificateRefs[{i}]: a name is required")
        if ref.get("kind", "Secret") != "Secret" or ref.get("group", "") not in ("", "core"):
            raise ClusterError(f"{lw}.tls.certificateRefs[{i}]: only Secrets (group \"\") are supported")
        refs.append((str(ref.get("namespace") or meta.namespace), str(ref["name"])))
    allowed = ((lst.get("allowedRoutes") or {}).get("namespaces") or {}).get("from", "Same")
    if allowed not in ("Same", "All"):
        raise ClusterError(f"{lw}.allowedRoutes.namespaces.from: {allowed!r} is not supported (Same or All)")
    return Listener(str(lst.get("name") or ""), _port(lst.get("port"), f"{lw}.port"), str(lst.get("protocol") or ""),
                    hostname, tuple(refs), str(allowed))


def _tls_secret(meta: Meta, obj: Mapping[str, Any], where: str) -> TlsSecret:
    """Only `kubernetes.io/tls` Secrets, and never their contents in a message."""
    if obj.get("type") != TLS_SECRET_TYPE:
        raise ClusterError(f"{where}: type {obj.get('type')!r}: only {TLS_SECRET_TYPE} Secrets are read")
    pems = {}
    for name in ("tls.crt", "tls.key"):
        data, text = (obj.get("data") or {}).get(name), (obj.get("stringData") or {}).get(name)
        try:
            pem = base64.b64decode(data, validate=True) if data is not None else str(text or "").encode()
        except (binascii.Error, TypeError, ValueError):
            raise ClusterError(f"{where}: data.{name} is not base64") from None
        if b"-----BEGIN " not in pem:
            raise ClusterError(f"{where}: data.{name} is missing or not PEM")
        pems[name] = pem
    return TlsSecret(meta, pems["tls.crt"], pems["tls.key"])


def build_state(objects: Iterable[Mapping[str, Any]]) -> ClusterState:
    """Build a snapshot; later objects with the same kind/namespace/name replace earlier ones."""
    namespaces: dict[str, Namespace] = {}
    nodes: dict[str, Node] = {}
    pods: dict[tuple[str, str], Pod] = {}
    services: dict[tuple[str, str], Service] = {}
    policies: dict[str, PolicyObject] = {}
    gateways: dict[tuple[str, str], Gateway] = {}
    routes: dict[str, RouteObject] = {}
    secrets: dict[tuple[str, str], TlsSecret] = {}
    raw_objects: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for raw in objects:
        o = parse_object(raw)
        ns = o.meta.namespace if not isinstance(o, Namespace | Node) else ""
        if isinstance(o, TlsSecret):
            secrets[(ns, o.meta.name)] = o  # parsed, and kept out of raw_objects
            continue
        raw_objects[(str(raw.get("kind")), ns, o.meta.name)] = raw
        if isinstance(o, RouteObject):
            routes[o.key] = o
        elif isinstance(o, Namespace):
            namespaces[o.name] = o
        elif isinstance(o, Node):
            nodes[o.name] = o
        elif isinstance(o, Pod):
            pods[(o.namespace, o.name)] = o
        elif isinstance(o, Service):
            services[(o.meta.namespace, o.meta.name)] = o
        elif isinstance(o, Gateway):
            gateways[(o.meta.namespace, o.meta.name)] = o
        else:
            policies[o.key] = o
    return ClusterState(namespaces, nodes, pods, services, tuple(policies.values()), gateways, raw_objects,
                        tuple(routes.values()), secrets)
