"""KubePodRuntime's netlink lookups (read-only route and address queries in this namespace)."""

from __future__ import annotations

from pathlib import Path

from agent.cluster.model import Meta, Pod
from agent.kubecgroup import KubePodRuntime


def test_host_interface_and_node_interfaces_via_netlink(tmp_path: Path) -> None:
    rt = KubePodRuntime(cgroup_root=tmp_path, node_addresses=["127.0.0.1"])
    pod = Pod(Meta(name="p", namespace="n"), node_name="x", ip="127.0.0.1")
    assert rt.host_interface(pod) == "lo"  # the route to the pod IP leaves through this interface
    assert rt.host_interface(Pod(Meta(name="q", namespace="n"), node_name="x")) is None
    assert rt.node_interfaces() == ["lo"]
