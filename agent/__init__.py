"""The ambit node agent: cluster-state sources, enrollment, the eBPF loader,
network-namespace and cgroup handling, the flow table and the `ambit` CLI."""

from __future__ import annotations

from ambit import AmbitError


class AgentError(AmbitError):
    """Base of every error the agent raises; the message says what and what to do."""
