"""Where cluster state comes from: the `ClusterSource` interface and its sources.

`local:PATH` reads a directory of Kubernetes-shaped YAML (multi-document files
allowed) and follows its changes. A directory that stops parsing keeps the last
good state in force and reports why in `last_error`. `kubernetes` (list+watch of
the API server) plugs in behind the same interface.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from ambit.cluster import ClusterError, ClusterState, build_state, load_documents

log = logging.getLogger("ambit.cluster")

SUFFIXES = (".yaml", ".yml", ".json")


class ClusterSource(Protocol):
    """Cluster state as seen by the agent, the CA and a stand-alone ztunnel."""

    description: str

    @property
    def last_error(self) -> str | None:
        """Why the newest input was not taken (the last good state stays), or None."""
        ...

    def current(self) -> ClusterState:
        """The newest good state; cheap enough to call per request."""
        ...

    def changes(self, interval: float = 0.25) -> AsyncIterator[ClusterState]:
        """Yield the current state at once, then every new good state."""
        ...

    def close(self) -> None: ...


class LocalDirSource:
    """`local:PATH`: every *.yaml/*.yml/*.json below PATH, re-read when any of them changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = f"local:{self.path}"
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._state = ClusterState()
        self._last_error: str | None = None
        self._version = 0
        if not self.path.is_dir():
            raise ClusterError(f"cluster source {self.description}: {self.path} is not a directory")
        self._refresh()

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def version(self) -> int:
        """Increases each time a new good state is taken."""
        return self._version

    def _files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.suffix in SUFFIXES and p.is_file())

    def _sig(self, files: list[Path]) -> tuple[tuple[str, int, int], ...]:
        out = []
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            out.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _refresh(self) -> bool:
        """Re-read if anything changed; True when a new good state was taken."""
        with self._lock:
            files = self._files()
            sig = self._sig(files)
            if sig == self._signature:
                return False
            self._signature = sig
            objects = []
            try:
                for f in files:
                    try:
                        text = f.read_text()
                    except FileNotFoundError:
                        continue
                    objects.extend(load_documents(text, origin=str(f)))
                state = build_state(objects)
            except ClusterError as e:
                if self._last_error != str(e):
                    log.error("%s: keeping the last good state: %s", self.description, e)
                self._last_error = str(e)
                return False
            self._last_error = None
            self._state = state
            self._version += 1
            return True

    def current(self) -> ClusterState:
        self._refresh()
        return self._state

    async def changes(self, interval: float = 0.25) -> AsyncIterator[ClusterState]:
        self._refresh()
        seen = self._version
        yield self._state
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self._refresh)
            if self._version != seen:
                seen = self._version
                yield self._state

    def close(self) -> None:
        pass


def open_source(spec: str, **kube: Any) -> ClusterSource:
    """Open a source by its flag value: `local:PATH` or `kubernetes`. `kube`: what a process
    reads of the Kubernetes API (KubernetesSource's `resources`, `gateway_namespace`); the
    local directory holds everything already."""
    if spec.startswith("local:"):
        return LocalDirSource(spec.removeprefix("local:"))
    if spec == "kubernetes" or spec.startswith("kubernetes:"):
        from ambit.sources.kube import KubernetesSource

        return KubernetesSource.from_spec(spec, **kube)
    raise ClusterError(f"unknown cluster source {spec!r}; use local:PATH or kubernetes")
