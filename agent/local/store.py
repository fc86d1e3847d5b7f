"""The local cluster's objects on disk: one YAML file per object under <state>/cluster/.

This directory is what the agent, the CA and the ztunnels follow through
`local:<state>/cluster`. Writes are atomic (temp file + rename; the temp name
does not end in .yaml so readers never see half a file), and every
read-modify-write holds an flock so `apply` and the supervisor (which records
pod phases) never lose each other's changes.
"""

from __future__ import annotations

import copy
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from agent.local import LocalError

Obj = dict[str, Any]


def object_key(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name); namespace '' for cluster-scoped kinds."""
    md = obj.get("metadata") or {}
    kind = str(obj.get("kind"))
    ns = "" if kind in ("Namespace", "Node") else str(md.get("namespace") or "default")
    return kind, ns, str(md.get("name"))


def describe(key: tuple[str, str, str]) -> str:
    kind, ns, name = key
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


class Store:
    def __init__(self, cluster_dir: Path, lock_path: Path) -> None:
        self.dir = cluster_dir
        self.lock_path = lock_path

    def path(self, key: tuple[str, str, str]) -> Path:
        kind, ns, name = key
        return self.dir / kind.lower() / f"{ns or '_'}.{name}.yaml"

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, key: tuple[str, str, str]) -> Obj | None:
        try:
            text = self.path(key).read_text()
        except FileNotFoundError:
            return None
        obj = yaml.safe_load(text)
        if not isinstance(obj, dict):
            raise LocalError(f"{self.path(key)}: not a mapping; delete the file or re-apply the object")
        return obj

    def list(self, kind: str | None = None) -> list[Obj]:
        out: list[Obj] = []
        if not self.dir.is_dir():
            return out
        dirs = [self.dir / kind.lower()] if kind else sorted(p for p in self.dir.iterdir() if p.is_dir())
        for d in dirs:
            if not d.is_dir():
                continue
            for f in sorted(d.glob("*.yaml")):
                obj = yaml.safe_load(f.read_text())
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def put(self, obj: Obj) -> None:
        p = self.path(object_key(obj))
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
        os.replace(tmp, p)

    def remove(self, key: tuple[str, str, str]) -> bool:
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def update(self, key: tuple[str, str, str], fn: Callable[[Obj], None]) -> Obj | None:
        """Apply `fn` to a copy of the object under the lock and write it back; None if it is gone."""
        with self.locked():
            obj = self.get(key)
            if obj is None:
                return None
            new = copy.deepcopy(obj)
            fn(new)
            self.put(new)
            return new
