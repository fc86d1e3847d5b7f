"""Where a Kubernetes pod lives on its node: cgroup v2 directory, network namespace, host veth.

Owns the path logic for the kubelet's cgroup layouts: the cgroup v2 mount
(unified at /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts), the
systemd driver (`kubepods.slice/kubepods-burstable.slice/
kubepods-burstable-pod<uid_with_underscores>.slice`) and the cgroupfs driver
(`kubepods/burstable/pod<uid>`), for the QoS classes Guaranteed (directly under
kubepods), Burstable and BestEffort. Layouts nested under another root (kind,
`--cgroup-root`) are found by a bounded search for the pod's directory, and as
a last resort from a container's scope (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
`docker-<id>.scope` or the bare id), whose parent is the pod.

`KubePodRuntime` implements `agent.runtime.PodRuntime` on a Kubernetes node
(the agent runs with hostPID, so a pod's netns is /proc/<pid>/ns/net of any
process in its cgroup).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeVar

from agent import cgroups
from agent import netns as nsops
from ambit.cluster import Pod

log = logging.getLogger("ambit.kubecgroup")

K = TypeVar("K")
V = TypeVar("V")

QOS_DIRS = {"guaranteed": "", "burstable": "burstable", "besteffort": "besteffort"}
CONTAINER_SCOPE_PREFIXES = ("cri-containerd-", "crio-", "docker-", "cri-o-", "containerd-")


def cgroup2_root(mountinfo: str | None = None) -> Path | None:
    """The cgroup v2 mount point from /proc/self/mountinfo text (unified or hybrid), or None."""
    try:
        return cgroups.find_root(mountinfo)
    except cgroups.CgroupError:
        return None


def normalize_uid(uid: str) -> str:
    """A pod uid in its dashed form (the systemd driver writes it with underscores)."""
    return uid.strip().lower().replace("_", "-")


def container_id(raw: str) -> str:
    """`containerd://abc…` -> `abc…` (the status field carries the runtime as a scheme)."""
    return raw.split("://", 1)[-1].strip()


def pod_cgroup_candidates(uid: str, qos_class: str = "") -> list[PurePosixPath]:
    """Relative paths (below the cgroup2 root) where the kubelet puts this pod, most likely first."""
    dashed = normalize_uid(uid)
    under = dashed.replace("-", "_")
    qos = qos_class.strip().lower()
    levels = [qos] if qos in QOS_DIRS else ["burstable", "besteffort", "guaranteed"]
    out: list[PurePosixPath] = []
    for level in levels:
        sub = QOS_DIRS[level]
        if sub:
            out.append(PurePosixPath(f"kubepods.slice/kubepods-{sub}.slice/kubepods-{sub}-pod{under}.slice"))
            out.append(PurePosixPath(f"kubepods/{sub}/pod{dashed}"))
        else:
            out.append(PurePosixPath(f"kubepods.slice/kubepods-pod{under}.slice"))
            out.append(PurePosixPath(f"kubepods/pod{dashed}"))
    return out


def is_pod_dir(name: str, uid: str) -> bool:
    """True when a cgroup directory name is the pod `uid`'s (either driver, any prefix)."""
    dashed = normalize_uid(uid)
    if name == f"pod{dashed}":
        return True
    return name.endswith(".slice") and name[: -len(".slice")].endswith(f"pod{dashed.replace('-', '_')}")


def is_container_dir(name: str, cid: str) -> bool:
    if not cid:
        return False
    if name == cid:
        return True
    stem = name.removesuffix(".scope")
    return any(stem == f"{p}{cid}" for p in CONTAINER_SCOPE_PREFIXES)


def _walk(root: Path, max_depth: int, limit: int = 20000) -> Iterable[tuple[Path, int]]:
    """Breadth-first directories below root (bounded: the tree of a busy node is large)."""
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    seen = 0
    while queue:
        d, depth = queue.popleft()
        if depth >= max_depth:
            continue
        try:
            entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for e in entries:
            seen += 1
            if seen > limit:
                return
            p = Path(e.path)
            yield p, depth + 1
            queue.append((p, depth + 1))


