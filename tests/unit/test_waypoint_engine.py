"""Sniffing (waypoint/sniff.py) and the engine's entry point (waypoint/engine.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.unit.test_waypoint_harness import TIMEOUT, Glue, H1Client, H2Client, waypoint
from waypoint.engine import proxy, sniff_stream
from waypoint.exchange import Failure, Verdict
from waypoint.sniff import PREFACE, sniff
from waypoint.streams import LegStream, StreamReset, memory_pipe

SNIFFED = [
    (b"", None),
    (b"G", None),
    (b"GET", None),
    (b"GET ", None),
    (b"GET /", None),
    (b"GET / ", None),
    (b"GET / HTTP/1.", None),
    (b"GET / HTTP/1.1", "http1"),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http1"),
    (b"POST /x?y HTTP/1.0\r\n", "http1"),
    (b"OPTIONS * HTTP/1.1\r\n", "http1"),
    (b"PROPFIND /dav HTTP/1.1\r\n", "http1"),
    (b"P", None),
    (b"PRI * HTTP/2.0\r\n", None),
    (PREFACE, "http2"),
    (PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "http2"),
    (b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", "opaque"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "opaque"),  # TLS ClientHello
    (b"GET key\r\n", "opaque"),  # inline Redis
    (b"SET k v\r\n", "opaque"),
    (b"*1\r\n$4\r\nPING\r\n", "opaque"),  # RESP
    (b"GET / HTTP/2.0\r\n", "opaque"),
    (b"GET / FTP/1.1\r\n", "opaque"),
    (b"GET  / HTTP/1.1\r\n", "opaque"),
    (b" GET / HTTP/1.1\r\n", "opaque"),
    (b"G\x00T / HTTP/1.1\r\n", "opaque"),
    (b"GET /\x01 HTTP/1.1\r\n", "opaque"),
    (b"A" * 40, "opaque"),  # no method is that long
    (b"\x00\x00\x00\x00", "opaque"),
]


@pytest.mark.parametrize(("first", "expected"), SNIFFED)
def test_sniff(first: bytes, expected: str | None) -> None:
    assert sniff(first) == expected


def test_sniff_gives_up_waiting_on_a_huge_request_line() -> None:
    assert sniff(b"GET /" + b"a" * 70_000) == "http1"  # h11 then answers 431/400 itself


async def test_sniff_stream_reads_until_it_can_tell() -> None:
    a, b = memory_pipe()
    a.write(b"GE")
    task = asyncio.ensure_future(sniff_stream(b))
    await asyncio.sleep(0)
    assert not task.done()
    a.write(b"T / HTTP/1.1\r\n")
    found = await asyncio.wait_for(task, TIMEOUT)
    assert (found.protocol, found.prefix) == ("http1", b"GET / HTTP/1.1\r\n")


async def test_sniff_stream_eof_is_opaque() -> None:
    a, b = memory_pipe()
    a.write(b"GET")
    a.write_eof()
    found = await sniff_stream(b)
    assert (found.protocol, found.prefix) == ("opaque", b"GET")


async def test_opaque_traffic_is_handed_back_untouched() -> None:
    glue = Glue()
    a, b = memory_pipe()
    a.write(b"\x16\x03\x01 not http")
    found = await asyncio.wait_for(proxy(b, glue.hooks()), TIMEOUT)
    assert (found.protocol, found.prefix) == ("opaque", b"\x16\x03\x01 not http")
    assert not b.gone  # the glue decides what to do with it
    b.write(b"still open")
    assert await a.read(100) == b"still open"
    assert glue.records == [] and glue.opened == 0


async def test_both_protocols_through_the_same_entry_point() -> None:
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        assert (await H1Client(client).request("GET", "/one")).status == 200
    h2glue = Glue(upstream="http2")
    async with waypoint(h2glue) as (client, _, _task):
        c = H2Client(client)
        assert (await c.request("GET", "/two")).status == 200
        await c.close()
    assert [(r.protocol, r.path) for r in glue.records + h2glue.records] == [
        ("HTTP/1.1", "/one"), ("HTTP/2", "/two")]


async def test_cancelling_the_engine_closes_both_sides_http1() -> None:
    hold = asyncio.Event()

    async def handler(seen: object) -> object:
        await hold.wait()
        raise AssertionError

    glue = Glue(handler=handler)  # type: ignore[arg-type]
    async with waypoint(glue) as (client, _, task):
        await H1Client(client).send("GET", "/slow")
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        near, _far = glue.upstreams[0]
        assert near.gone
        assert await H1Client(client).closed()
    assert len(glue.records) == 1  # the request in flight is still reported


async def test_cancelling_the_engine_closes_both_sides_http2() -> None:
    hold = asyncio.Event()

    async def handler(seen: object) -> object:
        await hold.wait()
        raise AssertionError

    glue = Glue(handler=handler, upstream="http2")  # type: ignore[arg-type]
    async with waypoint(glue) as (client, _, task):
        c = H2Client(client)
        await c.start("GET", "/slow", end=True)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        near, _far = glue.upstreams[0]
        assert near.gone
        await c.wait_for(lambda: c.closed)
        await c.close()
    assert [r.failure for r in glue.records] == [Failure.CLIENT_RESET]


async def test_a_failing_record_hook_does_not_break_the_connection() -> None:
    glue = Glue()

    def boom(record: object) -> None:
        raise RuntimeError("metrics backend down")

    glue.on_request = boom  # type: ignore[method-assign,assignment]
    async with waypoint(glue) as (client, _, _task):
        c = H1Client(client)
        assert (await c.request("GET", "/a")).status == 200
        assert (await c.request("GET", "/b")).status == 200


def test_verdict_constructors() -> None:
    allow = Verdict.allow([("x-a", "1")], ["Authorization"], context=7)
    assert (allow.allowed, allow.add_headers, allow.remove_headers, allow.context) == (
        True, (("x-a", "1"),), frozenset({"authorization"}), 7)
    deny = Verdict.deny()
    assert (deny.allowed, deny.status, deny.body) == (False, 403, b"RBAC: access denied")
    allow.check()
    deny.check()
    from waypoint import WaypointError

    for bad in (Verdict.deny(200), Verdict.allow([("bad name", "x")]),
                Verdict.allow([("x", "a\nb")]), Verdict.allow([("connection", "close")]),
                Verdict.deny(401, response_headers=[("content-length", "3")])):
        with pytest.raises(WaypointError):
            bad.check()


H1_SEED = (b"POST /a/b?c=d HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n"
           b"X-A: 1\r\n\r\n4\r\nbody\r\n0\r\nT: v\r\n\r\nGET / HTTP/1.1\r\nHost: svc\r\n\r\n")


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(out) + 1)
        if op < 0.4 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif op < 0.7:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            del out[pos:pos + rng.randint(1, 6)]
    return bytes(out)


def _h2_seed() -> bytes:
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "svc"),
                          (":path", "/x"), ("x-a", "1")])
    conn.send_data(1, b"hello")
    conn.send_headers(1, [("t", "v")], end_stream=True)
    conn.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"),
                          (":path", "/y")], end_stream=True)
    conn.reset_stream(3)
    return conn.data_to_send()


@pytest.mark.parametrize("kind", ["http1", "http2"])
async def test_mangled_input_never_raises_out_of_the_engine(kind: str) -> None:
    rng = random.Random(1234)
    seed = H1_SEED if kind == "http1" else _h2_seed()
    keep = len(PREFACE) if kind == "http2" else 0
    for _ in range(150):
        glue = Glue(upstream=kind)
        data = seed[:keep] + _mutate(seed[keep:], rng)
        a, b = memory_pipe()
        a.write(data)
        a.write_eof()
        task = asyncio.ensure_future(proxy(b, glue.hooks()))
        try:
            found = await asyncio.wait_for(task, TIMEOUT)  # ends cleanly: no exception
            if found.protocol != "opaque":
                await asyncio.wait_for(_drain_until_closed(a), TIMEOUT)  # and closes
        finally:
            a.close()
            await asyncio.gather(task, return_exceptions=True)
            await glue.close()
        for record in glue.records:
            assert record.end >= record.start


async def _drain_until_closed(stream: LegStream) -> None:
    try:
        while await stream.read(65536):
            pass
    except StreamReset:
        pass
