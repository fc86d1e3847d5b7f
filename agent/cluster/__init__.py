"""Cluster state: Kubernetes-shaped objects (model) and where they come from (sources).

The model is pure (no I/O); sources read a directory of YAML (`local:PATH`) or,
later, the Kubernetes API. The agent, the CA and a stand-alone ztunnel all read
the cluster through the `ClusterSource` interface.
"""

from __future__ import annotations

from agent import AgentError


class ClusterError(AgentError):
    """A cluster object or source is invalid; the message names the object and field."""
