"""The local cluster: nodes and pods as network namespaces and cgroups on this machine.

`layout` (pure naming and address plan), `store` (the cluster's YAML objects),
`cluster` (up, down, apply, delete, exec), `supervisor` (the per-cluster daemon
that runs node processes and pod commands), `runtime` (LocalPodRuntime for the
agent) and `cli` (`ambit local ...`).
"""

from __future__ import annotations

from agent import AgentError


class LocalError(AgentError):
    """A local-cluster command failed; the message names the object or step and what to do."""
