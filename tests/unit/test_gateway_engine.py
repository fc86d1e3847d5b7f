"""The waypoint engine's generalizations that the ingress gateway needs, with real h11/h2 peers
over memory pipes: an upstream per verdict, response header edits, local answers, body limits
(413), timeouts (504), retries, the strict HTTP/1 head (smuggling shapes refused) and the
header count limit (431)."""

from __future__ import annotations

import asyncio

import h11
import pytest

from tests.unit.test_waypoint_harness import (
    Glue,
    H1Client,
    H2Client,
    Reply,
    Seen,
    waypoint,
)
from waypoint.exchange import Failure, Limits, Request, Retry, Upstream, Verdict
from waypoint.h1peer import head_problem


def by_prefix(glue: Glue) -> object:
    """Requests under /a and /b go to upstreams "a" and "b" (each its own connection)."""
    def decide(r: Request) -> Verdict:
        key = r.path.split("/")[1]
        return Verdict.allow(upstream=Upstream(key, glue.open_upstream), context=key)
    return decide


async def test_http1_each_verdict_upstream_gets_its_own_connection() -> None:
    glue = Glue()
    glue.decide_fn = by_prefix(glue)  # type: ignore[assignment]
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        for path in ("/a/1", "/a/2", "/b/1", "/a/3"):
            assert (await c.request("GET", path)).status == 200
    # a, then b (a's idle connection closed), then a again on a new connection
    assert glue.opened == 3
    assert [s.target for s in glue.seen] == ["/a/1", "/a/2", "/b/1", "/a/3"]


async def test_http2_each_verdict_upstream_gets_its_own_connections() -> None:
    glue = Glue(upstream="http2")
    glue.decide_fn = by_prefix(glue)  # type: ignore[assignment]
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        got = await asyncio.gather(*(c.request("GET", p) for p in ("/a/1", "/b/1", "/a/2", "/b/2")))
        assert [r.status for r in got] == [200] * 4
        await c.close()
    assert glue.opened == 2  # one connection per key, shared by its streams


async def test_response_headers_are_edited_as_the_verdict_says() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("server", "app"), ("x-keep", "1"), ("x-internal", "secret")], [b"ok"])

    def decide(r: Request) -> Verdict:
        return Verdict.allow(add_response_headers=[("x-added", "yes"), ("server", "ambit")],
                             remove_response_headers=["X-Internal", "server"])

    for kind in ("http1", "http2"):
        glue = Glue(decide=decide, handler=handler, upstream=kind)
        async with waypoint(glue) as (client, _, _task):
            if kind == "http1":
                r = await H1Client(client).request("GET", "/")
            else:
                c = H2Client(client)
                r = await c.request("GET", "/")
                await c.close()
        assert r.status == 200 and r.body == b"ok"
        assert (r.header("x-added"), r.header("server"), r.header("x-keep"), r.header("x-internal")) == (
            "yes", "ambit", "1", None), (kind, r.headers)


async def test_local_answers_have_any_final_status() -> None:
    def decide(r: Request) -> Verdict:
        if r.path == "/old":
            return Verdict.respond(301, b"", [("location", "https://svc.test/new")], context="redirect")
        return Verdict.respond(204, b"ignored", [("access-control-allow-origin", "https://a.test")])

    glue = Glue(decide=decide)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("GET", "/old")
        assert (r.status, r.header("location")) == (301, "https://svc.test/new")
        r = await c.request("OPTIONS", "/x")
        assert (r.status, r.body, r.header("access-control-allow-origin")) == (204, b"", "https://a.test")
    assert glue.opened == 0
    assert [rec.status for rec in glue.records] == [301, 204]
    Verdict.respond(302).check()
    with pytest.raises(Exception, match="final status"):
        Verdict.respond(101).check()
    with pytest.raises(Exception, match="4xx/5xx"):
        Verdict.deny(302).check()


async def test_a_declared_body_over_the_limit_is_413_before_any_upstream() -> None:
    glue = Glue(decide=lambda r: Verdict.allow(max_request_body=10))
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("POST", "/up", body=b"x" * 11)
        assert r.status == 413
        assert (await c.request("POST", "/up", body=b"x" * 10)).status == 200, "the connection goes on"
    assert glue.records[0].failure is Failure.BODY_TOO_LARGE and not glue.records[0].forwarded
    assert glue.opened == 1


async def test_a_chunked_body_over_the_limit_is_cut_off_with_413() -> None:
    glue = Glue(decide=lambda r: Verdict.allow(max_request_body=1000))
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("POST", "/up", body=[b"x" * 600, b"y" * 600], chunked=True)
        assert r.status == 413 and r.header("connection") == "close"
        assert await c.closed()
    assert glue.records[0].failure is Failure.BODY_TOO_LARGE


