"""What the HTTP engine and its glue exchange. Pure.

The engine hands the glue a `Request` and takes back a `Verdict` (`Hooks.decide`,
synchronous, or an awaitable of one when the glue must wait); it asks for the destination's byte stream with
`Hooks.open_upstream` on the first allowed request (or, for a verdict that names
its own `Upstream`, with that upstream's opener: a gateway routes each request on
its own); it reports every request, allowed or not, once, as a `RequestRecord`
(`Hooks.on_request`) when it ends.

Headers travel as the bytes received (original case for HTTP/1); only the
`Request` view given to `decide` is text (waypoint.headers.text_headers).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from waypoint import WaypointError
from waypoint.headers import HOP_BY_HOP, join_values

if TYPE_CHECKING:
    from waypoint.streams import ByteStream

KIB = 1024
MIB = 1024 * KIB

HttpVersion = Literal["HTTP/1.0", "HTTP/1.1", "HTTP/2"]
DENIED_BODY = b"RBAC: access denied"

_BAD_VALUE = frozenset("\r\n\x00")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VISIBLE = re.compile(r"[\x21-\x7e]+")
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{1,5})?")


class Failure(enum.StrEnum):
    """Why a request did not end as a normal exchange (the glue maps these to response flags)."""

    BAD_REQUEST = "bad_request"  # malformed HTTP or a refused path: 400
    HEADERS_TOO_LARGE = "headers_too_large"  # 431
    NOT_IMPLEMENTED = "not_implemented"  # CONNECT, Upgrade: 501
    DECIDE_ERROR = "decide_error"  # the decide hook raised or returned garbage: 500
    BODY_TOO_LARGE = "body_too_large"  # the request body is over the verdict's limit: 413
    UPSTREAM_TIMEOUT = "upstream_timeout"  # no response head within the verdict's timeout: 504
    UPSTREAM_CONNECT = "upstream_connect"  # open_upstream failed: 503
    UPSTREAM_RESET = "upstream_reset"  # the upstream reset or closed mid-exchange
    UPSTREAM_PROTOCOL = "upstream_protocol"  # the upstream spoke malformed HTTP: 502
    CLIENT_RESET = "client_reset"  # the client reset or closed mid-exchange
    CLIENT_PROTOCOL = "client_protocol"  # the client broke HTTP mid-request (after its head)


@dataclass(frozen=True)
class Request:
    """One request as policy sees it.

    `path` is normalized (waypoint.paths), `query` kept aside (None when the
    target had no "?"); `target` is the raw request-target or :path.
    `authority` comes from the absolute-form target, :authority or Host.
    `has_body`: a body may follow the head (HTTP/1: a length over 0 or a transfer coding;
    HTTP/2: HEADERS without END_STREAM, whatever the fields say).
    """

    method: str
    scheme: str
    authority: str
    target: str
    path: str
    query: str | None
    headers: list[tuple[str, str]]
    protocol: HttpVersion
    stream_id: int | None = None
    has_body: bool = False

    def header(self, name: str) -> str | None:
        """The values of a header joined (waypoint.headers.join_values: ", ", cookies "; "),
        None when absent; `name` any case."""
        name = name.lower()
        values = [v for n, v in self.headers if n == name]
        return join_values(name, values) if values else None


@dataclass(frozen=True)
class Upstream:
    """Where an allowed request goes when not to the connection's default upstream
    (`Hooks.open_upstream`): requests with equal `key`s share an upstream connection,
    and a request whose key differs from the open connection's gets a new one."""

    key: Hashable
    open: Callable[[], Awaitable[ByteStream]] = field(compare=False)


