"""Workload identity: SPIFFE IDs, X.509-SVID verification, certificates and the CA client.

Pure parts (`spiffe`, `svid`) import no I/O; `manager`, `caclient` and `tls`
do the work that touches keys, sockets and the CA.
"""

from __future__ import annotations

from ztunnel import ZtunnelError


class IdentityError(ZtunnelError):
    """Base of every identity error: bad SPIFFE ID, rejected SVID, CA failure, no certificate."""