async def test_http2_body_over_the_limit_is_413_on_that_stream_only() -> None:
    glue = Glue(decide=lambda r: Verdict.allow(max_request_body=100), upstream="http2")
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        big = await c.request("POST", "/up", body=b"x" * 5000)
        small = await c.request("POST", "/up", body=b"x" * 100)
        await c.close()
    assert big.status == 413 and small.status == 200
    assert sorted(str(r.failure) for r in glue.records) == ["None", "body_too_large"]


async def slow(seen: Seen) -> Reply:
    await asyncio.sleep(5)
    return Reply(200)


async def test_no_response_head_within_the_timeout_is_504() -> None:
    glue = Glue(decide=lambda r: Verdict.allow(timeout=0.2), handler=slow)
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/slow")
    assert r.status == 504
    assert glue.records[0].failure is Failure.UPSTREAM_TIMEOUT
    glue = Glue(decide=lambda r: Verdict.allow(timeout=0.2), handler=slow, upstream="http2")
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/slow")
        await c.close()
    assert r.status == 504


async def test_a_response_that_started_is_not_cut_by_the_timeout() -> None:
    async def streaming(seen: Seen) -> Reply:
        async def body():  # type: ignore[no-untyped-def]
            for _ in range(3):
                await asyncio.sleep(0.15)
                yield b"tick"
        return Reply(200, [], body)

    glue = Glue(decide=lambda r: Verdict.allow(timeout=0.2), handler=streaming)
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/stream")
    assert (r.status, r.body) == (200, b"tick" * 3)


async def test_retries_on_statuses_and_on_failed_opens() -> None:
    answers = [503, 503, 200]

    async def flaky(seen: Seen) -> Reply:
        return Reply(answers.pop(0), [], [b"x"])

    glue = Glue(decide=lambda r: Verdict.allow(retry=Retry(2, frozenset({503}))), handler=flaky)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("GET", "/")
        assert r.status == 200
    assert glue.opened == 3 and len(glue.seen) == 3
    assert glue.records[0].failure is None

    # out of attempts: the last answer is relayed as it is
    answers[:] = [503, 503]
    glue = Glue(decide=lambda r: Verdict.allow(retry=Retry(1, frozenset({503}))), handler=flaky)
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("GET", "/")).status == 503

    # a request with a body is never sent twice
    answers[:] = [503, 200]
    glue = Glue(decide=lambda r: Verdict.allow(retry=Retry(2, frozenset({503}))), handler=flaky)
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("POST", "/", body=b"data")).status == 503

    glue = Glue(decide=lambda r: Verdict.allow(retry=Retry(2, backoff=0.01)), fail_open=2)
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("GET", "/")).status == 200
    assert glue.opened == 3


