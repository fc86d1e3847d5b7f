"""Rate limits: `RateLimitPolicy` (`ambit.dev/v1alpha1`) compiled, and token buckets per key. Pure
(the clock is an argument).

The policy follows Gateway API's policy attachment: `targetRefs` name the Gateway (every
request through it) or HTTPRoutes (the requests they route), in the policy's namespace.

```yaml
apiVersion: ambit.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: orders, namespace: edge}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: orders}]
  limits:
  - {name: per-user, requests: 100, period: 60s, burst: 20, key: {type: Claim, claim: sub}}
  - {requests: 1000, period: 1h}            # key: the client's address (the default)
```

Each limit is a token bucket per key: it holds `burst` tokens (default: `requests`), is
refilled at `requests` per `period`, and a request takes one. Keys: `ClientIP` (the
address the gateway judged the client by), `Claim` (a claim of the request's verified
JWT) or `Header` (a request header); a request without the claim or header is keyed by
its client address. A request passes only when every limit that applies to it has a
token; it then takes one from each (a refused request takes none). Over a limit: 429 with
`Retry-After` and the IETF draft's `RateLimit-*` fields, which allowed responses carry
too (of the limit with the fewest requests left).

Buckets live in the gateway process: a limit holds per replica (see docs/gateway.md for
what a limit shared by replicas would take). A bucket is keyed by a 16-byte BLAKE2b digest
of its key (a header or claim value is the client's to make long), and a claim's key
names its issuer (two issuers' `sub: alice` are two clients). Beyond `max_keys` buckets
one is dropped for each new key: a full one (the same as none) among the least recently
used when there is one; else the least recently used, which resets that client's limit
(it gets a full bucket again): a flood of more distinct keys than `max_keys` within a
refill period weakens the limits of the keys it pushes out.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ambit.cluster import RouteObject
from gateway.spec import Where

KEY_TYPES = ("ClientIP", "Claim", "Header")
GATEWAY_GROUP = "gateway.networking.k8s.io"
MAX_KEYS = 100_000


@dataclass(frozen=True)
class Limit:
    policy: str  # ns/name
    index: int
    name: str
    requests: int
    period: float  # seconds
    burst: int  # the bucket's size
    key_type: str  # ClientIP | Claim | Header
    key_name: str = ""  # the claim or header

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.requests / self.period

    @property
    def ref(self) -> str:
        return f"{self.policy} limit {self.name}"

    def describe(self) -> str:
        """`100;w=60;burst=20` (the draft's RateLimit-Policy item)."""
        burst = f";burst={self.burst}" if self.burst != self.requests else ""
        return f"{self.requests};w={self.period:g}{burst};name=\"{self.name}\""


@dataclass(frozen=True)
class CompiledRateLimit:
    namespace: str
    name: str
    targets: tuple[tuple[str, str], ...]  # (Gateway | HTTPRoute, name), in the policy's namespace
    limits: tuple[Limit, ...]

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    def applies(self, gateway: tuple[str, str], route: str | None) -> bool:
        """To a request through `gateway` (ns, name) routed by `route` ("ns/name", or None)."""
        for kind, name in self.targets:
            if kind == "Gateway" and (self.namespace, name) == gateway:
                return True
            if kind == "HTTPRoute" and route == f"{self.namespace}/{name}":
                return True
        return False


def compile_rate_limit(obj: RouteObject) -> CompiledRateLimit:
    ns, name = obj.meta.namespace, obj.meta.name
    w = Where("RateLimitPolicy", ns, name)
    spec = w.mapping("spec", obj.spec, allowed=("targetRefs", "limits"))
    targets = []
    for i, t in enumerate(w.list("spec.targetRefs", spec.get("targetRefs"))):
        path = f"spec.targetRefs[{i}]"
        tm = w.mapping(path, t, allowed=("group", "kind", "name", "namespace"))
        kind = w.enum(f"{path}.kind", tm.get("kind"), ("Gateway", "HTTPRoute"), "")
        if tm.get("group", GATEWAY_GROUP) != GATEWAY_GROUP:
            raise w.error(f"{path}.group", f"must be {GATEWAY_GROUP}")
        if tm.get("namespace") not in (None, ns):
            raise w.error(f"{path}.namespace", f"must be the policy's own namespace {ns!r}")
        targets.append((kind, str(w.string(f"{path}.name", tm.get("name"), required=True))))
    if not targets:
        raise w.error("spec.targetRefs", "is required: a Gateway or HTTPRoutes")
    limits = []
    names: set[str] = set()
    for i, raw in enumerate(w.list("spec.limits", spec.get("limits"))):
        path = f"spec.limits[{i}]"
        lm = w.mapping(path, raw, allowed=("name", "requests", "period", "burst", "key"))
        lname = w.string(f"{path}.name", lm.get("name")) or f"limit-{i}"
        if lname in names:
            raise w.error(f"{path}.name", f"{lname!r} is used twice")
        names.add(lname)
        requests = w.integer(f"{path}.requests", lm.get("requests"), lo=1, hi=10**9)
        period = w.duration(f"{path}.period", lm.get("period"))
        if not period:
            raise w.error(f"{path}.period", "is required (e.g. 1s, 60s, 1h) and must be more than 0")
        burst = w.integer(f"{path}.burst", lm.get("burst"), lo=1, hi=10**9, default=requests)
        km = w.mapping(f"{path}.key", lm.get("key"), allowed=("type", "claim", "header"))
        ktype = w.enum(f"{path}.key.type", km.get("type"), KEY_TYPES, "ClientIP")
        kname = ""
        if ktype == "Claim":
            kname = str(w.string(f"{path}.key.claim", km.get("claim"), required=True))
        elif ktype == "Header":
            kname = str(w.string(f"{path}.key.header", km.get("header"), required=True)).lower()
        limits.append(Limit(f"{ns}/{name}", i, lname, requests, period, burst, ktype, kname))
    if not limits:
        raise w.error("spec.limits", "is required: at least one limit")
    return CompiledRateLimit(ns, name, tuple(targets), tuple(limits))


EVICTION_SCAN = 64  # least recently used buckets looked at for a full one to drop


def bucket_key(key: str) -> bytes:
    """The 16 bytes a bucket is kept under: a digest, never the (client-sized) key itself."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()


@dataclass
class _Bucket:
    tokens: float
    updated: float
    burst: float
    rate: float

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.burst


@dataclass(frozen=True)
class Outcome:
    """One request against the limits that apply to it."""

    allowed: bool
    denied_by: Limit | None = None
    retry_after: int = 0  # seconds (for Retry-After)
    headers: tuple[tuple[str, str], ...] = ()  # RateLimit-* (empty: no limit applied)


class RateLimiter:
    """Token buckets by (limit, key); one per gateway process."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._buckets: OrderedDict[tuple[str, int, bytes], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, limits: Sequence[tuple[Limit, str]], now: float) -> Outcome:
        """Take a token from every (limit, key) bucket, or from none when one is empty."""
        if not limits:
            return Outcome(True)
        state = []
        for limit, key in limits:
            b = self._bucket(limit, key, now)
            b.tokens = min(float(limit.burst), b.tokens + (now - b.updated) * limit.rate)
            b.updated = now
            state.append((limit, b))
        empty = [(limit, b) for limit, b in state if b.tokens < 1.0]
        if empty:
            limit, b = max(empty, key=lambda lb: (1.0 - lb[1].tokens) / lb[0].rate)
            wait = (1.0 - b.tokens) / limit.rate
            return Outcome(False, limit, max(1, math.ceil(wait)),
                           _headers(state, limit, 0, wait))
        for _, b in state:
            b.tokens -= 1.0
        limit, b = min(state, key=lambda lb: lb[1].tokens)
        return Outcome(True, headers=_headers(state, limit, int(b.tokens), (limit.burst - b.tokens) / limit.rate))

    def _bucket(self, limit: Limit, key: str, now: float) -> _Bucket:
        k = (limit.policy, limit.index, bucket_key(key))
        b = self._buckets.get(k)
        if b is None:
            while len(self._buckets) >= self.max_keys:
                self._evict(now)
            b = self._buckets[k] = _Bucket(float(limit.burst), now, float(limit.burst), limit.rate)
        else:
            self._buckets.move_to_end(k)
        return b

    def _evict(self, now: float) -> None:
        """Drop a full bucket among the least recently used (nothing is lost), else the least
        recently used (its client's limit starts over)."""
        for i, (k, b) in enumerate(self._buckets.items()):
            if i >= EVICTION_SCAN:
                break
            if b.full(now):
                del self._buckets[k]
                return
        self._buckets.popitem(last=False)

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of limits no longer in force (`keep`: the policies' "ns/name")."""
        for k in [k for k in self._buckets if k[0] not in keep]:
            del self._buckets[k]


def _headers(state: Sequence[tuple[Limit, _Bucket]], tightest: Limit, remaining: int,
             reset: float) -> tuple[tuple[str, str], ...]:
    return (
        ("ratelimit-limit", str(tightest.requests)),
        ("ratelimit-remaining", str(max(0, remaining))),
        ("ratelimit-reset", str(max(0, math.ceil(reset)))),
        ("ratelimit-policy", ", ".join(limit.describe() for limit, _ in state)),
    )