@dataclass(frozen=True)
class Retry:
    """Send a request without a body again (HTTP/1): when its upstream cannot be opened, is
    reset before answering, or answers one of `statuses`; at most `attempts` more times,
    `backoff` seconds apart. Each attempt opens a new upstream connection."""

    attempts: int
    statuses: frozenset[int] = frozenset()
    backoff: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """The glue's decision on one request.

    Allowed: the request is forwarded with the fields named in `remove_headers`
    removed, then `add_headers` appended (to replace a field, name it in both);
    to `upstream` (None: the connection's default), with `target` (an origin-form
    path and query) and `authority` instead of the request's when set (a URL
    rewrite). Its response is relayed with
    `remove_response_headers` removed and `add_response_headers` appended; a request
    body over `max_request_body` bytes gets 413, no response head within `timeout`
    seconds 504, and `retry` says when to send it again.
    Denied: the engine answers `status` with `body` (text/plain) and
    `response_headers` itself. `local` answers are the glue's own responses (a
    redirect, a CORS preflight), with any final status. `context` comes back in the
    RequestRecord.
    """

    allowed: bool
    status: int = 403
    body: bytes = DENIED_BODY
    response_headers: tuple[tuple[str, str], ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: frozenset[str] = frozenset()
    context: object = None
    upstream: Upstream | None = None
    add_response_headers: tuple[tuple[str, str], ...] = ()
    remove_response_headers: frozenset[str] = frozenset()
    max_request_body: int | None = None
    timeout: float | None = None
    retry: Retry | None = None
    local: bool = False
    target: str | None = None
    authority: str | None = None

    @classmethod
    def allow(
        cls,
        add_headers: Iterable[tuple[str, str]] = (),
        remove_headers: Iterable[str] = (),
        context: object = None,
        *,
        upstream: Upstream | None = None,
        add_response_headers: Iterable[tuple[str, str]] = (),
        remove_response_headers: Iterable[str] = (),
        max_request_body: int | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        target: str | None = None,
        authority: str | None = None,
    ) -> Verdict:
        return cls(True, 200, b"", (), tuple(add_headers),
                   frozenset(n.lower() for n in remove_headers), context, upstream,
                   tuple(add_response_headers), frozenset(n.lower() for n in remove_response_headers),
                   max_request_body, timeout, retry, target=target, authority=authority)

    @classmethod
    def respond(
        cls,
        status: int,
        body: bytes = b"",
        response_headers: Iterable[tuple[str, str]] = (),
        context: object = None,
    ) -> Verdict:
        """The glue answers the request itself (any final status: 204, 301, 404...)."""
        return cls(False, status, body, tuple(response_headers), (), frozenset(), context, local=True)

    @classmethod
    def deny(
        cls,
        status: int = 403,
        body: bytes = DENIED_BODY,
        response_headers: Iterable[tuple[str, str]] = (),
        context: object = None,
    ) -> Verdict:
        return cls(False, status, body, tuple(response_headers), (), frozenset(), context)

    def check(self) -> None:
        """Raise WaypointError when the verdict cannot be put on the wire as given."""
        if not self.allowed and not self.local and not 400 <= self.status <= 599:
            raise WaypointError(f"Verdict: a denial needs a 4xx/5xx status, not {self.status}")
        if self.local and not 200 <= self.status <= 599:
            raise WaypointError(f"Verdict: a local answer needs a final status, not {self.status}")
        if self.max_request_body is not None and self.max_request_body < 0:
            raise WaypointError(f"Verdict.max_request_body={self.max_request_body}: must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise WaypointError(f"Verdict.timeout={self.timeout}: must be > 0")
        if self.target is not None and not (self.target.startswith("/") and _VISIBLE.fullmatch(self.target)):
            raise WaypointError(f"Verdict.target {self.target!r}: must be origin-form, visible ASCII")
        if self.authority is not None and not _AUTHORITY.fullmatch(self.authority):
            raise WaypointError(f"Verdict.authority {self.authority!r}: must be host[:port]")
        if self.retry is not None and (self.retry.attempts < 0 or self.retry.backoff < 0):
            raise WaypointError(f"Verdict.retry={self.retry}: attempts and backoff must be >= 0")
        for where, headers, refused in (
            ("add_headers", self.add_headers, HOP_BY_HOP),
            ("response_headers", self.response_headers, HOP_BY_HOP | {b"content-length"}),
            ("add_response_headers", self.add_response_headers, HOP_BY_HOP | {b"content-length"}),
        ):
            for name, value in headers:
                if not _TOKEN.fullmatch(name):
                    raise WaypointError(f"Verdict.{where}: invalid header name {name!r}")
                if _BAD_VALUE & set(value):
                    raise WaypointError(
                        f"Verdict.{where}: header {name!r} has CR, LF or NUL in its value"
                    )
                if name.lower().encode("ascii") in refused:
                    raise WaypointError(
                        f"Verdict.{where}: {name!r} is per-hop or framing, set by the waypoint"
                    )


@dataclass
class RequestRecord:
    """One request, reported once when it ends (allowed, denied or failed).

    `status` is what the client got (0: no response reached it); byte counts
    are body bytes (request: received from the client; response: sent to it);
    `start`/`end` come from the hooks' clock. `failure` says why it did not end
    as a normal exchange, `detail` in words.
    """

    protocol: HttpVersion
    start: float
    method: str = ""
    authority: str = ""
    path: str = ""
    status: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    end: float = 0.0
    request: Request | None = None
    verdict: Verdict | None = None
    failure: Failure | None = None
    detail: str = ""
    stream_id: int | None = None
    forwarded: bool = False  # the request went to the upstream

    @property
    def context(self) -> object:
        return None if self.verdict is None else self.verdict.context

    def fail(self, failure: Failure, detail: str) -> None:
        """Keep the first failure: later ones are consequences of it."""
        if self.failure is None:
            self.failure = failure
            self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Sizes the engine enforces. Header sizes count names and values (HTTP/2: RFC 9113's
    32 bytes of overhead per field; HTTP/1: the request line and CRLFs)."""

    max_header_bytes: int = 64 * KIB  # a request head beyond this: 431
    max_header_count: int = 100  # more request header fields than this: 431 (Envoy's default)
    max_response_header_bytes: int = 64 * KIB  # an upstream response head beyond: 502
    drain_limit: int = MIB  # request body read and discarded after a refusal, at most
    read_size: int = 64 * KIB
    h2_max_concurrent_streams: int = 100
    h2_stream_window: int = 256 * KIB
    h2_connection_window: int = MIB
    h2_closed_streams_kept: int = 1024
    # flood limits per 10 s (the ztunnel's FloodGuard counts them): RST_STREAM from a client
    # (rapid reset), and DATA/CONTINUATION frames under 32 bytes (gRPC streams many small ones)
    h2_max_resets: int = 1000
    h2_max_small_frames: int = 100_000
    # HTTP/1: a client's next request head must arrive, whole, within this many seconds of the
    # engine starting to wait for it (one deadline per head, not per read; an idle keep-alive
    # connection is closed, a head sent too slowly gets 408). HTTP/2: a connection without an
    # open stream for this long is closed, a request body that stops for this long gets 408
    # (waypoint.http2). None: no limit
    head_timeout: float | None = None

    @property
    def h2_header_cap(self) -> int:
        """The HPACK decoder's hard limit (advertised as SETTINGS_MAX_HEADER_LIST_SIZE):
        beyond it the connection ends; between max_header_bytes and it, the stream gets 431."""
        return 4 * max(self.max_header_bytes, self.max_response_header_bytes)

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_header_count", "max_response_header_bytes", "read_size",
                     "h2_max_concurrent_streams", "h2_closed_streams_kept", "h2_max_resets",
                     "h2_max_small_frames"):
            if getattr(self, name) < 1:
                raise WaypointError(f"Limits.{name}={getattr(self, name)}: must be at least 1")
        if self.head_timeout is not None and self.head_timeout <= 0:
            raise WaypointError(f"Limits.head_timeout={self.head_timeout}: must be > 0 (or None)")
        if self.drain_limit < 0:
            raise WaypointError(f"Limits.drain_limit={self.drain_limit}: must be >= 0")
        for name in ("h2_stream_window", "h2_connection_window"):
            if not 65_535 <= getattr(self, name) <= 2**31 - 1:
                raise WaypointError(
                    f"Limits.{name}={getattr(self, name)}: an HTTP/2 window is 64 KiB..2 GiB"
                )


@dataclass(frozen=True)
class Hooks:
    """The glue's side of one downstream connection.

    `authority` is the destination's (the HBONE CONNECT's), used for a request
    that names none (HTTP/1.0 without Host); empty: such a request gets 400.
    """

    # a Verdict, or an awaitable of one when the glue must wait (e.g. an external authorizer)
    decide: Callable[[Request], Verdict | Awaitable[Verdict]]
    open_upstream: Callable[[], Awaitable[ByteStream]]
    on_request: Callable[[RequestRecord], None]
    clock: Callable[[], float] = time.monotonic
    authority: str = ""
