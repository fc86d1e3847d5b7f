"""Judging one request head, for either protocol: the engine's checks, then the glue's decision.

In order: the head's size and its number of fields (431); Content-Length beside
Transfer-Encoding (400, the request-smuggling shape); more than one Authorization field
(400: ambiguous credentials, which a JWT check and the application could read two
ways); CONNECT and Upgrade (501; an `h2c` upgrade offer
is ignored, RFC 9110 7.8 allows it); the authority (400 unless host[:port]);
the target (400 with the reason from waypoint.paths; HTTP/2 :path must be
origin-form or "*"); a request that names no authority (400, unless the glue
gave one); then `Hooks.decide`, whose exception or malformed verdict is a 500
(fail closed), and whose denial (or local answer) is answered as it says; last,
a declared Content-Length over the verdict's `max_request_body` (413).

A glue that must wait for its decision (an external authorizer) returns an
awaitable from `decide`: `admit` then returns `Deciding`, which the protocol
awaits with `settle` (HTTP/2 in a task of its own, holding the request's body
unacknowledged meanwhile), with the same checks on the verdict it yields.

`admit` fills the request's record as it goes (authority, path, request,
verdict, failure), so a refused request is reported as far as it was read.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from http import HTTPStatus

from waypoint.exchange import Failure, Hooks, HttpVersion, Limits, Request, RequestRecord, Verdict
from waypoint.headers import RawHeaders, header_value, text_headers
from waypoint.paths import PathError, Target, check_authority, parse_target

log = logging.getLogger("ambit.waypoint.admission")


@dataclass(frozen=True)
class Head:
    """A request head as received. `authority` is Host or :authority ("" when none);
    `headers` are the regular fields; `size` as the protocol counts it."""

    method: str
    target: str
    authority: str
    scheme: str
    headers: RawHeaders
    protocol: HttpVersion
    size: int
    stream_id: int | None = None
    has_body: bool = False  # a body may follow (HTTP/2: HEADERS without END_STREAM)


@dataclass(frozen=True)
class Admitted:
    request: Request
    verdict: Verdict
    target: Target


@dataclass(frozen=True)
class Refused:
    """Answer it here: `status` with `body` and `headers` (a denial, or an engine check)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Deciding:
    """The glue is still deciding (`Hooks.decide` returned an awaitable): `settle` it."""

    head: Head
    request: Request
    target: Target
    verdict: Awaitable[Verdict]


def admit(head: Head, hooks: Hooks, limits: Limits, record: RequestRecord) -> Admitted | Refused | Deciding:
    """Check a request head and ask the glue; see the module docstring."""
    record.method = head.method
    record.authority = head.authority
    if head.size > limits.max_header_bytes:
        return _refuse(record, 431, Failure.HEADERS_TOO_LARGE,
                       f"request head of {head.size} bytes over {limits.max_header_bytes}")
    if len(head.headers) > limits.max_header_count:
        return _refuse(record, 431, Failure.HEADERS_TOO_LARGE,
                       f"{len(head.headers)} header fields, over {limits.max_header_count}")
    if header_value(head.headers, b"transfer-encoding") is not None and (
        header_value(head.headers, b"content-length") is not None
    ):
        return _refuse(record, 400, Failure.BAD_REQUEST,
                       "both Content-Length and Transfer-Encoding")
    if sum(1 for n, _ in head.headers if n.lower() == b"authorization") > 1:
        # which credential counts? a JWT check and the application could each take another
        return _refuse(record, 400, Failure.BAD_REQUEST, "more than one Authorization header")
    if head.method == "CONNECT":
        return _refuse(record, 501, Failure.NOT_IMPLEMENTED, "CONNECT is not proxied by the waypoint")
    upgrade = header_value(head.headers, b"upgrade")
    if upgrade is not None and {t.strip().lower() for t in upgrade.split(b",") if t.strip()} - {b"h2c"}:
        return _refuse(record, 501, Failure.NOT_IMPLEMENTED,
                       f"Upgrade to {upgrade.decode('ascii', 'replace')!r} is not proxied")
    try:
        check_authority(head.authority)
        target = parse_target(head.target, head.method)
        if head.protocol == "HTTP/2" and target.form == "absolute":
            raise PathError(f":path {head.target!r} must be origin-form in HTTP/2")
    except PathError as e:
        return _refuse(record, 400, Failure.BAD_REQUEST, str(e))
    record.path = target.path
    authority = target.authority or head.authority or hooks.authority
    if not authority:
        return _refuse(record, 400, Failure.BAD_REQUEST, "no Host header and no authority to route by")
    record.authority = authority
    request = Request(
        method=head.method,
        scheme=target.scheme or head.scheme,
        authority=authority,
        target=head.target,
        path=target.path,
        query=target.query,
        headers=text_headers(head.headers),
        protocol=head.protocol,
        stream_id=head.stream_id,
        has_body=head.has_body,
    )
    record.request = request
    try:
        verdict = hooks.decide(request)
    except Exception as e:
        return _decide_failed(record, head, target, e)
    if inspect.isawaitable(verdict):
        return Deciding(head, request, target, verdict)
    return _judge(head, request, target, verdict, record)


async def settle(deciding: Deciding, record: RequestRecord) -> Admitted | Refused:
    """Wait for the glue's verdict and judge it as `admit` judges one it is given at once."""
    try:
        verdict = await deciding.verdict
    except Exception as e:
        return _decide_failed(record, deciding.head, deciding.target, e)
    return _judge(deciding.head, deciding.request, deciding.target, verdict, record)


def _decide_failed(record: RequestRecord, head: Head, target: Target, e: Exception) -> Refused:
    log.error("decide failed for %s %s", head.method, target.path, exc_info=e)
    record.fail(Failure.DECIDE_ERROR, f"decide failed: {e}")
    return Refused(500, local_body(500))


def _judge(head: Head, request: Request, target: Target, verdict: object, record: RequestRecord) -> Admitted | Refused:
    try:
        if not isinstance(verdict, Verdict):
            raise TypeError(f"decide returned {type(verdict).__name__}, not a Verdict")
        verdict.check()
    except Exception as e:
        return _decide_failed(record, head, target, e)
    record.verdict = verdict
    if not verdict.allowed:
        return Refused(verdict.status, verdict.body, verdict.response_headers)
    if verdict.max_request_body is not None:
        declared = declared_length(head.headers)
        if declared is not None and declared > verdict.max_request_body:
            return _refuse(record, 413, Failure.BODY_TOO_LARGE,
                           f"a body of {declared} bytes, over {verdict.max_request_body}")
    return Admitted(request, verdict, target)


def declared_length(headers: RawHeaders) -> int | None:
    """The Content-Length a head declares (None: none, or not a number: the parser's business)."""
    value = header_value(headers, b"content-length")
    if value is None:
        return None
    try:
        return int(value.split(b",")[0])
    except ValueError:
        return None


def _refuse(record: RequestRecord, status: int, failure: Failure, detail: str) -> Refused:
    record.fail(failure, detail)
    return Refused(status, local_body(status, detail))


def reason(status: int) -> str:
    """The reason phrase of a status ("" when unknown)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def local_body(status: int, detail: str = "") -> bytes:
    """The body of a response the waypoint makes itself: the status, and for a client error
    what was wrong with the request (never internals for 5xx)."""
    text = f"{status} {reason(status)}".strip()
    if detail and 400 <= status < 500:
        text += f": {detail}"
    return (text + "\n").encode("utf-8", "replace")
