"""The ztunnel's current `Snapshot` and where it comes from.

`StateStore` holds the snapshot in force and wakes async readers when it is
replaced; a `StateSource` feeds it: the node agent's live feed (compiled
snapshots, see ztunnel.feed) or, for a stand-alone ztunnel, a cluster source
(`--cluster local:PATH`) compiled here by `LocalStateSource`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from ambit.cluster import ClusterState
from ambit.policy import DEFAULT_ROOT_NAMESPACE
from ambit.snapshot import Snapshot, build_snapshot
from ambit.sources import ClusterSource

log = logging.getLogger("ambit.ztunnel.state")


class StateStore:
    """Holds the current Snapshot and wakes readers when it changes.

    Use from one event loop: `apply`/`publish` are synchronous and cheap to call.
    """

    def __init__(
        self,
        node: str,
        *,
        trust_domain: str = "cluster.local",
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.node = node
        self.trust_domain = trust_domain
        self.root_namespace = root_namespace
        self._current = Snapshot.empty(node, trust_domain, root_namespace)
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def current(self) -> Snapshot:
        return self._current

    def apply(self, cluster: ClusterState) -> Snapshot:
        """Build the next snapshot from `cluster` (keeping last good policies) and publish it."""
        snap = build_snapshot(
            cluster,
            self.node,
            trust_domain=self.trust_domain,
            root_namespace=self.root_namespace,
            previous=self._current,
        )
        self.publish(snap)
        return snap

    def publish(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current and wake every reader of `updates()`."""
        old_errors = set(self._current.errors)
        for e in snapshot.errors:
            if e not in old_errors:
                log.error("policy/state error: %s", e)
        self._current = snapshot
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """End every `updates()` iterator."""
        self._closed = True
        self._changed.set()

    async def updates(self) -> AsyncIterator[Snapshot]:
        """Yield the current snapshot at once, then each newer one (a slow reader sees the latest)."""
        seen: Snapshot | None = None
        while not self._closed:
            snap = self._current
            if snap is not seen:
                seen = snap
                yield snap
                continue
            await self._changed.wait()


class StateSource(Protocol):
    """Feeds a StateStore until cancelled."""

    async def run(self, store: StateStore) -> None: ...


@dataclass
class LocalStateSource:
    """Feeds a StateStore from a ClusterSource (e.g. `local:<state>/cluster`)."""

    cluster_source: ClusterSource
    node: str
    trust_domain: str = "cluster.local"
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    interval: float = 0.25
    _last_error: str | None = field(default=None, repr=False)

    async def run(self, store: StateStore) -> None:
        async for cluster in self.cluster_source.changes(self.interval):
            err = self.cluster_source.last_error
            if err and err != self._last_error:
                log.error("%s: %s", self.cluster_source.description, err)
            self._last_error = err
            store.publish(
                build_snapshot(
                    cluster,
                    self.node,
                    trust_domain=self.trust_domain,
                    root_namespace=self.root_namespace,
                    previous=store.current,
                )
            )
