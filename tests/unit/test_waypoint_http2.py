"""The HTTP/2 proxy (waypoint/http2.py) between a real h2 client and a real h2 server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from tests.unit.test_waypoint_harness import (
    TIMEOUT,
    ClientStream,
    Glue,
    H1Client,
    H2Client,
    H2Server,
    Reply,
    Seen,
    settings,
    waypoint,
)
from waypoint.exchange import Failure, Limits, Request, Verdict
from waypoint.streams import StreamReset

KIB = 1024
MIB = 1024 * KIB


def deny_admin(request: Request) -> Verdict:
    if request.path.startswith("/admin"):
        return Verdict.deny(context="denied")
    return Verdict.allow(context="allowed")


def h2_glue(**kw: object) -> Glue:
    return Glue(upstream="http2", **kw)  # type: ignore[arg-type]


async def test_get_and_post_are_forwarded() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/hello?x=1")
        assert (r.status, r.header("x-seen"), r.body) == (200, "GET /hello?x=1", b"")
        r = await c.request("POST", "/upload", [("content-type", "text/plain")], b"payload" * 1000)
        assert (r.status, r.body) == (200, b"payload" * 1000)
        await c.close()
    assert glue.opened == 1
    assert [(s.method, s.target) for s in glue.seen] == [("GET", "/hello?x=1"), ("POST", "/upload")]
    assert glue.seen[0].header(":authority") == "svc.test"
    records = glue.records
    assert [(r.method, r.path, r.status, r.protocol) for r in records] == [
        ("GET", "/hello", 200, "HTTP/2"), ("POST", "/upload", 200, "HTTP/2")]
    assert [(r.request_bytes, r.response_bytes) for r in records] == [(0, 0), (7000, 7000)]
    assert [r.stream_id for r in records] == [1, 3]
    req = glue.requests[1]
    assert (req.protocol, req.stream_id, req.scheme, req.authority) == ("HTTP/2", 3, "http", "svc.test")
    assert ("content-type", "text/plain") in req.headers


async def test_denied_stream_gets_403_and_others_go_on() -> None:
    glue = h2_glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        denied = await c.start("POST", "/admin/x")
        allowed = await c.start("GET", "/ok", end=True)
        r = await c.response(denied)
        assert (r.status, r.body, r.header("content-length")) == (403, b"RBAC: access denied", "19")
        # the request body was still open: the waypoint said "stop sending"
        assert r.reset == ErrorCodes.NO_ERROR
        assert (await c.response(allowed)).status == 200
        r = await c.request("GET", "/again")
        assert r.status == 200
        await c.close()
    assert [s.target for s in glue.seen] == ["/ok", "/again"]
    by_path = {r.path: r for r in glue.records}
    assert (by_path["/admin/x"].status, by_path["/admin/x"].context) == (403, "denied")
    assert not by_path["/admin/x"].forwarded


async def test_paths_are_normalized_for_policy_and_upstream() -> None:
    glue = h2_glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        assert (await c.request("GET", "//admin")).status == 403
        assert (await c.request("GET", "/%61dmin/")).status == 403
        r = await c.request("GET", "/a/./b/../c?q")
        assert r.status == 200
        r = await c.request("GET", "/a%2fb")
        assert r.status == 400
        assert b"encoded '/'" in r.body
        assert (await c.request("GET", "/fine")).status == 200  # the connection goes on
        await c.close()
    assert [r.path for r in glue.requests] == ["/admin", "/admin/", "/a/c", "/fine"]
    assert glue.seen[0].target == "/a/c?q"


async def test_bad_authority_gets_400_on_that_stream() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("GET", "/", authority="user@svc", end=True)
        r = await c.response(sid)
        assert r.status == 400
        assert (await c.request("GET", "/ok")).status == 200
        await c.close()
    assert glue.records[0].failure == Failure.BAD_REQUEST


async def test_header_list_over_the_limit_gets_431_on_that_stream() -> None:
    glue = h2_glue()
    async with waypoint(glue, Limits(max_header_bytes=8 * KIB)) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/", [("x-big", "a" * 9000)])
        assert r.status == 431
        assert (await c.request("GET", "/next")).status == 200
        await c.close()
    assert glue.records[0].failure == Failure.HEADERS_TOO_LARGE


async def test_header_block_over_the_hard_cap_ends_the_connection() -> None:
    glue = h2_glue()
    async with waypoint(glue, Limits(max_header_bytes=4 * KIB, max_response_header_bytes=4 * KIB)) as (
        client, _, task
    ):
        c = H2Client(client)
        sid = await c.start("GET", "/", [("x-huge", "a" * 40_000)], end=True)
        await asyncio.wait_for(task, TIMEOUT)
        await c.wait_for(lambda: c.closed or c.terminated is not None)
        assert c.streams[sid].status == 0
        await c.close()


async def test_protocol_error_sends_goaway_and_closes_only_that_connection() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (bad, _, bad_task), waypoint(glue) as (good, _, _):
        c = H2Client(bad)
        assert (await c.request("GET", "/first")).status == 200
        # DATA on stream 0: a connection error
        bad.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        await asyncio.wait_for(bad_task, TIMEOUT)
        await c.wait_for(lambda: c.terminated is not None or c.closed)
        assert c.terminated is not None
        assert c.terminated.error_code == ErrorCodes.PROTOCOL_ERROR
        g = H2Client(good)
        assert (await g.request("GET", "/other")).status == 200
        await c.close()
        await g.close()


async def test_trailers_are_relayed_both_ways() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("content-type", "application/grpc")], [b"\x00\x00\x00\x00\x02hi"],
                     trailers=[("grpc-status", "0"), ("grpc-message", "ok")])

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("POST", "/pkg.Svc/Call", [("content-type", "application/grpc"),
                                                       ("te", "trailers")],
                            b"\x00\x00\x00\x00\x01x", trailers=[("x-req-trailer", "1")])
        assert r.status == 200
        assert r.trailers == [("grpc-status", "0"), ("grpc-message", "ok")]
        await c.close()
    assert glue.seen[0].header("te") == "trailers"  # gRPC needs it to reach the server
    assert glue.seen[0].trailers == [("x-req-trailer", "1")]


async def test_client_reset_is_propagated_upstream() -> None:
    hold = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        await hold.wait()
        return Reply(200)

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("POST", "/slow")
        await c.send_body(sid, b"part", end=False)
        await c.wait_for(lambda: bool(glue.server_conns) and bool(glue.server_conns[0].partial))
        server: H2Server = glue.server_conns[0]
        c.reset(sid, ErrorCodes.CANCEL)
        await server.wait_for(lambda: bool(server.resets))
        assert list(server.resets.values()) == [ErrorCodes.CANCEL]
        hold.set()
        assert (await c.request("GET", "/after")).status == 200
        await c.close()
    record = next(r for r in glue.records if r.path == "/slow")
    assert (record.failure, record.request_bytes) == (Failure.CLIENT_RESET, 4)


async def test_upstream_reset_is_propagated_downstream() -> None:
    async def handler(seen: Seen) -> Reply:
        if seen.target == "/refused":
            return Reply(0, reset=ErrorCodes.REFUSED_STREAM)
        return Reply(200, [], [b"some"], reset=ErrorCodes.INTERNAL_ERROR)

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/refused")
        assert (r.status, r.reset) == (0, ErrorCodes.REFUSED_STREAM)
        r = await c.request("GET", "/midway")
        assert (r.status, r.body, r.reset) == (200, b"some", ErrorCodes.INTERNAL_ERROR)
        await c.close()
    assert [(r.path, r.status, r.failure) for r in glue.records] == [
        ("/refused", 0, Failure.UPSTREAM_RESET), ("/midway", 200, Failure.UPSTREAM_RESET)]


async def test_upstream_open_failure_gets_503_and_the_next_stream_retries() -> None:
    glue = h2_glue(fail_open=1)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/")
        assert r.status == 503
        assert (await c.request("GET", "/again")).status == 200
        await c.close()
    assert (glue.records[0].status, glue.records[0].failure) == (503, Failure.UPSTREAM_CONNECT)
    assert glue.opened == 2


async def test_headers_added_and_removed_and_hop_by_hop_dropped() -> None:
    def decide(request: Request) -> Verdict:
        return Verdict.allow(add_headers=[("x-forwarded-for", "10.1.1.1")],
                             remove_headers=["authorization", "x-forwarded-for"])

    glue = h2_glue(decide=decide)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/", [("authorization", "Bearer t"), ("x-forwarded-for", "6.6.6.6"),
                                         ("x-keep", "1")])
        assert r.status == 200
        await c.close()
    seen = glue.seen[0]
    assert seen.header("authorization") is None
    assert seen.header("x-forwarded-for") == "10.1.1.1"
    assert seen.header("x-keep") == "1"


async def test_flow_control_with_a_slow_reader_is_end_to_end() -> None:
    size = 4 * MIB
    sent = 0

    async def handler(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(size // (64 * KIB)):
                sent += 64 * KIB
                yield b"s" * (64 * KIB)
        return Reply(200, [], body)

    limits = Limits(h2_stream_window=256 * KIB, h2_connection_window=MIB)
    glue = h2_glue(handler=handler)
    async with waypoint(glue, limits) as (client, engine_end, _task):
        c = H2Client(client, auto_ack=False,
                     settings=settings(initial_window_size=64 * KIB))
        sid = await c.start("GET", "/big", end=True)
        st = c.streams[sid]
        await c.wait_for(lambda: st.received >= 64 * KIB - 1)
        await asyncio.sleep(0.05)
        # the client granted 64 KiB; the upstream sent only what the engine's windows allow
        assert st.received <= 64 * KIB
        assert sent <= 64 * KIB + limits.h2_connection_window + 2 * 64 * KIB
        acked = 0
        while not st.ended:
            await asyncio.sleep(0)  # a slow reader
            if st.received > acked:
                c.ack(sid, st.received - acked)
                acked = st.received
            else:
                await c.wait_for(lambda a=acked: st.received > a or st.ended)  # type: ignore[misc]
        assert st.received == size
        for end in (client, engine_end, *glue.upstreams[0]):
            assert end.peak_buffered <= MIB + 256 * KIB, (end.name, end.peak_buffered)
        await c.close()


async def test_large_upload_and_download_with_bounded_buffering() -> None:
    size = 20 * MIB

    async def handler(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // MIB):
                yield b"d" * MIB
        return Reply(200, [("content-length", str(size))], body)

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, engine_end, _task):
        c = H2Client(client)
        r = await asyncio.wait_for(c.request("PUT", "/blob", body=b"u" * size), 60)
        assert r.status == 200
        assert len(r.body) == size
        for end in (client, engine_end, *glue.upstreams[0]):
            assert end.peak_buffered <= 2 * MIB, (end.name, end.peak_buffered)
        await c.close()
    assert len(glue.seen[0].body) == size
    assert (glue.records[0].request_bytes, glue.records[0].response_bytes) == (size, size)


async def test_many_concurrent_streams_map_one_to_one() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        results = await asyncio.gather(*(c.request("POST", f"/s/{i}", body=str(i).encode() * 100)
                                         for i in range(50)))
        assert [r.body for r in results] == [str(i).encode() * 100 for i in range(50)]
        await c.close()
    assert glue.opened == 1
    assert len(glue.records) == 50


async def test_upstream_stream_limit_queues_the_excess() -> None:
    release = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        await release.wait()
        return Reply(200, [], [seen.target.encode()])

    glue = h2_glue(handler=handler)
    glue_open = glue.open_upstream

    async def open_limited() -> object:
        stream = await glue_open()
        glue.server_conns[-1].settings = settings(max_concurrent_streams=2)
        return stream

    glue.open_upstream = open_limited  # type: ignore[method-assign,assignment]
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        tasks = [asyncio.ensure_future(c.request("GET", f"/q/{i}")) for i in range(6)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        assert [r.body for r in results] == [f"/q/{i}".encode() for i in range(6)]
        await c.close()


async def test_upstream_graceful_goaway_refuses_untaken_streams_and_reopens() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        assert (await c.request("GET", "/one")).status == 200
        server = glue.server_conns[0]
        server.conn.close_connection(last_stream_id=1)
        server.flush()
        await asyncio.sleep(0.01)
        r = await c.request("GET", "/two")
        assert r.status == 200
        await c.close()
    assert glue.opened == 2


async def test_client_graceful_goaway_lets_in_flight_streams_finish() -> None:
    hold = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        await hold.wait()
        return Reply(200, [], [b"late answer"])

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, task):
        c = H2Client(client)
        sid = await c.start("GET", "/wait", end=True)
        await asyncio.sleep(0.01)
        # h2 itself would close at once; send the frame by hand
        client.write(b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
        await asyncio.sleep(0.01)
        hold.set()
        r = await c.response(sid)
        assert (r.status, r.body) == (200, b"late answer")
        await asyncio.wait_for(task, TIMEOUT)  # then the connection ends
        await c.close()


async def test_expect_100_continue_is_forwarded() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [], [b"done"], informational=[103])

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("POST", "/e", [("expect", "100-continue")], b"body")
        assert (r.status, r.informational, r.body) == (200, [103], b"done")
        await c.close()
    assert glue.seen[0].header("expect") == "100-continue"


async def test_connect_gets_501() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = c.conn.get_next_available_stream_id()
        c.streams[sid] = ClientStream()
        c.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:443")],
                            end_stream=True)
        c.flush()
        r = await c.response(sid)
        assert r.status == 501
        await c.close()
    assert glue.records[0].failure == Failure.NOT_IMPLEMENTED


async def test_rapid_reset_flood_ends_the_connection() -> None:
    glue = h2_glue()
    async with waypoint(glue, Limits(h2_max_resets=100)) as (client, _, task):
        c = H2Client(client)
        for _ in range(200):
            sid = await c.start("GET", "/", end=True)
            c.reset(sid)
            if task.done() or c.closed:
                break
        await asyncio.wait_for(task, TIMEOUT)
        await c.wait_for(lambda: c.terminated is not None or c.closed)
        assert c.terminated is not None
        assert c.terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        await c.close()


async def test_client_disconnect_resets_upstream_streams() -> None:
    hold = asyncio.Event()

    async def handler(seen: Seen) -> Reply:
        await hold.wait()
        return Reply(200)

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, task):
        c = H2Client(client)
        sid = await c.start("POST", "/x")
        await c.send_body(sid, b"abc", end=False)
        await c.wait_for(lambda: bool(glue.server_conns) and bool(glue.server_conns[0].partial))
        client.abort()
        await asyncio.wait_for(task, TIMEOUT)
        server = glue.server_conns[0]
        await asyncio.wait_for(glue.servers[0], TIMEOUT)
        assert server.closed
        await c.close()
    assert glue.records[0].failure == Failure.CLIENT_RESET


async def test_upstream_connection_lost_before_the_response_gives_502() -> None:
    async def handler(seen: Seen) -> Reply:
        glue.upstreams[-1][1].abort()
        await asyncio.sleep(3600)
        raise AssertionError

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/")
        assert r.status == 502
        await c.close()
    assert glue.records[0].failure == Failure.UPSTREAM_RESET


async def test_engine_ends_cleanly_when_the_client_closes() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, task):
        c = H2Client(client)
        assert (await c.request("GET", "/")).status == 200
        client.close()
        await asyncio.wait_for(task, TIMEOUT)
        await c.close()
    near, _ = glue.upstreams[0]
    assert near.gone
    with pytest.raises(StreamReset):
        await near.drain()


async def test_settings_advertised_to_the_client() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        assert (await c.request("GET", "/")).status == 200
        remote = c.conn.remote_settings
        assert remote[SettingCodes.MAX_CONCURRENT_STREAMS] == 100
        assert remote[SettingCodes.INITIAL_WINDOW_SIZE] == Limits().h2_stream_window
        assert remote[SettingCodes.MAX_HEADER_LIST_SIZE] == Limits().h2_header_cap
        await c.close()


async def test_request_body_waits_for_a_slow_upstream_open_within_the_window() -> None:
    gate = asyncio.Event()
    glue = h2_glue(open_gate=gate)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("POST", "/slow-dial")
        sending = asyncio.ensure_future(c.send_body(sid, b"b" * (MIB // 2), end=True))
        await asyncio.sleep(0.05)
        # nothing acknowledged while there is nowhere to send it: the window stops the client
        assert not sending.done()
        assert c.conn.local_flow_control_window(sid) == 0
        gate.set()
        await asyncio.wait_for(sending, TIMEOUT)
        r = await c.response(sid)
        assert (r.status, len(r.body)) == (200, MIB // 2)
        await c.close()


async def test_local_answer_waits_for_a_zero_window() -> None:
    glue = h2_glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client, settings=settings(initial_window_size=0))
        await asyncio.sleep(0.01)
        sid = await c.start("GET", "/admin", end=True)
        await asyncio.sleep(0.01)
        st = c.streams[sid]
        assert st.status == 403 and not st.ended  # the head went, the body waits for credit
        c.conn.increment_flow_control_window(100, stream_id=sid)
        c.flush()
        r = await c.response(sid)
        assert r.body == b"RBAC: access denied"
        await c.close()
    assert glue.records[0].status == 403


async def test_response_head_over_the_limit_gets_502() -> None:
    async def handler(seen: Seen) -> Reply:
        return Reply(200, [("x-huge", "h" * 5000)], [b"x"])

    glue = h2_glue(handler=handler)
    async with waypoint(glue, Limits(max_response_header_bytes=4 * KIB)) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/")
        assert r.status == 502
        await c.close()
    assert glue.records[0].failure == Failure.UPSTREAM_PROTOCOL


async def test_upstream_connection_lost_mid_response_resets_the_stream() -> None:
    async def handler(seen: Seen) -> Reply:
        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            await asyncio.sleep(0.01)
            glue.upstreams[-1][1].abort()
            await asyncio.sleep(3600)
        return Reply(200, [], body)

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "/")
        assert (r.status, r.body, r.reset) == (200, b"partial", ErrorCodes.INTERNAL_ERROR)
        assert (await c.request("GET", "/next")).status == 200  # a new upstream connection
        await c.close()
    assert glue.opened == 2
    assert glue.records[0].failure == Failure.UPSTREAM_RESET


async def test_early_complete_response_stops_the_request_body() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        sid = await c.start("POST", "/upload")
        await c.send_body(sid, b"x" * 1000, end=False)
        server = await _server(glue)
        await server.wait_for(lambda: 1 in server.partial)
        # the server answers before the request ends, then says "stop sending"
        server.conn.send_headers(1, [(b":status", b"413")], end_stream=True)
        server.conn.reset_stream(1, ErrorCodes.NO_ERROR)
        server.flush()
        r = await c.response(sid)
        assert r.status == 413
        await c.wait_for(lambda: c.streams[sid].reset is not None)
        assert c.streams[sid].reset == ErrorCodes.NO_ERROR
        assert (await c.request("GET", "/next")).status == 200
        await c.close()
    assert glue.records[0].status == 413
    assert glue.records[0].failure is None


async def test_denied_request_body_is_counted_and_dropped() -> None:
    glue = h2_glue(decide=deny_admin)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("POST", "/admin", body=b"z" * 300_000)
        assert r.status == 403
        # the dropped body gave its credit back: the connection still carries data
        r = await c.request("POST", "/ok", body=b"y" * 300_000)
        assert (r.status, len(r.body)) == (200, 300_000)
        await c.close()


async def _server(glue: Glue) -> H2Server:
    for _ in range(100):
        if glue.server_conns:
            server: H2Server = glue.server_conns[0]
            return server
        await asyncio.sleep(0.01)
    raise AssertionError("no upstream connection")


async def test_head_and_trailers_only_responses() -> None:
    async def handler(seen: Seen) -> Reply:
        if seen.method == "HEAD":
            return Reply(200, [("content-length", "11")])
        # gRPC "Trailers-Only": one HEADERS frame with END_STREAM
        return Reply(200, [("content-type", "application/grpc"), ("grpc-status", "5")])

    glue = h2_glue(handler=handler)
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("HEAD", "/doc")
        assert (r.status, r.header("content-length"), r.body) == (200, "11", b"")
        r = await c.request("POST", "/pkg.Svc/Missing", [("content-type", "application/grpc")], b"\x00")
        assert (r.status, r.header("grpc-status"), r.body) == (200, "5", b"")
        await c.close()


async def test_absolute_form_path_is_refused() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        r = await c.request("GET", "http://svc/x")
        assert r.status == 400
        assert b"origin-form" in r.body
        await c.close()


async def test_431_also_before_the_client_acknowledged_our_settings() -> None:
    """The decoder's hard cap holds from the first byte (h2's DEFAULT_MAX_HEADER_LIST_SIZE knob,
    waypoint/h2side.py): a 100 KB header list in the client's first flight gets 431, not GOAWAY."""
    import h2.events as h2e
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"),
                              (b":path", b"/"), (b"x-big", b"v" * 100_000)], end_stream=True)
        client.write(conn.data_to_send())  # all before reading anything from the waypoint
        status = None
        while status is None:
            data = await asyncio.wait_for(client.read(65536), TIMEOUT)
            assert data, "the waypoint closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2e.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                assert not isinstance(event, h2e.ConnectionTerminated), event
    assert status == b"431"


