"""The agent -> ztunnel live feed over gRPC on a unix socket: the compiled snapshot, its
changes, an agent restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.feed import FeedServer, diff_objects
from ambit.cluster import build_state, load_documents
from ambit.snapshot import Snapshot, build_snapshot
from ambit.wire import feed_pb2
from ztunnel.feed import AgentFeedSource, FeedProtocolError, apply_update

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}\n"


def pod(name: str, ip: str, node: str = "node-a", labels: str = "{app: web}") -> str:
    return (
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {labels}}}\n"
        f"spec: {{nodeName: {node}, serviceAccountName: web}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )


STRICT = ("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
          "metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n")


def compiled(text: str, previous: Snapshot | None = None, node: str = "node-a") -> Snapshot:
    """What the agent builds and publishes for `node`."""
    return build_snapshot(build_state(load_documents(text)), node, previous=previous)


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
    sock = tmp_path / "agent.sock"
    seen: list[Snapshot] = []
    snap = compiled(NS + pod("web-0", "10.1.0.5") + STRICT)
    server = FeedServer(sock, "node-a", snap)
    await server.start()
    feed = AgentFeedSource(sock, "node-a", min_backoff=0.05, max_backoff=0.2)
    follower = asyncio.create_task(feed.follow(seen.append), name="test-feed")
    try:
        await until(lambda: bool(seen) and seen[-1].workload_by_ip("10.1.0.5") is not None)
        got = seen[-1]
        assert feed.connected and got.workload_by_ip("10.1.0.5").enrolled  # type: ignore[union-attr]
        # the compiled policies arrive as compiled, equal to the agent's
        assert got.policies == snap.policies and got.version == snap.version

        # a change: one pod added, the other relabelled out of the mesh; an invalid edit of the
        # PeerAuthentication keeps its last good version, and the ztunnel gets exactly that
        bad = STRICT.replace("mode: STRICT", "mode: STRCT")
        snap = compiled(NS + pod("web-0", "10.1.0.5", labels="{ambit.dev/dataplane-mode: none}")
                        + pod("web-1", "10.1.0.6") + bad, previous=snap)
        await server.publish(snap)
        await until(lambda: seen[-1].workload_by_ip("10.1.0.6") is not None)
        got = seen[-1]
        assert not got.workload_by_ip("10.1.0.5").enrolled  # type: ignore[union-attr]
        assert got.policies.by_key["PeerAuthentication/shop/strict"].mode == "STRICT"  # type: ignore[union-attr]
        assert got.errors == snap.errors and any("STRCT" in e for e in got.errors)

        # the agent goes away: the ztunnel keeps the last snapshot and reconnects
        await server.stop()
        await until(lambda: not feed.connected)
        assert seen[-1].workload_by_ip("10.1.0.6") is not None and feed.last_error
        server = FeedServer(sock, "node-a", compiled(NS + pod("web-1", "10.1.0.6")))
        await server.start()
        await until(lambda: feed.connected and seen[-1].workload_by_ip("10.1.0.5") is None)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await server.stop()
    assert not sock.exists()


async def test_wrong_node_is_refused(tmp_path: Path) -> None:
    server = FeedServer(tmp_path / "s.sock", "node-a", compiled(NS))
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
