"""CertManager on virtual time: half-life renewal, jittered backoff, old cert kept, forgetting, fail closed."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import grpc
import pytest
from cryptography import x509

from ambit.spiffe import SpiffeId
from controlplane.pki import CaMaterial, cert_pem
from ztunnel.identity.caclient import CaError
from ztunnel.identity.manager import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    PROBE_INTERVAL,
    CertManager,
    CertNotReady,
    backoff_delay,
)

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
A = SpiffeId("cluster.local", "shop", "frontend")
B = SpiffeId("cluster.local", "shop", "backend")
TTL = 3600


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeCa:
    """Signs with a real CaMaterial at the fake clock's time; can be switched to fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.material = CaMaterial.generate(now=dt.datetime.fromtimestamp(T0 - 86400, dt.UTC))
        self.fail = False
        self.calls: list[tuple[float, SpiffeId]] = []

    async def create_certificate(self, csr_pem: str, ttl_seconds: int) -> list[str]:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert len(uris) == 1 and csr.is_signature_valid
        ident = SpiffeId.parse(uris[0])
        self.calls.append((self.clock.now, ident))
        if self.fail:
            raise CaError("CA 127.0.0.1:1: UNAVAILABLE: down", grpc.StatusCode.UNAVAILABLE)
        now = dt.datetime.fromtimestamp(self.clock.now, dt.UTC)
        chain = self.material.sign_leaf(csr.public_key(), ident, dt.timedelta(seconds=ttl_seconds), now=now)
        return [cert_pem(c).decode() for c in chain]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(clock: Clock) -> FakeCa:
    return FakeCa(clock)


def manager(ca: FakeCa, clock: Clock, seed: int = 7) -> CertManager:
    return CertManager(ca, clock=clock, ttl_seconds=TTL, rng=random.Random(seed), bundle=ca.material.bundle)


async def test_get_fetches_verifies_and_caches(ca: FakeCa, clock: Clock) -> None:
    m = manager(ca, clock)
    cert = await m.get(A)
    assert cert.identity == A
    assert len(cert.chain) == 2  # leaf + intermediate, no root
    assert cert.leaf.public_key().public_numbers() == cert.key.public_key().public_numbers()  # type: ignore[union-attr]
    assert b"PRIVATE KEY" in cert.key_pem() and cert.chain_pem().count(b"BEGIN CERTIFICATE") == 2
    assert await m.get(A) is cert
    assert len(ca.calls) == 1
    await m.close()


async def test_renews_at_half_life_with_a_new_key(ca: FakeCa, clock: Clock) -> None:
    m = manager(ca, clock)
    m.track([A])
    nxt = await m.run_once()
    first = m.current(A)
    assert first is not None
    assert nxt == pytest.approx(first.renewal_time())
    # The CA backdates notBefore by 5 minutes; half-life is measured from receipt.
    half = T0 + (first.not_after.timestamp() - T0) / 2
    assert first.renewal_time() == pytest.approx(half)
    clock.now = half - 1
    await m.run_once()
    assert len(ca.calls) == 1
    clock.now = half
    await m.run_once()
    second = m.current(A)
    assert len(ca.calls) == 2 and second is not None
    assert second.serial != first.serial
    assert second.key is not first.key
    await m.close()


async def test_backoff_sequence_on_ca_failure(ca: FakeCa, clock: Clock) -> None:
    m = manager(ca, clock)
    ca.fail = True
    m.track([A])
    delays = []
    for _ in range(14):
        before = clock.now
        nxt = await m.run_once()
        assert nxt is not None
        delays.append(nxt - before)
        clock.now = nxt
    bases = [min(BACKOFF_MAX, BACKOFF_MIN * 2**i) for i in range(14)]
    for d, base in zip(delays, bases, strict=True):
        assert max(BACKOFF_MIN, base * 0.8) - 1e-9 <= d <= min(BACKOFF_MAX, base * 1.2) + 1e-9
    assert delays[-1] <= BACKOFF_MAX and delays[-1] >= BACKOFF_MAX * 0.8
    assert len(set(delays)) > 5  # jittered, not a fixed schedule
    assert m.status()[0]["state"] == "backoff" and "UNAVAILABLE" in str(m.status()[0]["last_error"])
    # Recovery resets the backoff.
    ca.fail = False
    await m.run_once()
    assert m.current(A) is not None and m.status()[0]["last_error"] is None
    await m.close()


def test_backoff_delay_bounds() -> None:
    rng = random.Random(1)
    for failures in range(1, 40):
        d = backoff_delay(failures, rng)
        assert BACKOFF_MIN <= d <= BACKOFF_MAX


async def test_old_cert_serves_until_expiry_then_fails_closed(ca: FakeCa, clock: Clock) -> None:
    m = manager(ca, clock)
    m.track([A])
    await m.run_once()
    cert = m.current(A)
    assert cert is not None
    ca.fail = True
    clock.now = cert.renewal_time()
    await m.run_once()  # renewal fails
    assert m.current(A) is cert
    assert await m.get(A, timeout=0.05) is cert
    clock.now = cert.not_after.timestamp() + 1
    assert m.current(A) is None
    with pytest.raises(CertNotReady, match="UNAVAILABLE"):
        await m.get(A, timeout=0.05)
    assert m.status()[0]["state"] in ("expired", "fetching")
    await m.close()


