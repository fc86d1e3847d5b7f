"""The ztunnel's side of the agent's live feed: a StateSource over gRPC on a unix socket.

Applies the agent's full snapshot and then its changes to a local copy of the
snapshot's parts, decodes the compiled `Snapshot` (nothing is validated or
compiled again: the agent did that once, for the ztunnel and the kernel alike)
and publishes it to the StateStore. Losing the agent never stops the ztunnel:
the last snapshot stays in force while it reconnects with jittered exponential
backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from ambit.snapshot import Snapshot
from ambit.wire import feed_pb2, feed_pb2_grpc
from ambit.wire.snapshot import WireError, decode_snapshot

log = logging.getLogger("ambit.ztunnel.feed")

ObjectKey = tuple[str, str, str]


class FeedProtocolError(Exception):
    """The agent sent something the ztunnel cannot apply (a delta before a snapshot, bad JSON)."""


def apply_update(
    objects: dict[ObjectKey, dict[str, Any]], update: feed_pb2.StateUpdate, have_snapshot: bool
) -> dict[ObjectKey, dict[str, Any]]:
    """Pure: the objects after `update`. A delta without a prior snapshot is an error."""
    if not update.full and not have_snapshot:
        raise FeedProtocolError("the agent sent a change before a full snapshot")
    out: dict[ObjectKey, dict[str, Any]] = {} if update.full else dict(objects)
    for r in update.upserts:
        key = (r.key.kind, r.key.namespace, r.key.name)
        try:
            obj = json.loads(r.json)
        except ValueError as e:
            raise FeedProtocolError(f"object {'/'.join(key)} is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise FeedProtocolError(f"object {'/'.join(key)} is not a JSON object")
        out[key] = obj
    for k in update.removals:
        out.pop((k.kind, k.namespace, k.name), None)
    return out


class AgentFeedSource:
    """Feeds a StateStore-like sink from the node agent's StateFeed."""

    def __init__(
        self,
        socket_path: Path,
        node: str,
        *,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.node = node
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._rng = rng or random.Random()
        self.connected = False
        self.updates_applied = 0
        self.last_error: str | None = None
        self.description = f"agent-feed:unix:{self.socket_path}"

    async def run(self, store: Any) -> None:
        """Follow the feed forever, publishing each new snapshot to `store`."""
        await self.follow(store.publish)

    async def follow(self, sink: Callable[[Snapshot], Any]) -> None:
        delay = self.min_backoff
        objects: dict[ObjectKey, dict[str, Any]] = {}
        have_snapshot = False
        while True:
            try:
                async with grpc.aio.insecure_channel(f"unix:{self.socket_path}") as channel:
                    stub = feed_pb2_grpc.StateFeedStub(channel)
                    call = stub.Watch(feed_pb2.WatchRequest(node=self.node))
                    async for update in call:
                        objects = apply_update(objects, update, have_snapshot)
                        have_snapshot = True
                        snap = decode_snapshot(objects)
                        if snap.node != self.node:
                            raise WireError(f"the agent sent the snapshot of node {snap.node}, not {self.node}")
                        result = sink(snap)
                        if asyncio.iscoroutine(result):
                            await result
                        self.updates_applied += 1
                        if not self.connected:
                            log.info("following the agent's state feed on unix:%s", self.socket_path)
                        self.connected = True
                        self.last_error = None
                        delay = self.min_backoff
                    raise ConnectionResetError("the agent ended the feed")
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, FeedProtocolError, WireError, ConnectionResetError) as e:
                detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
                if isinstance(e, FeedProtocolError | WireError):
                    # Start over with a fresh snapshot on the next connection.
                    have_snapshot = False
                msg = (
                    f"state feed unix:{self.socket_path}: {detail}; keeping the last state "
                    f"and retrying in {delay:.1f}s (is the node agent running?)"
                )
                if self.connected or self.last_error != msg:
                    log.warning("%s", msg)
                self.connected = False
                self.last_error = msg
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(self.max_backoff, delay * 2)
