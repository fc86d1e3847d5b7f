"""waypoint.telemetry.Tracing without an exporter: the trace context goes on as the SDK would
carry it, and nothing is recorded."""

from __future__ import annotations

from waypoint.telemetry import RequestFacts, Tracing

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _parts(header: str) -> list[str]:
    return header.split("-")


def test_a_request_traceparent_is_continued_with_a_new_span_id() -> None:
    t = Tracing("waypoint test")
    span = t.start("GET /", {"traceparent": PARENT, "tracestate": "congo=t61rcWkgMzE"}, {"a": 1})
    out = dict(t.outgoing(span))
    version, trace_id, span_id, flags = _parts(out["traceparent"])
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id != "b7ad6b7169203331" and len(span_id) == 16
    assert out["tracestate"] == "congo=t61rcWkgMzE"
    assert t.trace_id(span) == trace_id
    assert not span.is_recording()
    Tracing.finish(span, RequestFacts(method="GET", authority="a", path="/"))  # a no-op, no error


def test_an_unsampled_parent_stays_unsampled_and_a_new_trace_is_sampled() -> None:
    t = Tracing("waypoint test")
    unsampled = dict(t.outgoing(t.start("GET /", {"traceparent": PARENT[:-2] + "00"}, {})))
    assert _parts(unsampled["traceparent"])[3] == "00"
    fresh = dict(t.outgoing(t.start("GET /", {}, {})))
    _, trace_id, span_id, flags = _parts(fresh["traceparent"])
    assert flags == "03" and int(trace_id, 16) and int(span_id, 16)  # sampled, random trace id
    other = dict(t.outgoing(t.start("GET /", {"traceparent": "garbage"}, {})))
    assert _parts(other["traceparent"])[1] != trace_id  # a malformed parent starts a new trace


def test_reserved_trace_flags_are_not_passed_on() -> None:
    # review 16: a parent's `-ff` went out as `-ff`; the SDK sends only the bits it knows
    t = Tracing("waypoint test")
    out = dict(t.outgoing(t.start("GET /", {"traceparent": PARENT[:-2] + "ff"}, {})))
    assert _parts(out["traceparent"])[3] == "03"
    sdk = Tracing("waypoint test")
    sdk.exporting = True  # the SDK's own path (no exporter attached): the same flags
    for parent in (PARENT[:-2] + "ff", PARENT, PARENT[:-2] + "00"):
        mine = _parts(dict(t.outgoing(t.start("GET /", {"traceparent": parent}, {})))["traceparent"])[3]
        theirs = _parts(dict(sdk.outgoing(sdk.start("GET /", {"traceparent": parent}, {})))["traceparent"])[3]
        assert mine == theirs, parent
