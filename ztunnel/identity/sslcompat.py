"""The one place that reaches into Python's private `_ssl`: the certificate chain the TLS peer sent.

`tls.peer_identity` wants the chain as the peer sent it, leaf first, so that
`verify_svid` builds and checks the path to the trust bundle itself,
independently of OpenSSL. Python 3.13 has it publicly
(`SSLObject`/`SSLSocket.get_unverified_chain()`, DER bytes); 3.10 to 3.12 only
on the private `_ssl._SSLSocket` behind them (`._sslobj`), as `_ssl.Certificate`
objects. Which one is used is decided once, by what exists: the public method
wherever it is, the private one only before 3.13 (checked on 3.11). Where
neither exists the chain is None, `tls` falls back to the leaf OpenSSL
verified, and that is logged once. tests/unit/test_sslcompat.py fails, saying
what to do, when a Python release changes this.
"""

from __future__ import annotations

import logging
import ssl
import sys
from typing import Any

__all__ = ["CHAIN_SOURCE", "peer_chain_der"]

log = logging.getLogger("ambit.identity")


def _chain_source() -> str:
    if callable(getattr(ssl.SSLObject, "get_unverified_chain", None)):
        return "public"
    if sys.version_info < (3, 13):
        try:
            import _ssl  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            return "none"
        if hasattr(_ssl, "ENCODING_DER") and callable(
            getattr(getattr(_ssl, "_SSLSocket", None), "get_unverified_chain", None)
        ):
            return "private"
    return "none"


# "public" (3.13+), "private" (3.10-3.12: _ssl) or "none"; tests set it too.
CHAIN_SOURCE = _chain_source()
_logged_none = False


def _private_chain(ssl_obj: Any) -> list[bytes] | None:
    import _ssl  # type: ignore[import-not-found,unused-ignore]

    inner = getattr(ssl_obj, "_sslobj", None)
    certs = None if inner is None else inner.get_unverified_chain()
    return None if certs is None else [c.public_bytes(_ssl.ENCODING_DER) for c in certs]


def peer_chain_der(ssl_obj: ssl.SSLObject | ssl.SSLSocket) -> list[bytes] | None:
    """The certificates the peer sent, leaf first, as DER; None where this Python cannot tell."""
    global _logged_none
    try:
        if CHAIN_SOURCE == "public":
            chain: list[bytes] | None = list(ssl_obj.get_unverified_chain())  # type: ignore[union-attr,unused-ignore]
        elif CHAIN_SOURCE == "private":
            chain = _private_chain(ssl_obj)
        else:
            if not _logged_none:
                _logged_none = True
                log.warning(
                    "Python %s gives no access to the certificate chain a TLS peer sent: peers "
                    "are checked by their leaf only (OpenSSL verified the path); adapt "
                    "ztunnel/identity/sslcompat.py", sys.version.split()[0],
                )
            return None
    except (ssl.SSLError, ValueError):
        return None
    return chain or None
