"""RateLimitPolicy (gateway/ratelimit.py): token buckets by the clock, several limits at once, the
IETF draft's headers; and the CORS filter's answers (gateway/cors.py)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
import yaml

from ambit.cluster import Meta, RouteObject
from gateway.cors import is_preflight, origin_allowed, preflight, response_headers
from gateway.decide import _key
from gateway.ratelimit import Limit, RateLimiter, compile_rate_limit
from gateway.routes import Cors
from gateway.spec import SpecError


def policy(spec: str) -> Any:
    return compile_rate_limit(RouteObject("RateLimitPolicy", "ambit.dev/v1alpha1", Meta("rl", "edge"),
                                          yaml.safe_load(spec)))


LIMITS = policy("""
targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: orders}]
limits:
- {name: minute, requests: 100, period: 60s, burst: 20}
- {name: hour, requests: 1000, period: 1h, key: {type: Header, header: X-Api-Key}}
""")


def test_compile() -> None:
    m, h = LIMITS.limits
    assert (m.requests, m.period, m.burst, m.key_type) == (100, 60.0, 20, "ClientIP")
    assert (h.burst, h.key_type, h.key_name) == (1000, "Header", "x-api-key")
    assert LIMITS.applies(("edge", "gw"), "edge/orders") and not LIMITS.applies(("edge", "gw"), "edge/other")
    assert m.describe() == '100;w=60;burst=20;name="minute"'


@pytest.mark.parametrize(("spec", "field"), [
    ("limits: [{requests: 1, period: 1s}]", "spec.targetRefs"),
    ("targetRefs: [{kind: Service, name: x}]\nlimits: [{requests: 1, period: 1s}]", "spec.targetRefs[0].kind"),
    ("targetRefs: [{kind: Gateway, name: g}]\nlimits: [{requests: 1}]", "spec.limits[0].period"),
    ("targetRefs: [{kind: Gateway, name: g}]\nlimits: [{requests: 0, period: 1s}]", "spec.limits[0].requests"),
    ("targetRefs: [{kind: Gateway, name: g}]\nlimits: [{requests: 1, period: 1s, key: {type: Claim}}]",
     "spec.limits[0].key.claim"),
    ("targetRefs: [{kind: Gateway, name: g}]\nlimits: [{requests: 1, period: 1s, per: ip}]", "spec.limits[0].per"),
])
def test_errors_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(SpecError) as e:
        policy(spec)
    assert str(e.value).startswith(f"RateLimitPolicy edge/rl: {field}:"), str(e.value)


def test_a_bucket_holds_burst_and_refills_at_the_rate() -> None:
    lim = Limit("edge/rl", 0, "minute", 100, 60.0, 20, "ClientIP")
    rl = RateLimiter()
    t = 0.0
    got = [rl.check([(lim, "a")], t).allowed for _ in range(21)]
    assert got == [True] * 20 + [False]
    refused = rl.check([(lim, "a")], t)
    assert refused.retry_after == 1 and dict(refused.headers)["ratelimit-remaining"] == "0"
    assert rl.check([(lim, "b")], t).allowed, "another key has its own bucket"
    t += 0.6  # 100 per minute: one token every 0.6 s
    assert rl.check([(lim, "a")], t).allowed and not rl.check([(lim, "a")], t).allowed
    t += 60
    ok = rl.check([(lim, "a")], t)
    assert ok.allowed and dict(ok.headers)["ratelimit-remaining"] == "19"


def test_every_limit_must_have_a_token_and_a_refusal_takes_none() -> None:
    fast = Limit("p", 0, "second", 2, 1.0, 2, "ClientIP")
    slow = Limit("p", 1, "minute", 3, 60.0, 3, "ClientIP")
    rl = RateLimiter()
    both = [(fast, "k"), (slow, "k")]
    assert [rl.check(both, 0.0).allowed for _ in range(3)] == [True, True, False]
    out = rl.check(both, 1.0)  # the second refilled; the minute has one left
    assert out.allowed and dict(out.headers)["ratelimit-limit"] == "3"
    no = rl.check(both, 2.0)
    assert not no.allowed and no.denied_by == slow and no.retry_after == 18
    assert rl.check([(fast, "k")], 2.0).allowed, "the refused request took no token of the other limit"


def test_buckets_are_bounded() -> None:
    lim = Limit("p", 0, "x", 1, 60.0, 1, "ClientIP")
    rl = RateLimiter(max_keys=100)
    for i in range(1000):
        rl.check([(lim, str(i))], 0.0)
    assert len(rl) == 100
    rl.forget(set())
    assert len(rl) == 0


SHOP = Cors(("https://shop.example.com", "https://*.partner.example"), ("GET", "POST"), ("authorization",),
            ("x-request-id",), 600, True)


def test_cors_origins() -> None:
    assert origin_allowed(SHOP, "https://shop.example.com") and origin_allowed(SHOP, "HTTPS://Shop.Example.com/")
    assert origin_allowed(SHOP, "https://a.partner.example") and not origin_allowed(SHOP, "https://partner.example")
    assert not origin_allowed(SHOP, "http://shop.example.com") and not origin_allowed(SHOP, "https://evil.example")
    assert origin_allowed(Cors(("*",)), "https://anything.test")


def test_cors_preflight_and_response_headers() -> None:
    ask = {"origin": "https://shop.example.com", "access-control-request-method": "POST",
           "access-control-request-headers": "Authorization"}
    assert is_preflight("OPTIONS", ask) and not is_preflight("GET", ask)
    ok = preflight(SHOP, ask)
    h = dict(ok.headers)
    assert ok.status == 204 and h["access-control-allow-origin"] == "https://shop.example.com"
    assert h["access-control-allow-credentials"] == "true" and h["access-control-allow-methods"] == "GET, POST"
    assert preflight(SHOP, {**ask, "access-control-request-headers": "x-other"}).status == 403
    assert preflight(SHOP, {**ask, "access-control-request-method": "PUT"}).status == 403
    no = preflight(SHOP, {**ask, "origin": "https://evil.example"})
    assert no.status == 403 and not any(n.startswith("access-control") for n, _ in no.headers)
    assert dict(response_headers(SHOP, "https://shop.example.com"))["access-control-expose-headers"] == "x-request-id"
    assert response_headers(SHOP, "https://evil.example") == (("vary", "Origin"),)


def test_bucket_keys_are_digests_not_client_values() -> None:
    # review 14: header-keyed buckets held whole header values: 2,000 distinct 60 KiB
    # x-api-key values kept 118 MiB (at MAX_KEYS, ~5.7 GiB)
    lim = Limit("orders/rl", 0, "per-key", 10, 60.0, 10, "Header", "x-api-key")
    rl = RateLimiter()
    n, size = 2000, 60 * 1024
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            rl.check([(lim, f"header:{i:08d}" + "A" * size)], float(i))
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(rl) == n and used < n * 1024, f"{used} bytes for {n} buckets"


def test_a_full_bucket_is_dropped_before_a_drained_one() -> None:
    # dropping a partly drained bucket gives its client a fresh burst
    hourly = Limit("p", 0, "hourly", 1, 3600.0, 1, "ClientIP")
    fast = Limit("p", 1, "fast", 10, 1.0, 1, "ClientIP")
    rl = RateLimiter(max_keys=2)
    assert rl.check([(hourly, "greedy")], 0.0).allowed  # drained for an hour
    assert rl.check([(fast, "b")], 0.5).allowed  # full again 0.1 s later
    assert rl.check([(fast, "c")], 1.0).allowed  # one must go: b is full, greedy (the oldest) is not
    assert not rl.check([(hourly, "greedy")], 1.0).allowed, "greedy's limit held"
    assert len(rl) == 2


def test_claim_keys_name_their_issuer() -> None:
    lim = Limit("p", 0, "x", 1, 60.0, 1, "Claim", "sub")
    a = _key(lim, "10.0.0.1", {"iss": "https://a.example", "sub": "alice"}, {})
    b = _key(lim, "10.0.0.1", {"iss": "https://b.example", "sub": "alice"}, {})
    assert a != b and "alice" in a
    rl = RateLimiter()
    assert rl.check([(lim, a)], 0.0).allowed and rl.check([(lim, b)], 0.0).allowed