async def test_head_timeout_closes_idle_connections_and_stalled_request_bodies() -> None:
    # review 14: HTTP/2 had no idle or head timeout: a preface then silence, or HEADERS whose
    # body never comes, held the connection (and a gateway's memory) for ever
    glue = h2_glue()
    async with waypoint(glue, Limits(head_timeout=0.3)) as (client, _, task):
        c = H2Client(client)  # preface and SETTINGS, then nothing
        await asyncio.wait_for(asyncio.shield(task), TIMEOUT)  # the engine closed it
        await c.close()
    glue = h2_glue()
    async with waypoint(glue, Limits(head_timeout=0.3)) as (client, _, task):
        c = H2Client(client)
        assert (await c.request("POST", "/up", body=b"x" * 100)).status == 200  # a body that comes
        sid = await c.start("POST", "/slow")  # and one that does not
        r = await c.response(sid)
        assert r.status == 408 and b"no request data" in r.body
        await asyncio.wait_for(asyncio.shield(task), TIMEOUT)  # then no stream is open: closed
        await c.close()
    assert [r.status for r in glue.records] == [200, 408] and glue.records[1].failure is Failure.CLIENT_RESET


async def test_the_request_says_whether_a_body_follows() -> None:
    glue = h2_glue()
    async with waypoint(glue) as (client, _, _task):
        c = H2Client(client)
        assert (await c.request("POST", "/body", body=b"x")).status == 200
        assert (await c.request("GET", "/none")).status == 200
        await c.close()
    assert [(r.path, r.has_body) for r in glue.requests] == [("/body", True), ("/none", False)]
    glue = Glue()
    async with waypoint(glue) as (client, _, _task):
        h1 = H1Client(client)
        assert (await h1.request("POST", "/body", body=b"x")).status == 200
        assert (await h1.request("GET", "/none")).status == 200
    assert [(r.path, r.has_body) for r in glue.requests] == [("/body", True), ("/none", False)]
