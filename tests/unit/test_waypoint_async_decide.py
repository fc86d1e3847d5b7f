"""A glue that waits for its decision (an external authorizer): `Hooks.decide` returns an awaitable.

HTTP/1 awaits it in the exchange; HTTP/2 awaits it in a task per stream, holding the
request's body unacknowledged meanwhile, while other streams go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from h2.errors import ErrorCodes

from tests.unit.test_waypoint_harness import TIMEOUT, Glue, H1Client, H2Client, waypoint
from waypoint.exchange import Failure, Request, Verdict


def later(verdict: Callable[[Request], Verdict], gate: asyncio.Event | None = None
          ) -> Callable[[Request], Awaitable[Verdict]]:
    """A decide function whose verdict comes after `gate` is set (or a few loop turns)."""

    async def decide(r: Request) -> Verdict:
        if gate is not None:
            await gate.wait()
        for _ in range(3):
            await asyncio.sleep(0)
        return verdict(r)

    return decide


def slow_glue(verdict: Callable[[Request], Verdict], gate: asyncio.Event | None = None, **kw: object) -> Glue:
    glue = Glue(**kw)  # type: ignore[arg-type]
    glue.decide_fn = later(verdict, gate)  # type: ignore[assignment]
    return glue


async def test_http1_waits_for_the_verdict() -> None:
    gate = asyncio.Event()
    glue = slow_glue(lambda r: Verdict.allow([("x-authz", "ok")], context=r.path), gate)
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        pending = asyncio.ensure_future(c.request("POST", "/a", body=b"hello"))
        await asyncio.sleep(0.01)
        assert not pending.done() and glue.opened == 0
        gate.set()
        resp = await asyncio.wait_for(pending, TIMEOUT)
        assert resp.status == 200 and resp.body == b"hello"
        assert dict(glue.seen[0].headers)["x-authz"] == "ok"
        assert (await c.request("GET", "/b")).status == 200  # the connection goes on
    assert [r.context for r in glue.records] == ["/a", "/b"]


async def test_http1_async_denial_and_failure() -> None:
    glue = slow_glue(lambda r: Verdict.deny(401, b"ext-authz says no", [("www-authenticate", "x")]))
    async with waypoint(glue) as (client, _, _task):
        resp = await H1Client(client).request("GET", "/a")
        assert (resp.status, resp.body, dict(resp.headers).get("www-authenticate")) == (401, b"ext-authz says no", "x")
    assert glue.opened == 0

    def boom(r: Request) -> Verdict:
        raise RuntimeError("authorizer exploded")

    glue = slow_glue(boom)
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("GET", "/a")).status == 500  # fail closed
    assert glue.records[0].failure == Failure.DECIDE_ERROR


async def test_http2_holds_the_body_until_the_verdict_and_serves_other_streams() -> None:
    gate = asyncio.Event()
    glue = slow_glue(lambda r: Verdict.allow(context=r.path), upstream="http2")
    slow = later(lambda q: Verdict.allow(context=q.path), gate)

    def decide(r: Request) -> Verdict | Awaitable[Verdict]:
        return slow(r) if r.path == "/slow" else Verdict.allow(context=r.path)

    glue.decide_fn = decide  # type: ignore[assignment]
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("POST", "/slow")
        await c.send_body(sid, b"x" * 1000, end=True)  # arrives while the verdict is awaited
        assert (await c.request("GET", "/fast")).status == 200  # not held up by the slow one
        gate.set()
        resp = await c.response(sid)
        assert resp.status == 200 and resp.body == b"x" * 1000
        await c.close()
    assert sorted(r.context for r in glue.records) == ["/fast", "/slow"]  # type: ignore[type-var]


async def test_http2_async_denial_drops_the_body_and_keeps_the_connection() -> None:
    glue = slow_glue(lambda r: Verdict.deny(403) if r.path == "/no" else Verdict.allow(), upstream="http2")
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("POST", "/no")
        await c.send_body(sid, b"y" * 5000, end=True)
        assert (await c.response(sid)).status == 403
        assert (await c.request("GET", "/yes")).status == 200
        await c.close()
    assert glue.opened == 1


async def test_http2_client_reset_while_deciding() -> None:
    gate = asyncio.Event()
    glue = slow_glue(lambda r: Verdict.allow(), gate, upstream="http2")
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("POST", "/a")
        await c.send_body(sid, b"z" * 100, end=False)
        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.sleep(0.01)
        assert (await c.request("GET", "/after")).status == 200
        await c.close()
    assert glue.opened == 1  # only for /after
    assert [r.failure for r in glue.records if r.path == "/a"] == [Failure.CLIENT_RESET]


async def test_http2_a_reset_cancels_its_pending_decision() -> None:
    # review 14: a decision outlived its stream's RST_STREAM: 400 HEADERS+RST_STREAM pairs left
    # 400 calls pending at the external authorizer (rapid-reset amplification)
    gate = asyncio.Event()
    pending = 0

    async def authorizer(r: Request) -> Verdict:
        nonlocal pending
        pending += 1
        try:
            await gate.wait()
            return Verdict.allow()
        finally:
            pending -= 1

    glue = Glue(upstream="http2")
    glue.decide_fn = authorizer  # type: ignore[assignment]
    async with waypoint(glue) as (client, _, task):
        c = H2Client(client)
        for _ in range(400):
            sid = await c.start("GET", "/", end=True)
            c.reset(sid)
        for _ in range(500):
            if len(glue.requests) == 400 and pending == 0:
                break
            await asyncio.sleep(0.01)
        # every request was judged; none is still waiting at the authorizer (most never got there)
        assert (len(glue.requests), pending) == (400, 0), "decisions for reset streams are cancelled"
        assert not task.done()
        gate.set()
        assert (await c.request("GET", "/after")).status == 200
        await c.close()
    assert glue.opened == 1