def find_pod_cgroup(
    root: Path,
    uid: str,
    qos_class: str = "",
    container_ids: Sequence[str] = (),
    max_depth: int = 6,
) -> Path | None:
    """The pod's cgroup v2 directory below `root`, or None while it does not exist."""
    if not uid and not container_ids:
        return None
    if uid:
        for rel in pod_cgroup_candidates(uid, qos_class):
            p = root / rel
            if p.is_dir():
                return p
    ids = [container_id(c) for c in container_ids if container_id(c)]
    for p, _depth in _walk(root, max_depth):
        if uid and is_pod_dir(p.name, uid):
            return p
        if any(is_container_dir(p.name, c) for c in ids):
            return p.parent
    return None


def first_pid(cgroup: Path) -> int | None:
    """A process in the cgroup or below it (every process of a pod shares its netns)."""
    for d in [cgroup, *(p for p, _ in _walk(cgroup, 3))]:
        try:
            for line in (d / "cgroup.procs").read_text().split():
                if line.strip().isdigit():
                    return int(line)
        except OSError:
            continue
    return None


class KubePodRuntime:
    """`PodRuntime` on a Kubernetes node; needs hostPID and the host's /sys/fs/cgroup mounted.

    `node_addresses` are the Node's InternalIP/ExternalIP, whose interfaces face the
    fabric; without them the interfaces of the default routes are used.
    """

    def __init__(
        self,
        cgroup_root: Path | None = None,
        proc: Path = Path("/proc"),
        node_addresses: Sequence[str] = (),
    ) -> None:
        root = cgroup_root or cgroup2_root()
        if root is None:
            from agent import AgentError

            raise AgentError("no cgroup v2 mount found: ambit needs cgroup v2 (unified or hybrid /sys/fs/cgroup/unified)")
        self.cgroup_root = root
        self.proc = proc
        self.node_addresses = list(node_addresses)
        # The agent asks for every pod on every reconcile pass; a pod's cgroup and
        # veth do not move while it lives, so found answers are kept (checked with
        # one stat / ioctl on reuse) instead of searching the cgroup tree or
        # opening a netlink socket per pod per pass. Misses are not kept.
        self._cgroups: dict[str, Path] = {}
        self._veths: dict[tuple[str, str], str] = {}

    def cgroup_path(self, pod: Pod) -> Path | None:
        uid = pod.meta.uid
        known = self._cgroups.get(uid) if uid else None
        if known is not None and known.is_dir():
            return known
        found = find_pod_cgroup(self.cgroup_root, uid, pod.qos_class, pod.container_ids)
        if uid and found is not None:
            _remember(self._cgroups, uid, found)
        return found

    def netns_path(self, pod: Pod) -> Path | None:
        cg = self.cgroup_path(pod)
        pid = first_pid(cg) if cg else None
        if pid is None:
            return None
        p = self.proc / str(pid) / "ns" / "net"
        return p if p.exists() else None

    def host_interface(self, pod: Pod) -> str | None:
        # The node's route to the pod IP leaves through the pod's veth on routed
        # CNIs (Calico, Cilium, kindnet); bridge CNIs answer with the bridge.
        if not pod.ip:
            return None
        key = (pod.meta.uid, pod.ip)
        known = self._veths.get(key)
        if known is not None:
            try:
                socket.if_nametoindex(known)  # still there (a recreated sandbox gets a new veth)
                return known
            except OSError:
                del self._veths[key]
        name = nsops.route_interface(pod.ip)
        if name is not None:
            _remember(self._veths, key, name)
        return name

    def node_interfaces(self) -> list[str]:
        return nsops.interfaces_facing(self.node_addresses)


def _remember(cache: dict[K, V], key: K, value: V, limit: int = 4096) -> None:
    # Entries of deleted pods are never asked for again; a node runs a few hundred
    # pods at most, so starting over past `limit` bounds the cache without tracking deletions.
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
