"""cgroup v2: finding the unified hierarchy, creating and removing groups, moving and killing processes.

Works on pure v2 mounts (/sys/fs/cgroup) and on hybrid ones
(/sys/fs/cgroup/unified). No controllers are enabled: ambit only needs
cgroups as process sets (for BPF attachment and for killing a whole pod).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent import AgentError


class CgroupError(AgentError):
    """A cgroup v2 operation failed; the message names the cgroup directory."""


def _mountinfo() -> str:
    try:
        with open("/proc/self/mountinfo") as f:
            return f.read()
    except OSError as e:
        raise CgroupError(f"cannot read /proc/self/mountinfo to find the cgroup2 mount: {e}") from e


def find_root(mountinfo: str | None = None) -> Path:
    """The mount point of the cgroup2 hierarchy, from /proc/self/mountinfo text.

    Prefers /sys/fs/cgroup, then /sys/fs/cgroup/unified; otherwise the shortest
    cgroup2 mount point (a container may see several: its own and the host's,
    and the shortest is the host's top). This is the one finder the agent's
    other modules (BPF loader, Kubernetes runtime) call.
    """
    if mountinfo is None:
        mountinfo = _mountinfo()
    found: list[Path] = []
    for line in mountinfo.splitlines():
        # fields: id parent major:minor root mountpoint opts [optional...] - fstype source superopts
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        parts, rparts = left.split(), right.split()
        if len(parts) >= 5 and rparts and rparts[0] == "cgroup2":
            # mountinfo escapes a space in a path as \040
            found.append(Path(parts[4].replace("\\040", " ")))
    if not found:
        raise CgroupError("no cgroup2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    for preferred in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if preferred in found:
            return preferred
    return min(found, key=lambda p: len(p.parts))


def create(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e}") from e


def move(pid: int, path: Path) -> None:
    """Move process `pid` (0: the caller) into cgroup `path`."""
    try:
        (path / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        raise CgroupError(f"cannot move pid {pid} into cgroup {path}: {e}") from e


def procs(path: Path) -> list[int]:
    """Pids in `path` and every cgroup below it."""
    out: list[int] = []
    if not path.is_dir():
        return out
    for d, _dirs, _files in os.walk(path):
        try:
            text = (Path(d) / "cgroup.procs").read_text()
        except OSError:
            continue
        out.extend(int(x) for x in text.split())
    return out


def populated(path: Path) -> bool:
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "populated":
                return v.strip() == "1"
    except OSError:
        return False
    return bool(procs(path))


def kill(path: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process in `path` and below, and wait until they are gone."""
    if not path.is_dir():
        return
    killfile = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while populated(path):
        if killfile.exists():
            try:
                killfile.write_text("1")
            except OSError:
                pass
        else:  # kernels before 5.14 have no cgroup.kill
            for pid in procs(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            raise CgroupError(f"processes {procs(path)} in cgroup {path} did not die within {timeout}s")
        time.sleep(0.02)


def remove(path: Path, timeout: float = 5.0) -> None:
    """Kill everything in `path` and remove it with every cgroup below it. A missing one is fine."""
    if not path.is_dir():
        return
    kill(path, timeout)
    # Bottom-up: a cgroup with children cannot be removed.
    for d, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(Path(t[0]).parts)):
        last: OSError | None = None
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                # EBUSY right after the last process died: the kernel frees it asynchronously.
                last = e
                time.sleep(0.02)
        else:
            raise CgroupError(f"cannot remove cgroup {d}: {last}")