async def test_forgets_untracked_identities(ca: FakeCa, clock: Clock) -> None:
    m = manager(ca, clock)
    m.track([A, B])
    await m.run_once()
    assert m.current(A) and m.current(B)
    m.track([B])
    assert m.current(A) is None
    assert m.tracked() == [B]
    assert [r["identity"] for r in m.status()] == [B.uri]
    clock.now += TTL  # past B's half-life: only B is renewed
    ca.calls.clear()
    await m.run_once()
    assert [c[1] for c in ca.calls] == [B]
    await m.close()


async def test_get_fails_closed_when_ca_refuses(ca: FakeCa, clock: Clock) -> None:
    ca.fail = True
    m = manager(ca, clock)
    with pytest.raises(CertNotReady, match="no valid certificate after"):
        await m.get(A, timeout=0.1)
    await m.close()
    with pytest.raises(CertNotReady, match="closed"):
        await m.get(A)


async def test_rejects_a_certificate_for_another_identity(clock: Clock) -> None:
    class LyingCa(FakeCa):
        async def create_certificate(self, csr_pem: str, ttl_seconds: int) -> list[str]:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
            now = dt.datetime.fromtimestamp(self.clock.now, dt.UTC)
            chain = self.material.sign_leaf(csr.public_key(), B, dt.timedelta(hours=1), now=now)
            return [cert_pem(c).decode() for c in chain]

    liar = LyingCa(clock)
    m = manager(liar, clock)
    m.track([A])
    await m.run_once()
    assert m.current(A) is None
    assert "issued spiffe://cluster.local/ns/shop/sa/backend when asked for" in str(m.status()[0]["last_error"])
    await m.close()


async def test_run_loop_with_injected_sleep(ca: FakeCa, clock: Clock) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        clock.now += delay
        if len(slept) >= 3:
            await m.close()
        await asyncio.sleep(0)

    m = CertManager(ca, clock=clock, ttl_seconds=TTL, rng=random.Random(3), sleep=fake_sleep, bundle=ca.material.bundle)
    m.track([A])
    await asyncio.wait_for(m.run(), 5)
    # Each sleep is until the half-life of the current certificate; 3 issuances happened.
    assert len(ca.calls) == 3
    assert all(TTL / 2 - 400 < d <= TTL / 2 + 1 for d in slept)


class ProbedCa(FakeCa):
    """A FakeCa that also answers the manager's reachability probe."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.probes = 0

    async def reachable(self, timeout: float) -> bool:
        self.probes += 1
        return not self.fail


async def test_identities_in_backoff_are_retried_as_soon_as_the_ca_answers(clock: Clock) -> None:
    """After a long outage the backoff is minutes; a CA that answers a probe ends the wait."""
    ca = ProbedCa(clock)
    slept: list[float] = []
    m = CertManager(ca, clock=clock, ttl_seconds=TTL, rng=random.Random(5), bundle=ca.material.bundle,
                    sleep=lambda d: _advance(clock, slept, d))
    ca.fail = True
    m.track([A])
    for _ in range(9):  # a long outage: the backoff grows past a minute
        clock.now = max(clock.now, m._entries[A].next_attempt)
        await m.run_once()
    assert m._entries[A].next_attempt - clock.now > 60
    outage_calls = len(ca.calls)
    ca.fail = False  # the CA is back; its probe says so long before the backoff ends
    runner = asyncio.ensure_future(m.run())
    for _ in range(200):
        if m.current(A) is not None:
            break
        await asyncio.sleep(0)
    runner.cancel()
    await m.close()
    assert len(ca.calls) == outage_calls + 1 and ca.probes >= 1
    assert sum(slept) <= 2 * PROBE_INTERVAL, f"waited {sum(slept):.0f}s of virtual time for a CA that was back"


async def _advance(clock: Clock, slept: list[float], delay: float) -> None:
    slept.append(delay)
    clock.now += delay
    await asyncio.sleep(0)


async def test_a_short_ttl_renews_at_half_of_what_is_left_not_at_once(ca: FakeCa, clock: Clock) -> None:
    """A 60 s certificate backdated by 5 minutes: half of its own validity window lies in the
    past, which made the manager renew it again and again. Half of what is left: 30 s."""
    m = CertManager(ca, clock=clock, ttl_seconds=60, rng=random.Random(1), bundle=ca.material.bundle)
    m.track([A])
    nxt = await m.run_once()
    cert = m.current(A)
    assert cert is not None and cert.not_before.timestamp() < T0 - 200
    assert nxt == pytest.approx(T0 + 30)
    await m.run_once()
    assert len(ca.calls) == 1, "renewed before its time"
    await m.close()
