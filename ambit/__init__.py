"""ambit's shared core: what every process (agent, ztunnel, waypoint, CA, CLI) builds on.

Pure modules (no sockets, files, processes or clocks of their own):
  cluster   the Kubernetes-shaped cluster model (`ClusterState`)
  policy    Istio's security policies: compile (validate), index, decide
  snapshot  a node's compiled view: workloads, services, policies, mTLS modes
  spiffe    SPIFFE IDs; svid: X.509-SVID verification
  wire      the wire schemas: the agent's snapshot feed, the CA's messages
  args      argument types and the user-facing error of every command line
  peers     who is on the other end of an HBONE connection (trusting `forwarded`)
Shared I/O, never imported by the pure modules:
  sources   where cluster state comes from (a local directory, the Kubernetes API)
  http      the small HTTP server and client of every admin, metrics and readiness endpoint
  tasks     named, owned background tasks
  lastgood  the last good compiled policies on disk, across restarts

The processes import this package and never each other (the `ambit` CLI entry
point excepted); this package imports none of them. `make test` checks both.
"""

from __future__ import annotations


class AmbitError(Exception):
    """Base of every error ambit raises; each package derives its own. Messages say what was
    wrong, with which object or field, and what to do."""
