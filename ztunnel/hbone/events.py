"""Events the HBONE protocol objects return to the I/O layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectRequest:
    """Server side: a well-formed CONNECT arrived; answer it with respond()."""

    stream_id: int
    authority: str  # as sent: "10.0.0.1:80" or "[fd00::1]:80"
    host: str  # the IP, without brackets
    port: int
    forwarded_for: str | None  # the source IP from `forwarded: for=...`
    baggage: str | None
    traceparent: str | None


@dataclass(frozen=True)
class TunnelResponse:
    """Client side: the server answered our CONNECT (200 = tunnel open).

    After a non-200 answer the stream is finished; no more events follow for it.
    """

    stream_id: int
    status: int


@dataclass(frozen=True)
class StreamData:
    """Tunnel bytes arrived; call acknowledge_received() once they are consumed.

    `data` is bytes, or a read-only view of the immutable bytes that were passed to
    receive_data (a DATA frame's payload handed over without a copy, maybe in pieces
    as it arrives); either may be kept.
    """

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): no more data from it."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    """The stream was aborted (RST_STREAM from the peer, or refused on drain)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True)
class WindowOpened:
    """Flow-control credit arrived: retry send_data() on this stream (None = all streams)."""

    stream_id: int | None


@dataclass(frozen=True)
class ConnectionTerminated:
    """The connection is over; flush data_to_send() and close the socket."""

    error_code: int
    reason: str


@dataclass(frozen=True)
class RequestRejected:
    """Server side: a malformed request was already answered (400) and closed."""

    stream_id: int
    status: int
    reason: str


HboneEvent = (
    ConnectRequest
    | TunnelResponse
    | StreamData
    | StreamEnded
    | StreamReset
    | WindowOpened
    | ConnectionTerminated
    | RequestRejected
)
