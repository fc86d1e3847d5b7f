"""HBONE: HTTP/2 CONNECT tunnels, sans-IO, over the `h2` library.

This package owns the wire protocol between ztunnels (and waypoints): the
CONNECT request and response, HTTP/2 settings and flow control, keepalive
PINGs, graceful drain and the protections against frame floods. It never
touches sockets, TLS or asyncio: the I/O layer feeds received bytes in,
writes ``data_to_send()`` out and calls ``handle_timeout()`` at
``next_deadline()``.
"""

from __future__ import annotations

from ztunnel.hbone.config import HboneConfig, HboneError
from ztunnel.hbone.connection import HboneClient, HboneServer
from ztunnel.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    HboneEvent,
    RequestRejected,
    StreamData,
    StreamEnded,
    StreamReset,
    TunnelResponse,
    WindowOpened,
)
from ztunnel.hbone.wire import ErrorCode

__all__ = [
    "ConnectRequest",
    "ConnectionTerminated",
    "ErrorCode",
    "HboneClient",
    "HboneConfig",
    "HboneError",
    "HboneEvent",
    "HboneServer",
    "RequestRejected",
    "StreamData",
    "StreamEnded",
    "StreamReset",
    "TunnelResponse",
    "WindowOpened",
]
