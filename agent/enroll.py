"""Enrollment planning: what the node's pods should look like in the datapath,
what they look like now, and the ordered actions that close the gap.

Pure: `plan()` takes two snapshots and returns actions; the agent (agentd)
gathers the snapshots and executes the actions. Running the plan on its own
result yields no actions (idempotent). Ordering keeps the no-plaintext rule:
on enrollment the settings are written, then the programs attached, then the
pod annotated; on unenrollment the `enrolled` flag is cleared first (effect
stops at once), then programs detached, settings forgotten, annotation removed.

The actual state outlives the agent (pinned maps, attached programs), so a
restarted agent first `adopt`s what the kernel holds for the node's pods, and
every pass forgets `orphans`: kernel entries of pods that no longer exist
(deleted while no agent ran, or while one was killed mid-pass). A stale entry
would otherwise keep an address enrolled that a new pod may be given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.runtime import REDIRECTION_ENABLED

# What the kernel does with plaintext TCP into an enrolled pod (or one of its ports): STRICT
# drops it, PERMISSIVE sends it through the ztunnel's 15006. PeerAuthentication's DISABLE is
# PERMISSIVE here (agentd.kernel_mode): ambient mesh traffic is never unencrypted.
KernelMode = Literal["PERMISSIVE", "STRICT"]
PortModes = tuple[tuple[int, KernelMode], ...]  # (port, mode) where the port differs (portLevelMtls)


@dataclass(frozen=True)
class Desired:
    """A pod of this node as the cluster wants it."""

    key: str  # ns/name
    ip: str | None
    cgroup: Path | None  # None: the runtime has not created it yet
    enrolled: bool
    mode: KernelMode = "PERMISSIVE"
    port_modes: PortModes = ()
    port_exceptions: tuple[int, ...] = ()
    annotated: bool = False  # the pod already carries ambit.dev/redirection=enabled


@dataclass(frozen=True)
class Actual:
    """A pod as the agent last set it up in the datapath."""

    key: str
    cgroup: Path
    cgroup_ids: tuple[int, ...]
    ip: str | None
    attached: bool
    enrolled: bool
    mode: KernelMode
    port_exceptions: tuple[int, ...]
    port_modes: PortModes = ()


@dataclass(frozen=True)
class WriteSettings:
    key: str
    cgroup: Path
    ip: str | None
    enrolled: bool
    mode: KernelMode
    port_exceptions: tuple[int, ...]
    port_modes: PortModes = ()


@dataclass(frozen=True)
class Attach:
    key: str
    cgroup: Path


@dataclass(frozen=True)
class Detach:
    key: str
    cgroup: Path


@dataclass(frozen=True)
class Forget:
    """Remove the pod's map entries (cgroup ids and IP)."""

    key: str
    cgroup_ids: tuple[int, ...]
    ip: str | None


@dataclass(frozen=True)
class Annotate:
    key: str
    value: str | None  # None removes the annotation


@dataclass(frozen=True)
class Retry:
    """Cannot act yet (no cgroup or IP); the agent tries again on its next pass."""

    key: str
    reason: str


Action = WriteSettings | Attach | Detach | Forget | Annotate | Retry


def plan(desired: Mapping[str, Desired], actual: Mapping[str, Actual]) -> list[Action]:
    """The ordered actions that turn `actual` into `desired` (pods keyed by ns/name)."""
    out: list[Action] = []
    for key in sorted(set(desired) | set(actual)):
        d, a = desired.get(key), actual.get(key)
        if d is not None and d.enrolled:
            out.extend(_enroll(d, a))
        else:
            out.extend(_unenroll(key, a, d))
    return out


def _enroll(d: Desired, a: Actual | None) -> list[Action]:
    if d.cgroup is None:
        return [Retry(d.key, "the pod's cgroup does not exist yet")]
    out: list[Action] = []
    if a is not None and a.cgroup != d.cgroup:
        # the pod was recreated under another cgroup: set up the new one first, then drop the old
        out.extend(_enroll(d, None))
        out.extend([Detach(a.key, a.cgroup), Forget(a.key, a.cgroup_ids, a.ip if a.ip != d.ip else None)])
        return out
    want = (d.ip, True, d.mode, d.port_exceptions, d.port_modes)
    have = (a.ip, a.enrolled, a.mode, a.port_exceptions, a.port_modes) if a is not None else None
    if have != want:
        out.append(WriteSettings(d.key, d.cgroup, d.ip, True, d.mode, d.port_exceptions, d.port_modes))
        if a is not None and a.ip and a.ip != d.ip:
            out.append(Forget(d.key, (), a.ip))
    if a is None or not a.attached:
        out.append(Attach(d.key, d.cgroup))
    if d.ip is None:
        # outbound redirection works without an IP; inbound capture (TC, keyed by IP) waits for it
        out.append(Retry(d.key, "the pod has no IP yet: inbound capture waits for it"))
    elif not d.annotated:
        out.append(Annotate(d.key, REDIRECTION_ENABLED))
    return out


def _unenroll(key: str, a: Actual | None, d: Desired | None) -> list[Action]:
    out: list[Action] = []
    if a is not None:
        if a.enrolled:
            out.append(WriteSettings(key, a.cgroup, a.ip, False, a.mode, a.port_exceptions, a.port_modes))
        if a.attached:
            out.append(Detach(key, a.cgroup))
        out.append(Forget(key, a.cgroup_ids, a.ip))
    if d is not None and d.annotated:
        out.append(Annotate(key, None))
    return out


@dataclass(frozen=True)
class KernelPod:
    """What the kernel maps hold for one pod cgroup (written by this agent or an earlier one)."""

    cgroup_id: int
    enrolled: bool
    mode: KernelMode
    port_exceptions: tuple[int, ...]
    ip: str | None
    port_modes: PortModes
    attached: bool


def adopt(desired: Mapping[str, Desired], cgroup_ids: Mapping[str, int],
          kernel: Mapping[int, KernelPod]) -> dict[str, Actual]:
    """The actual state of the node's pods as the kernel holds it: what a restarted agent
    starts from, so that `plan` unenrolls a pod whose label went while no agent ran."""
    out: dict[str, Actual] = {}
    for key, d in desired.items():
        cid = cgroup_ids.get(key)
        k = kernel.get(cid) if cid is not None else None
        if d.cgroup is None or k is None:
            continue
        out[key] = Actual(key=key, cgroup=d.cgroup, cgroup_ids=(k.cgroup_id,), ip=k.ip, attached=k.attached,
                          enrolled=k.enrolled, mode=k.mode, port_exceptions=k.port_exceptions,
                          port_modes=k.port_modes)
    return out


def orphans(actual: Mapping[str, Actual], kernel_cgroup_ids: Iterable[int],
            kernel_ips: Mapping[str, int]) -> list[Forget]:
    """Kernel entries that belong to no pod the agent knows: forget them."""
    known_ids = {cid for a in actual.values() for cid in a.cgroup_ids}
    known_ips = {a.ip for a in actual.values() if a.ip}
    out = [Forget(f"orphan/cgroup-{cid}", (cid,), None) for cid in sorted(set(kernel_cgroup_ids) - known_ids)]
    # an address alone: its cgroup may be a known pod's whose address changed
    out += [Forget(f"orphan/{ip}", (), ip) for ip in sorted(set(kernel_ips) - known_ips)]
    return out
