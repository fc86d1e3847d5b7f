"""Workload certificates of the ztunnel: keys, CSRs, cache, renewal and retry.

For every tracked identity the manager generates an ECDSA P-256 key locally
(a fresh one per issuance; keys never leave the process), asks the CA for an
X.509-SVID, verifies what comes back, and renews at half of the certificate's
lifetime. On CA failure it retries with jittered exponential backoff (0.5 s
doubling to 150 s) while the old certificate keeps serving until it expires;
while identities wait in backoff it probes the CA every few seconds (when the
CA client can), and retries them at once when the CA answers again, so a long
outage does not leave them waiting out a backoff of minutes.
`get()` fails closed: after a bounded wait it raises CertNotReady, never
returns an expired or foreign certificate. Clock and sleep are injected so
tests run on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.spiffe import SpiffeId
from ambit.svid import SvidError, TrustBundle, check_leaf, verify_svid
from ambit.tasks import TaskSet
from ztunnel.identity import IdentityError

log = logging.getLogger("ambit.identity")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 150.0
BACKOFF_JITTER = 0.2  # each delay is its base +-20%, then clamped to [BACKOFF_MIN, BACKOFF_MAX]
PROBE_INTERVAL = 2.0  # how often a CA in outage is probed while identities wait in backoff


class CaClientLike(Protocol):
    async def create_certificate(self, csr_pem: str, ttl_seconds: int) -> list[str]: ...


class ProbingCa(CaClientLike, Protocol):
    async def reachable(self, timeout: float) -> bool:
        """True when the CA answers now (cheap: no certificate is issued)."""
        ...


class CertNotReady(IdentityError):
    """No valid certificate for an identity within the wait: the connection must fail closed."""


@dataclass(frozen=True)
class WorkloadCert:
    """An issued X.509-SVID and its private key; `chain` is leaf first, without the root."""

    identity: SpiffeId
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]
    # When it was received (epoch s; None: its notBefore). CAs backdate notBefore against clock
    # skew (ambit's by 5 minutes), so half of the certificate's own lifetime can lie in the past
    # for a short TTL: renewal is timed from receipt instead.
    issued_at: float | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def renewal_time(self) -> float:
        """Epoch seconds at half of the lifetime left when it was received."""
        na = self.not_after.timestamp()
        start = self.issued_at if self.issued_at is not None else self.not_before.timestamp()
        start = min(max(start, self.not_before.timestamp()), na)
        return float(start + (na - start) / 2)

    def valid_at(self, now: float) -> bool:
        return self.not_before.timestamp() <= now < self.not_after.timestamp()

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def make_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM CSR whose only SAN is the identity's URI, signed by `key`."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def backoff_delay(failures: int, rng: random.Random) -> float:
    """Delay before retry number `failures` (1-based): 0.5 s doubling to 150 s, +-20% jitter."""
    base = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** max(0, failures - 1))
    jittered = base * (1 + BACKOFF_JITTER * (2 * rng.random() - 1))
    return float(min(BACKOFF_MAX, max(BACKOFF_MIN, jittered)))


def parse_issued(
    identity: SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    chain_pem: list[str],
    bundle: TrustBundle | None,
    now: float,
) -> WorkloadCert:
    """Check what the CA returned: our key, our identity, a valid SVID (when a bundle is known)."""
    if not chain_pem:
        raise SvidError(f"CA returned an empty certificate chain for {identity}")
    try:
        certs = [c for pem in chain_pem for c in x509.load_pem_x509_certificates(pem.encode())]
    except ValueError as e:
        raise SvidError(f"CA returned an unparsable certificate for {identity}: {e}") from e
    leaf = certs[0]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if leaf.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        raise SvidError(f"CA returned a certificate for another key when asked for {identity}")
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    # Roots are not sent in the handshake: the peer has them in its bundle.
    roots = set(bundle.roots) if bundle else set()
    chain = [c for c in certs if c not in roots and not (c is not leaf and c.issuer == c.subject)]
    got = verify_svid(chain, bundle, when) if bundle else check_leaf(leaf)
    if got != identity:
        raise SvidError(f"CA issued {got} when asked for {identity}")
    return WorkloadCert(identity, key, tuple(chain), issued_at=now)


@dataclass
class _Entry:
    identity: SpiffeId
    cert: WorkloadCert | None = None
    failures: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    attempts: int = 0
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class CertManager:
    """Certificates of the local workloads' identities (see the module docstring)."""

    def __init__(
        self,
        ca: CaClientLike,
        *,
        clock: Callable[[], float] = time.time,
        ttl_seconds: int = 86400,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        bundle: TrustBundle | None = None,
        concurrency: int = 8,
    ) -> None:
        self.ca = ca
        self.clock = clock
        self.ttl_seconds = ttl_seconds
        self.rng = rng or random.Random()
        self.bundle = bundle
        self._sleep = sleep or asyncio.sleep
        self._entries: dict[SpiffeId, _Entry] = {}
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(concurrency)
        self._fetches = TaskSet("certs")  # one fetch task per identity at most (its entry's `task`)
        self._closed = False

    # -- desired set -------------------------------------------------------

    def track(self, identities: Iterable[SpiffeId]) -> None:
        """Make `identities` the desired set: new ones are fetched, missing ones forgotten."""
        want = set(identities)
        for ident in list(self._entries):
            if ident not in want:
                self._forget(ident)
        for ident in want:
            if ident not in self._entries:
                self._entries[ident] = _Entry(ident, next_attempt=self.clock())
        self._wake.set()

    def _forget(self, ident: SpiffeId) -> None:
        entry = self._entries.pop(ident)
        if entry.task is not None:
            entry.task.cancel()
        entry.changed.set()  # waiters in get() re-check and fail closed
        log.info("forgot certificate of %s (no longer hosted here)", ident)

    def tracked(self) -> list[SpiffeId]:
        return sorted(self._entries, key=str)

    # -- reading -------------------------------------------------------------

    def current(self, identity: SpiffeId) -> WorkloadCert | None:
        """The valid certificate for `identity` now, or None (never an expired one)."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or not entry.cert.valid_at(self.clock()):
            return None
        return entry.cert

    async def get(self, identity: SpiffeId, timeout: float = 5.0) -> WorkloadCert:
        """A valid certificate for `identity`, fetching it if needed; CertNotReady after `timeout`.

        An identity not tracked yet is fetched on demand and kept until the next
        `track()` that leaves it out.
        """
        cert = self.current(identity)
        if cert is not None:
            return cert
        if self._closed:
            raise CertNotReady(f"{identity}: the certificate manager is closed")
        if identity not in self._entries:
            self._entries[identity] = _Entry(identity, next_attempt=self.clock())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            entry = self._entries.get(identity)
            if entry is None:
                raise CertNotReady(f"{identity}: no longer hosted on this node")
            cert = self.current(identity)
            if cert is not None:
                return cert
            if entry.task is None and entry.next_attempt <= self.clock():
                self._start_fetch(entry)
            left = deadline - loop.time()
            if left <= 0:
                why = f": last CA error: {entry.last_error}" if entry.last_error else ""
                raise CertNotReady(f"{identity}: no valid certificate after {timeout:g}s{why}")
            if entry.task is None:
                # In backoff: wake for the next attempt (made here, so get() works
                # without run()), or give up at the deadline.
                left = min(left, max(0.0, entry.next_attempt - self.clock()))
            entry.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.changed.wait(), left)

    def status(self) -> list[dict[str, object]]:
        """One row per tracked identity, for the admin `/certs` endpoint and `ambit certs`."""
        now = self.clock()
        rows: list[dict[str, object]] = []
        for ident in self.tracked():
            e = self._entries[ident]
            c = e.cert
            rows.append({
                "identity": str(ident),
                "serial": f"{c.serial:x}" if c else None,
                "not_before": c.not_before.isoformat() if c else None,
                "not_after": c.not_after.isoformat() if c else None,
                "next_renewal": _iso(self._due(e)),
                "state": self._state(e, now),
                "last_error": e.last_error,
            })
        return rows

    def _state(self, e: _Entry, now: float) -> str:
        if e.task is not None:
            return "fetching"
        if e.cert is not None and e.cert.valid_at(now):
            return "backoff" if e.failures else "valid"
        if e.cert is not None:
            return "expired"
        return "backoff" if e.failures else "pending"

    # -- the renewal loop ------------------------------------------------------

    def _due(self, e: _Entry) -> float:
        if e.failures or e.cert is None:
            return e.next_attempt
        return e.cert.renewal_time()

    async def run_once(self) -> float | None:
        """Start every fetch that is due now; return the next due time (epoch s) or None."""
        now = self.clock()
        for e in list(self._entries.values()):
            if e.task is None and self._due(e) <= now:
                self._start_fetch(e)
        pending = [e.task for e in self._entries.values() if e.task is not None]
        if pending:
            await asyncio.wait(pending)
        dues = [self._due(e) for e in self._entries.values() if e.task is None]
        return min(dues) if dues else None

    def _waiting(self) -> list[_Entry]:
        """Entries in backoff whose next attempt is further away than the probe interval."""
        now = self.clock()
        return [e for e in self._entries.values()
                if e.task is None and e.failures and e.next_attempt > now + PROBE_INTERVAL]

    async def probe_ca(self) -> bool:
        """Ask a probing CA client whether the CA answers; if so, retry every identity in backoff
        now. True when something was rescheduled."""
        waiting = self._waiting()
        reachable = getattr(self.ca, "reachable", None)
        if not waiting or reachable is None:
            return False
        try:
            ok = bool(await reachable(min(1.0, PROBE_INTERVAL)))
        except Exception as err:  # a probe that fails says only "not yet"
            log.debug("CA probe failed: %s", err)
            ok = False
        if not ok:
            return False
        now = self.clock()
        for e in waiting:
            e.next_attempt = now
        log.info("the CA answers again: retrying %d identit%s now", len(waiting), "y" if len(waiting) == 1 else "ies")
        return True

    async def run(self) -> None:
        """Renew forever: sleep (injected) until the next due time or until track()/get() wakes it.
        While identities wait in backoff, wake every PROBE_INTERVAL to probe the CA."""
        while not self._closed:
            self._wake.clear()
            if await self.probe_ca():
                continue
            nxt = await self.run_once()
            delay = BACKOFF_MAX if nxt is None else max(0.0, nxt - self.clock())
            if self._waiting() and hasattr(self.ca, "reachable"):
                delay = min(delay, PROBE_INTERVAL)
            sleeper = asyncio.ensure_future(self._sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    def _start_fetch(self, e: _Entry) -> None:
        e.task = self._fetches.spawn(f"fetch {e.identity}", self._fetch(e))

    async def _fetch(self, e: _Entry) -> None:
        try:
            async with self._limit:
                e.attempts += 1
                key = ec.generate_private_key(ec.SECP256R1())
                csr = make_csr(e.identity, key)
                try:
                    chain = await self.ca.create_certificate(csr, self.ttl_seconds)
                    cert = parse_issued(e.identity, key, chain, self.bundle, self.clock())
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # any CA or verification failure: back off, keep the old cert
                    e.failures += 1
                    e.last_error = str(err) or type(err).__name__
                    delay = backoff_delay(e.failures, self.rng)
                    e.next_attempt = self.clock() + delay
                    log.warning(
                        "certificate for %s: attempt %d failed, retry in %.1fs: %s",
                        e.identity, e.failures, delay, e.last_error,
                    )
                    return
                if self._entries.get(e.identity) is not e:
                    return  # forgotten while in flight: drop the new certificate too
                e.cert, e.failures, e.last_error = cert, 0, None
                log.info("certificate for %s serial %x valid until %s", e.identity, cert.serial, cert.not_after)
        finally:
            e.task = None
            e.changed.set()

    async def close(self) -> None:
        """Stop renewing, cancel fetches, drop every key."""
        self._closed = True
        self._wake.set()
        await self._fetches.close()
        for e in self._entries.values():
            e.changed.set()
        self._entries.clear()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()