RAW_BAD = [
    (b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n  folded\r\n\r\n", "obs-fold"),
    (b"GET / HTTP/1.1\nHost: svc\n\n", "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: a\x01b\r\n\r\n", "control character"),
    (b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: a\rb\r\n\r\n", "bare CR"),
    (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: svc\r\n\r\n", "Content-Length and Transfer-Encoding"),
    (b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
     "Content-Length"),
]


@pytest.mark.parametrize(("raw", "why"), RAW_BAD)
async def test_smuggling_shapes_are_400_and_the_connection_closes(raw: bytes, why: str) -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        client.write(raw)
        c.expect_response()
        r = await c.response()
        assert r.status == 400, (why, r)
        assert why.lower() in r.body.decode().lower() or why.startswith("Content-Length")
        assert await c.closed()
    assert glue.opened == 0 and not glue.seen, "nothing reached the upstream"


def test_head_problem_table() -> None:
    assert head_problem(b"GET / HTTP/1.1\r\nHost: a\r\nX: b\tc\r\n\r\n") is None
    assert head_problem(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n") is None  # leading empty lines
    assert head_problem(b"GET / HTTP/1.1\r\nHost: a\r") is None  # incomplete: its LF is on its way
    assert head_problem(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody with \n and \x01") is None
    assert head_problem(b"GET / HTTP/1.1\r\nHost: a\r\n\tx: y\r\n") is not None  # folded, incomplete
    assert head_problem(b"GET / HTTP/1.1\r\nX: \x7f\r\n\r\n") is not None


async def test_too_many_header_fields_are_431() -> None:
    glue = Glue()
    async with waypoint(glue, Limits(max_header_count=10)) as (client, _, _task):
        c = H1Client(client)
        r = await c.request("GET", "/", [(f"x-h{i}", "v") for i in range(12)])
        assert r.status == 431
    glue = Glue(upstream="http2")
    async with waypoint(glue, Limits(max_header_count=10)) as (client, _, _task):
        c2 = H2Client(client)
        r = await c2.request("GET", "/", [(f"x-h{i}", "v") for i in range(12)])
        ok = await c2.request("GET", "/", [("x-h", "v")])
        await c2.close()
    assert (r.status, ok.status) == (431, 200)



async def test_a_verdict_rewrites_the_target_and_the_authority() -> None:
    decide = lambda r: Verdict.allow(target="/v2" + r.target, authority="backend.internal")  # noqa: E731
    glue = Glue(decide=decide)
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("GET", "/orders?id=7", [("Host", "shop.example")])).status == 200
    assert glue.seen[0].target == "/v2/orders?id=7" and glue.seen[0].header("host") == "backend.internal"
    glue = Glue(decide=decide, upstream="http2")
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        assert (await c.request("GET", "/orders")).status == 200
        await c.close()
    assert glue.seen[0].target == "/v2/orders" and glue.seen[0].header(":authority") == "backend.internal"
    with pytest.raises(Exception, match="origin-form"):
        Verdict.allow(target="http://x/").check()
    with pytest.raises(Exception, match="host"):
        Verdict.allow(authority="a b").check()


async def test_a_head_timeout_closes_idle_connections_and_answers_slow_heads_408() -> None:
    glue = Glue()
    async with waypoint(glue, Limits(head_timeout=0.2)) as (client, _, _task):
        c = H1Client(client)
        assert (await c.request("GET", "/")).status == 200
        assert await c.closed(), "an idle keep-alive connection is closed"
    assert len(glue.records) == 1
    glue = Glue()
    async with waypoint(glue, Limits(head_timeout=0.2)) as (client, _, _task):
        c = H1Client(client)
        client.write(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: ")  # and nothing more
        c.expect_response()
        r = await c.response()
        assert r.status == 408 and await c.closed()
    assert glue.records[0].status == 408 and glue.opened == 0
    with pytest.raises(Exception, match="head_timeout"):
        Limits(head_timeout=0)


async def test_more_than_one_authorization_header_is_400_at_both_proxies() -> None:
    # review 14: which credential counts is ambiguous (the gateway took the last, the app may take
    # the first): refused by the engine, for the waypoint and the gateway alike
    two = [("authorization", "Bearer a.b.c"), ("authorization", "Basic Zm9v")]
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        r = await H1Client(client).request("GET", "/", two)
        assert r.status == 400 and b"more than one Authorization" in r.body
    glue2 = Glue(upstream="http2")
    async with waypoint(glue2) as (client, _, _task):
        c = H2Client(client)
        r2 = await c.request("GET", "/", two)
        ok = await c.request("GET", "/", two[:1])
        await c.close()
    assert (r2.status, ok.status) == (400, 200)
    assert not glue.requests and len(glue2.requests) == 1, "the glue never judged the ambiguous ones"


def test_the_head_scan_is_incremental_and_says_what_head_problem_says() -> None:
    from waypoint.h1peer import HeadScan

    heads = [b"GET / HTTP/1.1\r\nHost: a\r\nX: b\tc\r\n\r\n", b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody with \n and \x01", *(raw for raw, _ in RAW_BAD),
             b"GET / HTTP/1.1\r\nA: b\r\r\n\r\n", b"\n", b"GET / HTTP/1.1\r\nX: \x7f\r\n\r\n"]
    for head in heads:
        scan = HeadScan()
        bytewise = next((p for p in (scan.feed(head[i:i + 1]) for i in range(len(head))) if p), None)
        assert bytewise == head_problem(head), head


async def test_a_head_trickled_in_tiny_reads_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # review 14: every read rescanned (and copied) the whole buffer: a 60 KB head in 16-byte
    # writes cost ~3,750 scans of up to 60 KB, blocking the event loop for every connection
    copied = 0
    trailing = h11.Connection.trailing_data

    def counting(conn: h11.Connection) -> tuple[bytes, bool]:
        nonlocal copied
        data: tuple[bytes, bool] = trailing.fget(conn)  # type: ignore[attr-defined]
        copied += len(data[0])
        return data

    monkeypatch.setattr(h11.Connection, "trailing_data", property(counting))
    head = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Pad: " + b"a" * 60_000 + b"\r\n\r\n"
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        for i in range(0, len(head), 16):
            client.write(head[i:i + 16])
            await asyncio.sleep(0)
        c.expect_response()
        assert (await c.response()).status == 200
    assert copied < 2 * len(head), f"{copied} bytes copied to check a head of {len(head)}"


async def test_the_head_timeout_is_one_deadline_for_the_whole_head() -> None:
    # review 14: the timer restarted with every read, so a byte every 0.1 s kept a head (and its
    # connection) open forever under head_timeout=0.4
    glue = Glue()
    async with waypoint(glue, Limits(head_timeout=0.4)) as (client, _, task):
        c = H1Client(client)
        client.write(b"GET / HTTP/1.1\r\nHost: svc\r\n")
        for _ in range(40):  # 4 s of trickling, ten times the head's time
            if task.done():
                break
            client.write(b"X")
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a head trickled a byte at a time stayed open past its head_timeout")
        c.expect_response()
        r = await c.response()
        assert r.status == 408 and await c.closed()
    assert glue.records[0].status == 408 and not glue.requests
