"""The header rules both proxies share: what is per hop, what may be forwarded, the text view. Pure.

Headers travel as the bytes received (original case for HTTP/1); only the
`Request` view given to `decide` is text: names lower-cased, values decoded as
UTF-8 with `surrogateescape` (so no byte is lost and non-ASCII policy values
still match).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from waypoint.exchange import Verdict

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1: per-hop fields a proxy must not forward (plus the fields the
# Connection header names). Proxy-* are the waypoint's own business.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# fields a client may not make per-hop by naming them in Connection: framing and routing
_NOT_HOP_BY_HOP = frozenset({b"content-length", b"host"})
# never in trailers: they frame, route or authenticate the message (RFC 9110 6.5.1)
_NOT_IN_TRAILERS = frozenset({
    b"content-length", b"content-type", b"content-encoding", b"host", b"authorization",
    b"expect", b"max-forwards", b"cache-control", b"te", b"trailer", b"transfer-encoding",
    b"connection", b"keep-alive", b"upgrade", b"set-cookie",
})


def join_values(name: str, values: Iterable[str]) -> str:
    """One field's values as one (`name` lower-case): joined with ", " (RFC 9110 5.3), cookies
    with "; " (RFC 6265 5.4, as HTTP/2 splits them)."""
    return ("; " if name == "cookie" else ", ").join(values)


def joined(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """One value per (lower-case) name, as policy, JWT and routing checks see a request: a
    repeated field's values joined (`join_values`), as Envoy does, so what is checked is
    everything the application receives, not just one copy. Both proxies use this."""
    values: dict[str, list[str]] = {}
    for n, v in headers:
        values.setdefault(n, []).append(v)
    return {n: join_values(n, vs) for n, vs in values.items()}


def text_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The `Request.headers` view of received fields."""
    return [(n.decode("ascii", "surrogateescape").lower(), v.decode("utf-8", "surrogateescape"))
            for n, v in raw]


def encode_headers(headers: Iterable[tuple[str, str]]) -> RawHeaders:
    return [(n.lower().encode("ascii"), v.encode("utf-8", "surrogateescape")) for n, v in headers]


def connection_tokens(raw: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The lower-cased field names listed in Connection headers."""
    tokens: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def per_hop(raw: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Every lower-cased name in `raw` that must not be forwarded."""
    return HOP_BY_HOP | (connection_tokens(raw) - _NOT_HOP_BY_HOP)


def forwardable(
    raw: Sequence[tuple[bytes, bytes]],
    *,
    drop: Iterable[bytes] = (),
    keep_te_trailers: bool = False,
) -> RawHeaders:
    """`raw` without its per-hop fields and the lower-cased names in `drop`.

    `keep_te_trailers`: keep "te: trailers" (HTTP/2 allows exactly that one, and
    gRPC needs it to reach the server).
    """
    gone = per_hop(raw) | frozenset(drop)
    out: RawHeaders = []
    for name, value in raw:
        low = name.lower()
        if low in gone:
            if keep_te_trailers and low == b"te" and value.strip().lower() == b"trailers":
                out.append((name, value))
            continue
        out.append((name, value))
    return out


def rewrite_request(raw: Sequence[tuple[bytes, bytes]], verdict: Verdict,
                    *, drop: Iterable[bytes] = (), keep_te_trailers: bool = False) -> RawHeaders:
    """The fields to forward: per-hop and `drop` removed, then the verdict applied."""
    removed = {n.encode("ascii") for n in verdict.remove_headers} | set(drop)
    out = forwardable(raw, drop=removed, keep_te_trailers=keep_te_trailers)
    out.extend(encode_headers(verdict.add_headers))
    return out


def edit_response(raw: RawHeaders, verdict: Verdict | None) -> RawHeaders:
    """A relayed response's fields with the verdict's response edits applied."""
    if verdict is None or not (verdict.remove_response_headers or verdict.add_response_headers):
        return raw
    gone = {n.encode("ascii") for n in verdict.remove_response_headers}
    out = [(n, v) for n, v in raw if n.lower() not in gone]
    out.extend(encode_headers(verdict.add_response_headers))
    return out


def forwardable_trailers(raw: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
    """Trailer fields that may be forwarded (no framing, routing or per-hop fields)."""
    return [(n, v) for n, v in forwardable(raw) if n.lower() not in _NOT_IN_TRAILERS]


def header_value(raw: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a field (name lower-case), or None."""
    for n, v in raw:
        if n.lower() == name:
            return v
    return None
