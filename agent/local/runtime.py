"""LocalPodRuntime: where a local-cluster pod lives on its node (agent.runtime.PodRuntime + PodAnnotator).

The agent of a local node gets `--runtime local:<state-dir>` and builds one of
these for its node. Every answer is derived from <state>/cluster.json (the
layout `up` wrote) and checked against the machine: a pod whose netns or
cgroup does not exist yet is answered with None.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from agent import netns as nsops
from agent.local import LocalError
from agent.local import layout as L
from agent.local.cluster import store_of
from agent.local.layout import Layout
from ambit.cluster import Pod


class LocalPodRuntime:
    """Pods of one node of a local cluster. Also answers where the node's ztunnel runs and listens."""

    def __init__(self, state_dir: Path, node: str) -> None:
        self.layout = Layout.load(Path(state_dir))
        self.node = self.layout.node(node)

    def _mine(self, pod: Pod) -> bool:
        return pod.node_name == self.node.name

    def cgroup_path(self, pod: Pod) -> Path | None:
        if not self._mine(pod):
            return None
        p = self.layout.pod_cgroup(self.node.name, pod.namespace, pod.name)
        return p if p.is_dir() else None

    def netns_path(self, pod: Pod) -> Path | None:
        if not self._mine(pod):
            return None
        p = nsops.netns_path(self.layout.pod_netns(pod.namespace, pod.name))
        return p if p.exists() else None

    def host_interface(self, pod: Pod) -> str | None:
        if not self._mine(pod) or self.netns_path(pod) is None:
            return None
        return L.host_veth_name(pod.namespace, pod.name)

    def node_interfaces(self) -> list[str]:
        return [L.NODE_UPLINK]

    # -- beyond the protocol: the node's own processes ------------------------
    def ztunnel_cgroup(self) -> Path:
        """The cgroup the supervisor runs this node's ztunnel in (for the getsockopt program)."""
        return self.layout.cgroup_base / self.node.name / "_ztunnel"

    def ztunnel_outbound(self) -> tuple[str, int]:
        """Where this node's ztunnel listens for redirected outbound traffic (the pods' gateway)."""
        return (self.node.gateway, 15001)

    def ztunnel_inbound_plaintext(self) -> tuple[str, int]:
        return (self.node.gateway, 15006)

    def ztunnel_addresses(self) -> list[str]:
        """Addresses the ztunnel talks to pods from: the pods' gateway and the node's fabric address."""
        return [self.node.gateway, self.node.address]

    # -- PodAnnotator ------------------------------------------------------------
    def set_annotation(self, pod: Pod, key: str, value: str | None) -> None:
        """Edit the pod's YAML in the cluster dir (under the store lock); raises LocalError if it is gone."""

        def fn(obj: dict[str, object]) -> None:
            md = obj.setdefault("metadata", {})
            assert isinstance(md, dict)
            ann = md.get("annotations") or {}
            if value is None:
                ann.pop(key, None)
            else:
                ann[key] = value
            if ann:
                md["annotations"] = ann
            else:
                md.pop("annotations", None)

        store = store_of(self.layout)
        current = store.get(("Pod", pod.namespace, pod.name))
        if current is None:
            raise LocalError(f"pod {pod.key} is gone; cannot set annotation {key}")
        if ((current.get("metadata") or {}).get("annotations") or {}).get(key) == value:
            return  # idempotent without rewriting the file (which would wake every watcher)
        if store.update(("Pod", pod.namespace, pod.name), fn) is None:
            raise LocalError(f"pod {pod.key} is gone; cannot set annotation {key}")


def _connector(ns: str, missing: str) -> Callable[[str, int, float], socket.socket]:
    if not nsops.exists(ns):
        raise LocalError(missing)

    def connect(host: str, port: int, timeout: float) -> socket.socket:
        return nsops.connect_in(ns, host, port, timeout)

    return connect


def node_connector(state_dir: Path, node: str) -> Callable[[str, int, float], socket.socket]:
    """connect(host, port, timeout) from inside `node`'s netns: reaches its 127.0.0.1 admin endpoints."""
    ns = Layout.load(Path(state_dir)).node(node).netns
    return _connector(ns, f"node {node} has no network namespace {ns}; is the cluster up?")


def pod_connector(state_dir: Path, namespace: str, name: str) -> Callable[[str, int, float], socket.socket]:
    """connect(host, port, timeout) from inside a pod's netns: reaches a waypoint's 127.0.0.1 admin."""
    ns = Layout.load(Path(state_dir)).pod_netns(namespace, name)
    return _connector(ns, f"pod {namespace}/{name} has no network namespace {ns}; is it running?")

