"""The per-node ztunnel: HBONE tunnelling, workload identities, L4 policy, admin and metrics."""

from __future__ import annotations

from ambit import AmbitError


class ZtunnelError(AmbitError):
    """Base of every error the ztunnel raises; the message says what and what to do."""
