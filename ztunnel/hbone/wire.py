"""The HBONE request on the wire: CONNECT headers built and checked, pure functions.

A request is `:method CONNECT`, `:authority <ip>:<port>` (IPv6 in brackets),
`forwarded: for=<source ip>` (RFC 7239; IPv6 quoted and bracketed) and the
optional `baggage` and `traceparent`. `:path`, `:scheme` and `:protocol` are
not allowed (this is not an extended CONNECT).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from h2.errors import ErrorCodes

from ztunnel.hbone.config import HboneError

ErrorCode = ErrorCodes
"""HTTP/2 error codes (RFC 9113 section 7), re-exported so callers need not import h2."""

Header = tuple[bytes, bytes]

# RFC 9113 8.2.2: connection-specific fields are malformed in HTTP/2.
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_ALLOWED_PSEUDO = frozenset({b":method", b":authority"})
_FORBIDDEN_VALUE_BYTES = (b"\x00", b"\r", b"\n")


class BadRequest(HboneError):
    """A CONNECT request that the server answers with 400; the message says why."""


@dataclass(frozen=True)
class ConnectTarget:
    """A parsed CONNECT request: destination and the optional metadata headers."""

    authority: str
    host: str
    port: int
    forwarded_for: str | None
    baggage: str | None
    traceparent: str | None


def parse_authority(authority: str) -> tuple[str, int]:
    """Split `1.2.3.4:80` / `[fd00::1]:80` into (ip, port); raise BadRequest when not an IP:port."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1 : close + 2] != ":":
            raise BadRequest(f":authority {authority!r}: expected [IPv6]:port")
        host, port_text = authority[1:close], authority[close + 2 :]
        version = 6
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            raise BadRequest(f":authority {authority!r}: missing :port")
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(
            f":authority {authority!r}: host must be a pod IP address, not {host!r}"
        ) from None
    if ip.version != version:
        raise BadRequest(f":authority {authority!r}: IPv6 addresses must be in brackets")
    if not port_text.isdigit() or not port_text.isascii() or not 0 < int(port_text) < 65536:
        raise BadRequest(f":authority {authority!r}: port must be 1..65535")
    return str(ip), int(port_text)


def format_authority(host: str, port: int) -> str:
    """`host:port`, bracketing IPv6; raise HboneError for a non-IP host or bad port."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise HboneError(f"HBONE destination {host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise HboneError(f"HBONE destination port {port} is not in 1..65535")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_forwarded(value: str) -> str | None:
    """The first `for=` IP of a Forwarded header (RFC 7239), or None when it has none.

    Accepts `for=1.2.3.4`, `for="1.2.3.4:5"`, `for="[fd00::1]"`, `for="[fd00::1]:5"`
    and extra parameters/elements; raises BadRequest for a `for=` that is not an IP.
    """
    first_element = value.split(",", 1)[0]
    for pair in first_element.split(";"):
        key, sep, raw = pair.strip().partition("=")
        if not sep or key.strip().lower() != "for":
            continue
        node = raw.strip()
        if len(node) >= 2 and node[0] == node[-1] == '"':
            node = node[1:-1]
        if node.startswith("["):
            close = node.find("]")
            if close < 0:
                raise BadRequest(f"forwarded {value!r}: unterminated [IPv6]")
            node = node[1:close]
        elif node.count(":") == 1:
            node = node.partition(":")[0]
        try:
            return str(ipaddress.ip_address(node))
        except ValueError:
            raise BadRequest(f"forwarded {value!r}: for={raw.strip()} is not an IP address") from None
    return None


def format_forwarded(ip: str) -> str:
    """`for=1.2.3.4` or `for="[fd00::1]"` (RFC 7239 quotes IPv6)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise HboneError(f"forwarded_for {ip!r} is not an IP address") from None
    return f'for="[{addr}]"' if addr.version == 6 else f"for={addr}"


def build_connect_headers(
    authority: str,
    forwarded_for: str | None,
    baggage: str | None,
    traceparent: str | None,
) -> list[Header]:
    """The header list of a CONNECT request; raise HboneError for values we could not send."""
    try:
        parse_authority(authority)
    except BadRequest as exc:
        raise HboneError(f"open_stream: {exc}") from None
    headers: list[Header] = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    if forwarded_for is not None:
        headers.append((b"forwarded", format_forwarded(forwarded_for).encode()))
    for name, value in ((b"baggage", baggage), (b"traceparent", traceparent)):
        if value is None:
            continue
        encoded = value.encode("ascii", "replace")
        if any(bad in encoded for bad in _FORBIDDEN_VALUE_BYTES):
            raise HboneError(f"open_stream: {name.decode()} contains CR, LF or NUL")
        headers.append((name, encoded))
    return headers


def header_list_size(headers: Iterable[Header]) -> int:
    """SETTINGS_MAX_HEADER_LIST_SIZE accounting: name + value + 32 per field (RFC 9113 6.5.2)."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


def parse_connect_request(headers: Sequence[Header]) -> ConnectTarget:
    """Check a received request's header list; raise BadRequest (-> 400) naming the problem.

    h2's own validation is off on the server so that a malformed request costs
    one stream (answered 400), not the whole pooled connection.
    """
    pseudo: dict[bytes, bytes] = {}
    regular: dict[bytes, bytes] = {}
    seen_regular = False
    for name, value in headers:
        if any(bad in value for bad in _FORBIDDEN_VALUE_BYTES) or value != value.strip(b" \t"):
            raise BadRequest(f"header {name!r}: value has CR/LF/NUL or surrounding whitespace")
        if name.startswith(b":"):
            if seen_regular:
                raise BadRequest(f"pseudo-header {name.decode('latin-1')} after regular headers")
            if name not in _ALLOWED_PSEUDO:
                raise BadRequest(
                    f"pseudo-header {name.decode('latin-1')} is not allowed in an HBONE CONNECT "
                    "(only :method and :authority)"
                )
            if name in pseudo:
                raise BadRequest(f"duplicate pseudo-header {name.decode('latin-1')}")
            pseudo[name] = value
            continue
        seen_regular = True
        if not name or name != name.lower() or not name.isascii():
            raise BadRequest(f"header name {name!r} must be lowercase ASCII")
        if name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
            raise BadRequest(f"connection-specific header {name.decode('latin-1')} is not allowed")
        regular.setdefault(name, value)
    method = pseudo.get(b":method")
    if method != b"CONNECT":
        shown = "missing" if method is None else repr(method.decode("latin-1"))
        raise BadRequest(f":method {shown}: HBONE accepts only CONNECT")
    raw_authority = pseudo.get(b":authority")
    if not raw_authority:
        raise BadRequest(":authority missing: expected <pod IP>:<port>")
    try:
        authority = raw_authority.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(f":authority {raw_authority!r}: not ASCII") from None
    host, port = parse_authority(authority)

    def text(name: bytes) -> str | None:
        value = regular.get(name)
        return None if value is None else value.decode("latin-1")

    forwarded = text(b"forwarded")
    return ConnectTarget(
        authority=authority,
        host=host,
        port=port,
        forwarded_for=None if forwarded is None else parse_forwarded(forwarded),
        baggage=text(b"baggage"),
        traceparent=text(b"traceparent"),
    )
