"""The agent's live feed of cluster state to its node's ztunnel.

Serves `ambit.feed.v1.StateFeed/Watch` over gRPC on a unix socket: a full
snapshot first, then only what changed. The agent never imports ztunnel
internals; this wire (ztunnel/proto/feed.proto) is the whole contract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from ambit.cluster import ClusterState
from ambit.sources import ClusterSource
from ambit.wire import feed_pb2, feed_pb2_grpc

log = logging.getLogger("ambit.agent.feed")

ObjectKey = tuple[str, str, str]


def diff_objects(
    old: Mapping[ObjectKey, Mapping[str, Any]], new: Mapping[ObjectKey, Mapping[str, Any]]
) -> tuple[list[ObjectKey], list[ObjectKey]]:
    """What changed from `old` to `new`: (keys to upsert, keys to remove), each sorted."""
    upserts = sorted(k for k, v in new.items() if old.get(k) != v)
    removals = sorted(k for k in old if k not in new)
    return upserts, removals


def encode_update(
    version: int,
    full: bool,
    objects: Mapping[ObjectKey, Mapping[str, Any]],
    upserts: list[ObjectKey],
    removals: list[ObjectKey],
) -> feed_pb2.StateUpdate:
    def key(k: ObjectKey) -> feed_pb2.ResourceKey:
        return feed_pb2.ResourceKey(kind=k[0], namespace=k[1], name=k[2])

    return feed_pb2.StateUpdate(
        version=version,
        full=full,
        upserts=[
            feed_pb2.Resource(key=key(k), json=json.dumps(objects[k], sort_keys=True).encode())
            for k in upserts
        ],
        removals=[key(k) for k in removals],
    )


class _Servicer(feed_pb2_grpc.StateFeedServicer):  # type: ignore[misc]
    def __init__(self, server: FeedServer) -> None:
        self._server = server

    async def Watch(
        self, request: feed_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[feed_pb2.StateUpdate]:
        peer = request.node or "?"
        if request.node and request.node != self._server.node:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this agent serves node {self._server.node}, not {request.node}: "
                "is the ztunnel pointed at the wrong agent socket?",
            )
        log.info("ztunnel of node %s subscribed to the state feed", peer)
        self._server.subscribers += 1
        try:
            sent: Mapping[ObjectKey, Mapping[str, Any]] = {}
            version = 0
            while True:
                state = self._server.state
                objects = state.objects
                if version == 0:
                    yield encode_update(1, True, objects, sorted(objects), [])
                    version = 1
                else:
                    upserts, removals = diff_objects(sent, objects)
                    if upserts or removals:
                        version += 1
                        yield encode_update(version, False, objects, upserts, removals)
                sent = objects
                await self._server.wait_for_change(state)
        finally:
            self._server.subscribers -= 1
            log.info("ztunnel of node %s left the state feed", peer)


class FeedServer:
    """Follows a ClusterSource and serves its state to ztunnels on `unix:<socket_path>`."""

    def __init__(self, source: ClusterSource, socket_path: Path, node: str) -> None:
        self.source = source
        self.socket_path = Path(socket_path)
        self.node = node
        self.state: ClusterState = source.current()
        self.subscribers = 0
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self._follow: asyncio.Task[None] | None = None

    async def wait_for_change(self, seen: ClusterState) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.state is not seen)

    async def publish(self, state: ClusterState) -> None:
        async with self._changed:
            self.state = state
            self._changed.notify_all()

    async def _follow_source(self) -> None:
        async for state in self.source.changes():
            await self.publish(state)

    async def start(self, follow: bool = True) -> None:
        """Serve; with `follow`, publish the source's states itself (else the owner calls publish)."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            # A socket left by a previous agent of this node; nothing else binds here.
            self.socket_path.unlink()
        server = grpc.aio.server()
        feed_pb2_grpc.add_StateFeedServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        await server.start()
        os.chmod(self.socket_path, 0o600)
        self._server = server
        if follow:
            self._follow = asyncio.create_task(self._follow_source(), name="feed-follow-source")
        log.info("serving the state feed on unix:%s", self.socket_path)

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            try:
                await self._follow
            except asyncio.CancelledError:
                pass
            self._follow = None
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
