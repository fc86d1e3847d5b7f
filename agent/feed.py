"""The agent's live feed of its node's compiled snapshot to the node's ztunnel.

Serves `ambit.feed.v1.StateFeed/Watch` over gRPC on a unix socket: the whole
snapshot first, then only the parts that changed (ambit.wire.snapshot cuts it
into objects). The agent compiled every policy in it once; the ztunnel decodes
and never compiles again, so both enforce the same last good version of every
object. This wire (ambit/wire/feed.proto) is the whole contract.
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

from ambit.snapshot import Snapshot
from ambit.wire import feed_pb2, feed_pb2_grpc
from ambit.wire.snapshot import encode_snapshot

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
                snap = self._server.snapshot
                objects = self._server.objects
                if version == 0:
                    yield encode_update(1, True, objects, sorted(objects), [])
                    version = 1
                else:
                    upserts, removals = diff_objects(sent, objects)
                    if upserts or removals:
                        version += 1
                        yield encode_update(version, False, objects, upserts, removals)
                sent = objects
                await self._server.wait_for_change(snap)
        finally:
            self._server.subscribers -= 1
            log.info("ztunnel of node %s left the state feed", peer)


class FeedServer:
    """Serves the node's snapshot to its ztunnel on `unix:<socket_path>`; the agent publishes."""

    def __init__(self, socket_path: Path, node: str, snapshot: Snapshot) -> None:
        self.socket_path = Path(socket_path)
        self.node = node
        self.snapshot = snapshot
        self.objects = encode_snapshot(snapshot)  # encoded once per snapshot, for every subscriber
        self.subscribers = 0
        self._changed = asyncio.Condition()
        self._server: grpc.aio.Server | None = None

    async def wait_for_change(self, seen: Snapshot) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.snapshot is not seen)

    async def publish(self, snapshot: Snapshot) -> None:
        objects = encode_snapshot(snapshot)
        async with self._changed:
            self.snapshot, self.objects = snapshot, objects
            self._changed.notify_all()

    async def start(self) -> None:
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
        log.info("serving the snapshot feed on unix:%s", self.socket_path)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
