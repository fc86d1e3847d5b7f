"""The agent -> ztunnel live feed over gRPC on a unix socket: snapshot, changes, agent restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.feed import FeedServer, diff_objects
from ambit.cluster import ClusterState
from ambit.sources import LocalDirSource
from ambit.wire import feed_pb2
from ztunnel.feed import AgentFeedSource, FeedProtocolError, apply_update

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}\n"


def pod(name: str, ip: str, node: str = "node-a", labels: str = "{app: web}") -> str:
    return (
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {labels}}}\n"
        f"spec: {{nodeName: {node}, serviceAccountName: web}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_diff_objects() -> None:
    old = {("Pod", "a", "x"): {"v": 1}, ("Pod", "a", "y"): {"v": 1}}
    new = {("Pod", "a", "x"): {"v": 2}, ("Pod", "a", "z"): {"v": 1}}
    assert diff_objects(old, new) == ([("Pod", "a", "x"), ("Pod", "a", "z")], [("Pod", "a", "y")])


def test_delta_before_snapshot_is_refused() -> None:
    with pytest.raises(FeedProtocolError, match="before a full snapshot"):
        apply_update({}, feed_pb2.StateUpdate(version=2, full=False), have_snapshot=False)


async def test_snapshot_then_changes_then_agent_restart(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    (cluster / "a.yaml").write_text(NS + pod("web-0", "10.1.0.5"))
    sock = tmp_path / "agent.sock"
    seen: list[ClusterState] = []

    server = FeedServer(LocalDirSource(cluster), sock, node="node-a")
    await server.start()
    feed = AgentFeedSource(sock, "node-a", min_backoff=0.05, max_backoff=0.2)
    follower = asyncio.create_task(feed.follow(seen.append), name="test-feed")
    try:
        await until(lambda: bool(seen) and ("shop", "web-0") in seen[-1].pods)
        assert feed.connected and seen[-1].is_enrolled(seen[-1].pods[("shop", "web-0")])

        # a change: one pod added, the other relabelled out of the mesh
        (cluster / "a.yaml").write_text(
            NS + pod("web-0", "10.1.0.5", labels="{ambit.dev/dataplane-mode: none}") + pod("web-1", "10.1.0.6")
        )
        await until(lambda: ("shop", "web-1") in seen[-1].pods)
        st = seen[-1]
        assert not st.is_enrolled(st.pods[("shop", "web-0")])

        # the agent goes away: the ztunnel keeps the last state and reconnects
        await server.stop()
        await until(lambda: not feed.connected)
        assert ("shop", "web-1") in seen[-1].pods and feed.last_error
        (cluster / "a.yaml").write_text(NS + pod("web-1", "10.1.0.6"))
        server = FeedServer(LocalDirSource(cluster), sock, node="node-a")
        await server.start()
        await until(lambda: feed.connected and ("shop", "web-0") not in seen[-1].pods)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await server.stop()
    assert not sock.exists()


async def test_wrong_node_is_refused(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    server = FeedServer(LocalDirSource(cluster), tmp_path / "s.sock", node="node-a")
    await server.start()
    feed = AgentFeedSource(tmp_path / "s.sock", "node-b", min_backoff=0.05)
    task = asyncio.create_task(feed.follow(lambda s: None), name="test-feed-wrong-node")
    try:
        await until(lambda: feed.last_error is not None)
        assert "serves node node-a, not node-b" in (feed.last_error or "")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()
