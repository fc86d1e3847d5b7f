"""KubePodRuntime's netlink lookups (read-only route and address queries in this namespace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.kubecgroup import KubePodRuntime
from ambit.cluster import Meta, Pod


def test_host_interface_and_node_interfaces_via_netlink(tmp_path: Path) -> None:
    rt = KubePodRuntime(cgroup_root=tmp_path, node_addresses=["127.0.0.1"])
    pod = Pod(Meta(name="p", namespace="n"), node_name="x", ip="127.0.0.1")
    assert rt.host_interface(pod) == "lo"  # the route to the pod IP leaves through this interface
    assert rt.host_interface(Pod(Meta(name="q", namespace="n"), node_name="x")) is None
    assert rt.node_interfaces() == ["lo"]


def test_host_interface_is_looked_up_once_per_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyroute2

    opened: list[int] = []
    real = pyroute2.IPRoute

    def counting(*args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("agent.netns.IPRoute", counting)
    rt = KubePodRuntime(cgroup_root=tmp_path)
    pod = Pod(Meta(name="p", namespace="n", uid="u1"), node_name="x", ip="127.0.0.1")
    assert [rt.host_interface(pod) for _ in range(3)] == ["lo", "lo", "lo"]
    assert len(opened) == 1
    moved = Pod(Meta(name="p", namespace="n", uid="u1"), node_name="x", ip="127.0.0.2")
    assert rt.host_interface(moved) == "lo" and len(opened) == 2  # a new IP is looked up again
