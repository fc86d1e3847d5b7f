"""What the agent needs from the node's container runtime, as two small protocols.

`PodRuntime` answers where a pod lives on this node (its cgroup v2 directory,
its network namespace, the node-side end of its veth) and which interfaces face
the node fabric. `PodAnnotator` records the agent's verdict on a pod
(`ambit.dev/redirection: enabled`) where the cluster's users can see it.

The local cluster implements both in `agent.local.runtime` (`LocalPodRuntime`);
a Kubernetes runtime (CRI + API server) plugs in behind the same interfaces.
Pure: protocols and a parser for the `--runtime` flag, no I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from ambit.cluster import Pod

REDIRECTION_ENABLED = "enabled"


@runtime_checkable
class PodRuntime(Protocol):
    """Where a pod of this node lives. Every method returns None while it does not exist yet."""

    def cgroup_path(self, pod: Pod) -> Path | None:
        """The pod's cgroup v2 directory (every process of the pod is in it or below it)."""
        ...

    def netns_path(self, pod: Pod) -> Path | None:
        """A path whose open fd is the pod's network namespace (e.g. /run/netns/NAME)."""
        ...

    def host_interface(self, pod: Pod) -> str | None:
        """The node-side name of the pod's veth, in the node's network namespace."""
        ...

    def node_interfaces(self) -> list[str]:
        """The node's fabric-facing interfaces (where traffic from other nodes arrives)."""
        ...


@runtime_checkable
class PodAnnotator(Protocol):
    """Writes agent-owned annotations on pods (the local cluster edits the pod's YAML)."""

    def set_annotation(self, pod: Pod, key: str, value: str | None) -> None:
        """Set `key` to `value` on `pod`; None removes it. Idempotent; raises AgentError if the pod is gone."""
        ...


def parse_runtime_spec(spec: str) -> tuple[str, str]:
    """Split `KIND:ARG` (e.g. `local:/run/ambit/local`) into its parts; raises ValueError naming the problem."""
    kind, sep, arg = spec.partition(":")
    if not sep or not kind or not arg:
        raise ValueError(f"runtime {spec!r}: expected KIND:ARG, e.g. local:/run/ambit/local")
    return kind, arg
