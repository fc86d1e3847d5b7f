"""One proxied connection through the waypoint's HTTP engine: sniff it, then proxy it.

The glue calls `proxy(down, hooks)` with the client's byte stream; HTTP/1.x and
HTTP/2 (prior knowledge) are served until the connection ends. Opaque traffic
is handed back (`Sniffed.protocol == "opaque"`, with the bytes already read)
for the glue to refuse or pass through; the engine never touches it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from waypoint.exchange import Hooks, Limits
from waypoint.http1 import serve_http1
from waypoint.http2 import serve_http2
from waypoint.sniff import MAX_SNIFF, Sniffed, sniff
from waypoint.streams import ByteStream, StreamReset

__all__ = ["SniffResult", "Sniffed", "proxy", "sniff", "sniff_stream"]


@dataclass(frozen=True)
class SniffResult:
    """What a connection speaks, and the bytes read to tell (to replay; b"" at EOF)."""

    protocol: Sniffed
    prefix: bytes


async def sniff_stream(down: ByteStream, *, max_bytes: int = MAX_SNIFF, timeout: float | None = None) -> SniffResult:
    """Read from `down` until `sniff` can tell; EOF, a reset or `timeout` seconds before
    that is "opaque" (so a client that never speaks, or speaks slowly, is opaque: the glue
    must refuse opaque traffic wherever HTTP rules apply)."""
    prefix = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await down.read(max_bytes)
                except (StreamReset, OSError):
                    return SniffResult("opaque", prefix)
                if not data:
                    return SniffResult("opaque", prefix)
                prefix += data
                found = sniff(prefix)
                if found is not None:
                    return SniffResult(found, prefix)
                if len(prefix) >= max_bytes:
                    return SniffResult("opaque", prefix)
    except TimeoutError:
        return SniffResult("opaque", prefix)


async def proxy(down: ByteStream, hooks: Hooks, limits: Limits | None = None, *,
                sniff_timeout: float | None = None) -> SniffResult:
    """Sniff `down` (for at most `sniff_timeout` seconds) and serve it as HTTP/1.x or
    HTTP/2 until the connection ends.

    Returns what was sniffed. For "http1"/"http2" the engine has closed `down`
    when this returns; for "opaque" `down` is untouched beyond the prefix read.
    Never raises for bad input or a failed peer (cancellation propagates).
    """
    found = await sniff_stream(down, timeout=sniff_timeout)
    if found.protocol == "http1":
        await serve_http1(down, hooks, limits, prefix=found.prefix)
    elif found.protocol == "http2":
        await serve_http2(down, hooks, limits, prefix=found.prefix)
    return found
