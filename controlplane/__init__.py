"""The control plane: the cluster CA that issues X.509-SVIDs to ztunnels."""

from __future__ import annotations

from ambit import AmbitError


class ControlPlaneError(AmbitError):
    """Base of every control-plane error; the message says what and what to do."""
