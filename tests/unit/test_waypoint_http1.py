"""The HTTP/1.x proxy (waypoint/http1.py) between a real h11 client and a real h11 server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.unit.test_waypoint_harness import (
    TIMEOUT,
    Glue,
    H1Client,
    Reply,
    Seen,
    echo,
    waypoint,
)
from waypoint.exchange import Failure, Limits, Request, Verdict
from waypoint.streams import LegStream, StreamReset

MIB = 1024 * 1024


def deny_admin(request: Request) -> Verdict:
    if request.path.startswith("/admin"):
        return Verdict.deny(context="denied")
    return Verdict.allow(context="allowed")


async def test_get_and_post_are_forwarded_with_bodies() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("GET", "/hello?x=1")
        assert (r.status, r.header("x-seen"), r.body) == (200, "GET /hello?x=1", b"")
        r = await c.request("POST", "/upload", [("content-type", "text/plain")], b"payload")
        assert (r.status, r.body) == (200, b"payload")
        r = await c.request("POST", "/chunked", body=[b"abc", b"def"], chunked=True)
        assert (r.status, r.body) == (200, b"abcdef")
    assert glue.opened == 1  # one upstream stream, reused for keep-alive requests
    assert [s.target for s in glue.seen] == ["/hello?x=1", "/upload", "/chunked"]
    assert glue.seen[1].header("content-length") == "7"
    assert glue.seen[2].header("transfer-encoding") == "chunked"
    assert glue.seen[2].body == b"abcdef"
    records = glue.records
    assert [(r.method, r.path, r.status) for r in records] == [
        ("GET", "/hello", 200), ("POST", "/upload", 200), ("POST", "/chunked", 200)]
    assert [(r.request_bytes, r.response_bytes) for r in records] == [(0, 0), (7, 7), (6, 6)]
    assert all(r.forwarded and r.failure is None and r.protocol == "HTTP/1.1" for r in records)
    assert all(r.end >= r.start for r in records)
    assert records[0].context == "/hello"


async def test_denied_request_gets_403_and_the_connection_goes_on() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("POST", "/admin/users", body=b"x" * 5000)
        assert r.status == 403
        assert r.body == b"RBAC: access denied"
        assert r.header("content-length") == str(len(b"RBAC: access denied"))
        assert r.header("connection") is None
        r = await c.request("GET", "/ok")
        assert r.status == 200
    assert [s.target for s in glue.seen] == ["/ok"]
    denied, allowed = glue.records
    assert (denied.status, denied.forwarded, denied.context, denied.request_bytes) == (
        403, False, "denied", 5000)
    assert denied.verdict is not None and not denied.verdict.allowed
    assert (allowed.status, allowed.context) == (200, "allowed")


async def test_denied_with_a_large_declared_body_closes_instead_of_draining() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        await c.send("POST", "/admin", [("content-length", str(2 * MIB))], end=False)
        r = await c.response()
        assert r.status == 403
        assert r.header("connection") == "close"
        assert await c.closed()


async def test_denied_chunked_body_over_the_drain_limit_closes() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue, Limits(drain_limit=10_000)) as (client, _, task):
        c = H1Client(client)
        await c.send("POST", "/admin", chunked=True, end=False)
        r = await c.response()
        assert r.status == 403
        for _ in range(5):
            await c.body(b"y" * 4000)
        assert await c.closed()
        await asyncio.wait_for(task, TIMEOUT)


async def test_custom_denial_status_body_and_headers() -> None:
    glue = Glue(decide=lambda r: Verdict.deny(401, b"jwt expired",
                                              [("www-authenticate", 'Bearer error="invalid_token"')]))
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/")
    assert (r.status, r.body) == (401, b"jwt expired")
    assert r.header("www-authenticate") == 'Bearer error="invalid_token"'
    assert glue.records[0].status == 401


async def test_malformed_request_gets_400_and_only_that_connection_closes() -> None:
    glue = Glue()
    async with waypoint(glue) as (bad, _, bad_task), waypoint(glue) as (good, _, _):
        bad.write(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
        data = await asyncio.wait_for(_read_all(bad), TIMEOUT)
        assert data.startswith(b"HTTP/1.1 400 ")
        assert b"connection: close" in data.lower()
        await asyncio.wait_for(bad_task, TIMEOUT)
        r = await H1Client(good).request("GET", "/fine")
        assert r.status == 200
    assert [(r.status, r.failure) for r in glue.records] == [
        (400, Failure.BAD_REQUEST), (200, None)]


@pytest.mark.parametrize(("target", "why"), [
    ("/a%2Fb", "encoded '/'"),
    ("/../etc/passwd", "climbs above the root"),
    ("/a\\b".replace("\\", "%5C"), "encoded backslash"),
])
async def test_refused_path_gets_400_naming_why(target: str, why: str) -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        r = await c.request("GET", target)
        assert r.status == 400
        assert why in r.body.decode()
        await asyncio.wait_for(task, TIMEOUT)
    assert glue.requests == []  # never reached policy
    assert glue.records[0].failure == Failure.BAD_REQUEST


async def test_policy_sees_the_normalized_path_and_upstream_gets_it_too() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        assert (await c.request("GET", "//admin")).status == 403
        assert (await c.request("GET", "/%61dmin")).status == 403
        assert (await c.request("GET", "/public/../admin")).status == 403
        r = await c.request("GET", "/a/./b/../c?q=%2F")
        assert r.status == 200
    assert [r.path for r in glue.requests] == ["/admin", "/admin", "/admin", "/a/c"]
    req = glue.requests[3]
    assert (req.target, req.query, req.protocol, req.scheme, req.authority) == (
        "/a/./b/../c?q=%2F", "q=%2F", "HTTP/1.1", "http", "svc.test")
    assert glue.seen[0].target == "/a/c?q=%2F"


async def test_absolute_form_target_routes_by_its_authority() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "http://other.ns:8080/x//y",
                                           [("Host", "ignored.example")])
        assert r.status == 200
    assert glue.requests[0].authority == "other.ns:8080"
    assert glue.seen[0].target == "/x/y"
    assert glue.seen[0].header("host") == "other.ns:8080"


async def test_bad_host_gets_400() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        client.write(b"GET / HTTP/1.1\r\nHost: evil.example@svc\r\n\r\n")
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"not host[:port]" in data
    assert glue.requests == []


async def test_idle_upstream_closed_by_the_server_is_replaced_for_an_idempotent_request() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        assert (await c.request("GET", "/one")).status == 200
        glue.upstreams[0][1].close()  # the server closes its idle keep-alive connection
        await asyncio.sleep(0)
        r = await c.request("GET", "/two")
        assert r.status == 200
        glue.upstreams[1][1].close()
        await asyncio.sleep(0)
        r = await c.request("POST", "/three", body=b"not safe to send twice")
        assert r.status == 502
    assert glue.opened == 2
    assert [(r.path, r.status, r.failure) for r in glue.records] == [
        ("/one", 200, None), ("/two", 200, None), ("/three", 502, Failure.UPSTREAM_RESET)]


async def test_request_head_over_the_limit_gets_431_and_close() -> None:
    glue = Glue()
    async with waypoint(glue, Limits(max_header_bytes=4096)) as (client, _, task):
        c = H1Client(client)
        await c.send("GET", "/", [("x-big", "a" * 5000)])
        r = await c.response()
        assert r.status == 431
        assert await c.closed()
        await asyncio.wait_for(task, TIMEOUT)
    assert glue.records[0].failure == Failure.HEADERS_TOO_LARGE


async def test_request_head_over_the_limit_in_small_pieces_gets_431() -> None:
    glue = Glue()
    async with waypoint(glue, Limits(max_header_bytes=4096)) as (client, _, task):
        client.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
        for _ in range(100):
            client.write(b"x-more: " + b"b" * 100 + b"\r\n")
            await client.drain()
            if task.done():
                break
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
        assert data.startswith(b"HTTP/1.1 431 ")
    assert glue.records[0].status == 431


async def test_pipelined_requests_are_answered_in_order() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        client.write(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /admin HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        c = H1Client(client)
        bodies = []
        for _ in range(4):
            c.expect_response()  # the requests went out as raw bytes above
            r = await c.response()
            bodies.append((r.status, r.body))
        assert bodies == [(200, b""), (403, b"RBAC: access denied"), (200, b"hi"), (200, b"")]
        assert await c.closed()
    assert [(r.path, r.status) for r in glue.records] == [
        ("/one", 200), ("/admin", 403), ("/two", 200), ("/three", 200)]


async def test_head_and_no_body_statuses() -> None:
    async def handler(seen: Seen) -> Reply:
        if seen.target == "/empty":
            return Reply(204, [])
        return Reply(200, [("content-length", "11")], [b"hello world"] if seen.method != "HEAD" else [])

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("HEAD", "/doc")
        assert (r.status, r.header("content-length"), r.body) == (200, "11", b"")
        r = await c.request("GET", "/empty")
        assert (r.status, r.body) == (204, b"")
        r = await c.request("GET", "/doc")
        assert r.body == b"hello world"


async def test_http10_client_gets_a_close_delimited_answer() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [], [b"part1-", b"part2"])  # no length: chunked upstream

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, task):
        client.write(b"GET /old HTTP/1.0\r\nHost: a\r\n\r\n")
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in data.lower()
    assert data.endswith(b"\r\n\r\npart1-part2")
    assert glue.records[0].protocol == "HTTP/1.0"
    assert glue.seen[0].version == "HTTP/1.1"


async def test_http10_without_host_uses_the_hooks_authority() -> None:
    glue = Glue()
    async with waypoint(glue, authority="10.0.0.7:80") as (client, _, _task):
        client.write(b"GET /x HTTP/1.0\r\n\r\n")
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert glue.requests[0].authority == "10.0.0.7:80"
    assert glue.seen[0].header("host") == "10.0.0.7:80"  # HTTP/1.1 upstream needs one


async def test_connection_close_from_the_client() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        r = await c.request("GET", "/", [("Connection", "close")])
        assert r.status == 200
        assert await c.closed()
        await asyncio.wait_for(task, TIMEOUT)
    assert glue.seen[0].header("connection") is None  # per hop: not forwarded


async def test_upstream_connection_close_is_reopened_for_the_next_request() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("connection", "close"), ("content-length", "2")], [b"ok"])

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        for _ in range(3):
            r = await c.request("GET", "/")
            assert (r.status, r.body, r.header("connection")) == (200, b"ok", None)
    assert glue.opened == 3


async def test_hop_by_hop_headers_are_not_forwarded_and_the_verdict_is_applied() -> None:
    def decide(request: Request) -> Verdict:
        return Verdict.allow(add_headers=[("x-forwarded-for", "10.1.1.1"), ("traceparent", "00-abc")],
                             remove_headers=["Authorization", "x-forwarded-for"])

    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("keep-alive", "timeout=5"), ("x-secret-hop", "1"),
                           ("connection", "x-secret-hop"), ("content-length", "0")])

    glue = Glue(decide=decide, handler=handler)
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/", [
            ("Connection", "keep-alive, X-Drop-Me"), ("X-Drop-Me", "1"), ("Keep-Alive", "300"),
            ("Proxy-Authorization", "Basic eA=="), ("TE", "trailers"), ("Upgrade", "h2c"),
            ("Authorization", "Bearer jwt"), ("X-Forwarded-For", "6.6.6.6"), ("X-Keep", "yes"),
        ])
        assert r.status == 200
        assert r.header("keep-alive") is None and r.header("x-secret-hop") is None
    seen = glue.seen[0]
    names = {n.lower() for n, _ in seen.headers}
    assert names.isdisjoint({"connection", "x-drop-me", "keep-alive", "proxy-authorization", "te",
                             "upgrade", "authorization"})
    assert seen.header("x-keep") == "yes"
    assert seen.header("x-forwarded-for") == "10.1.1.1"
    assert seen.header("traceparent") == "00-abc"
    # policy saw every field as sent
    assert ("authorization", "Bearer jwt") in glue.requests[0].headers


async def test_upgrade_and_connect_are_refused_with_501() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket")])
        assert r.status == 501
        r = await c.request("GET", "/after")
        assert r.status == 200
    assert [(r.status, r.failure) for r in glue.records] == [
        (501, Failure.NOT_IMPLEMENTED), (200, None)]
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        client.write(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n")
        data = await asyncio.wait_for(client.read(65536), TIMEOUT)
        assert data.startswith(b"HTTP/1.1 501 ")
    assert glue.records[0].failure == Failure.NOT_IMPLEMENTED


async def test_unknown_transfer_coding_gets_501() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        client.write(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
    assert data.startswith(b"HTTP/1.1 501 ")
    assert glue.records[0].failure == Failure.NOT_IMPLEMENTED


async def test_content_length_with_transfer_encoding_is_refused() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        client.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert glue.opened == 0


async def test_expect_100_continue_is_answered_once_allowed() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        await c.send("PUT", "/data", [("Expect", "100-continue"), ("Content-Length", "5")], end=False)
        # the 100 comes before any body byte is sent
        data = await asyncio.wait_for(client.read(65536), TIMEOUT)
        assert data.startswith(b"HTTP/1.1 100 ")
        c.conn.receive_data(data)
        await c.body(b"12345")
        await c.end()
        r = await c.response()
        assert (r.status, r.body, r.informational) == (200, b"12345", [100])
    assert glue.seen[0].header("expect") is None


async def test_expect_100_continue_denied_gets_403_and_close() -> None:
    glue = Glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        await c.send("PUT", "/admin", [("Expect", "100-continue"), ("Content-Length", "5")], end=False)
        r = await c.response()
        assert (r.status, r.informational, r.header("connection")) == (403, [], "close")
        assert await c.closed()
        await asyncio.wait_for(task, TIMEOUT)


async def test_upstream_open_failure_gets_503_and_close() -> None:
    glue = Glue(fail_open=1)
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        r = await c.request("GET", "/")
        assert r.status == 503
        assert r.header("connection") == "close"
        assert await c.closed()
        await asyncio.wait_for(task, TIMEOUT)
    record = glue.records[0]
    assert (record.status, record.failure) == (503, Failure.UPSTREAM_CONNECT)
    assert "no route to the destination" in record.detail
    # the next connection tries again
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("GET", "/")).status == 200


async def test_trailers_are_relayed_both_ways_when_chunked() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [], [b"data"], trailers=[("grpc-status", "0"), ("content-length", "9")])

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("POST", "/t", body=[b"in"], chunked=True,
                            trailers=[("x-checksum", "abc")])
        assert r.body == b"data"
        assert r.trailers == [("grpc-status", "0")]  # framing fields never in trailers
    assert glue.seen[0].trailers == [("x-checksum", "abc")]


async def test_large_bodies_stream_with_bounded_buffering() -> None:
    size = 20 * MIB
    chunk = b"z" * 65536

    async def handler(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // len(chunk)):
                yield chunk
        return Reply(200, [("content-length", str(size))], body)

    async def count_only(seen: Seen) -> Reply:
        return await handler(seen)

    glue = Glue(handler=count_only, pipe_high=64 * 1024)
    async with waypoint(glue, high=64 * 1024) as (client, engine_end, _task):
        c = H1Client(client)
        received = 0

        async def on_data(data: bytes) -> None:
            nonlocal received
            received += len(data)

        await c.send("GET", "/big")
        r = await c.response(on_data=on_data)
        assert r.status == 200
        assert received == size
        near, far = glue.upstreams[0]
        # every pipe held at most its high-water mark plus one write
        for end in (client, engine_end, near, far):
            assert end.peak_buffered <= 64 * 1024 + 2 * 65536, (end.name, end.peak_buffered)
    assert glue.records[0].response_bytes == size


async def test_large_upload_streams_with_bounded_buffering() -> None:
    size = 20 * MIB
    got = 0

    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("content-length", "0")])

    glue = Glue(handler=handler)

    async with waypoint(glue) as (client, engine_end, _task):
        c = H1Client(client)
        await c.send("POST", "/up", [("content-length", str(size))], end=False)
        for _ in range(size // 65536):
            await c.body(b"u" * 65536)
        await c.end()
        r = await c.response()
        assert r.status == 200
        got = len(glue.seen[0].body)
        near, far = glue.upstreams[0]
        for end in (client, engine_end, near, far):
            assert end.peak_buffered <= 64 * 1024 + 2 * 65536, (end.name, end.peak_buffered)
    assert got == size
    assert glue.records[0].request_bytes == size


async def test_upstream_reset_before_the_response_gets_502() -> None:
    async def handler(seen: Seen) -> Reply:
        glue.upstreams[-1][1].abort()
        await asyncio.sleep(3600)
        raise AssertionError

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/")
        assert r.status == 502
    assert glue.records[0].failure == Failure.UPSTREAM_RESET


async def test_upstream_reset_mid_response_aborts_the_client() -> None:
    async def handler(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            await asyncio.sleep(0.01)
            glue.upstreams[-1][1].abort()
            await asyncio.sleep(3600)
            yield b""
        return Reply(200, [("content-length", "100")], body)

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        await c.send("GET", "/")
        with pytest.raises(Exception):  # noqa: B017 - a reset, or h11's incomplete body
            await asyncio.wait_for(c.response(), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
    record = glue.records[0]
    assert (record.status, record.failure, record.response_bytes) == (
        200, Failure.UPSTREAM_RESET, len(b"first part"))


async def test_client_gone_mid_response_aborts_the_upstream() -> None:
    started = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(1000):
                started.set()
                yield b"x" * 65536
        return Reply(200, [("content-length", str(1000 * 65536))], body)

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, task):
        await H1Client(client).send("GET", "/")
        await asyncio.wait_for(started.wait(), TIMEOUT)
        client.abort()
        await asyncio.wait_for(task, TIMEOUT)
        await asyncio.wait_for(glue.servers[0], TIMEOUT)  # the upstream saw the reset
    assert glue.records[0].failure == Failure.CLIENT_RESET


async def test_client_gone_mid_request_body_aborts_the_upstream() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        await c.send("POST", "/", [("content-length", "1000")], end=False)
        await c.body(b"a" * 10)
        await asyncio.sleep(0.01)
        client.close()
        await asyncio.wait_for(task, TIMEOUT)
        await asyncio.wait_for(glue.servers[0], TIMEOUT)
    assert glue.records[0].failure == Failure.CLIENT_RESET
    assert glue.seen == []  # the upstream never took a truncated request as complete


async def test_early_response_before_the_request_body_ends() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        await c.send("POST", "/upload", [("content-length", "30")], end=False)
        await c.body(b"0123456789")
        # the upstream answers 413 without reading the rest, then closes
        await asyncio.sleep(0.01)
        _near, far = glue.upstreams[0]
        glue.servers[0].cancel()
        far.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        far.close()
        r = await c.response()
        assert r.status == 413
        await c.body(b"a" * 20)  # the rest is drained, the connection goes on
        await c.end()
        c.conn.start_next_cycle()
        r = await c.request("GET", "/after")
        assert r.status == 200
    assert glue.opened == 2


async def test_decide_raising_gets_500_and_close() -> None:
    def decide(request: Request) -> Verdict:
        raise RuntimeError("policy store exploded")

    glue = Glue(decide=decide)
    async with waypoint(glue) as (client, _, task):
        r = await H1Client(client).request("GET", "/")
        assert r.status == 500
        assert b"exploded" not in r.body  # internals stay inside
        await asyncio.wait_for(task, TIMEOUT)
    assert glue.records[0].failure == Failure.DECIDE_ERROR


async def test_invalid_verdict_header_gets_500() -> None:
    glue = Glue(decide=lambda r: Verdict.allow(add_headers=[("x-bad", "a\r\nInjected: 1")]))
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/")
    assert r.status == 500
    assert glue.opened == 0


async def test_idle_client_closing_ends_the_engine_without_a_record() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        c = H1Client(client)
        assert (await c.request("GET", "/")).status == 200
        client.close()
        await asyncio.wait_for(task, TIMEOUT)
    assert len(glue.records) == 1
    near, _far = glue.upstreams[0]
    assert near.gone  # the upstream stream was closed too


# ------------------------------------------------------------------ helpers


async def _read_all(stream: object) -> bytes:
    assert isinstance(stream, LegStream)
    out = b""
    try:
        while True:
            data = await stream.read(65536)
            if not data:
                return out
            out += data
    except StreamReset:
        return out


_ = echo


async def test_malformed_chunked_body_gets_400_and_the_upstream_is_aborted() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, task):
        client.write(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\nzz\r\n")
        data = await asyncio.wait_for(_read_all(client), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)
        await asyncio.wait_for(glue.servers[0], TIMEOUT)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert glue.seen == []  # the upstream never took the broken request as complete
    assert glue.records[0].failure == Failure.CLIENT_PROTOCOL


async def test_client_closing_before_its_response_cancels_the_upstream() -> None:
    hold = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        await hold.wait()
        return Reply(200)

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, task):
        client.write(b"GET /long-poll HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.01)
        client.write_eof()  # like Envoy and nginx: the client has given up on it
        await asyncio.wait_for(task, TIMEOUT)
        near, far = glue.upstreams[0]
        assert near.gone  # the upstream was cut too
        with pytest.raises(StreamReset):
            await far.drain()
        hold.set()
    assert (glue.records[0].status, glue.records[0].failure) == (0, Failure.CLIENT_RESET)


async def test_pipelined_bytes_read_while_a_response_is_pending_are_kept() -> None:
    hold = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        if seen.target == "/slow":
            await hold.wait()
        return Reply(200, [("content-length", "0"), ("x-seen", seen.target)])

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        client.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.01)
        client.write(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.01)
        hold.set()
        c = H1Client(client)
        c.expect_response()
        assert (await c.response()).header("x-seen") == "/slow"
        c.expect_response()
        assert (await c.response()).header("x-seen") == "/next"


async def test_response_with_length_and_chunked_is_relayed_by_its_chunks() -> None:
    async def handler(seen: Seen) -> Reply:
        await asyncio.sleep(3600)
        raise AssertionError

    glue = Glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        await c.send("GET", "/")
        await asyncio.sleep(0.01)
        _near, far = glue.upstreams[0]
        glue.servers[0].cancel()
        far.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
                  b"6\r\nsix ok\r\n0\r\n\r\n")
        r = await c.response()
        assert (r.status, r.body, r.header("content-length")) == (200, b"six ok", None)


async def test_response_head_over_the_limit_gets_502() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("x-huge", "h" * 5000), ("content-length", "0")])

    glue = Glue(handler=handler)
    async with waypoint(glue, Limits(max_response_header_bytes=4096)) as (client, _, _task):
        r = await H1Client(client).request("GET", "/")
        assert r.status == 502
    assert glue.records[0].failure == Failure.UPSTREAM_PROTOCOL
