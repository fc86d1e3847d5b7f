"""Prometheus metrics with Istio's names and labels, plus ambit's own, in a private registry.

Byte counters are updated in batches (on close and by `flush()`, which the
server calls periodically), never per chunk on the copy path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ztunnel.conntrack import OUTBOUND, ConnRecord
from ztunnel.refusal import Refusal

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "response_flags",
    "connection_security_policy",
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _split(uid: str | None) -> tuple[str, str]:
    if not uid or "/" not in uid:
        return "unknown", "unknown"
    ns, name = uid.split("/", 1)
    return name, ns


def tcp_labels(rec: ConnRecord) -> dict[str, str]:
    """Istio's TCP metric labels for one connection record."""
    src_name, src_ns = _split(rec.src_workload)
    dst_name, dst_ns = _split(rec.dst_workload)
    return {
        "reporter": "source" if rec.direction == OUTBOUND else "destination",
        "source_workload": src_name,
        "source_workload_namespace": src_ns,
        "source_principal": rec.src_identity or "unknown",
        "destination_workload": dst_name,
        "destination_workload_namespace": dst_ns,
        "destination_principal": rec.dst_identity or "unknown",
        "destination_service": rec.dst_service or "unknown",
        "response_flags": rec.response_flags,
        "connection_security_policy": "mutual_tls" if rec.mtls else "none",
    }


class Metrics:
    """The ztunnel's metric families, registered in their own CollectorRegistry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent during response (destination to source)", TCP_LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes received during request (source to destination)", TCP_LABELS, registry=r
        )
        self.denials = Counter(
            "ambit_policy_denials",
            "Connections denied by L4 authorization policy",
            ("direction", "destination_workload", "destination_workload_namespace", "policy"),
            registry=r,
        )
        self.refused = Counter(
            "ambit_connections_refused", "Connections the ztunnel refused, by reason", ("reason",), registry=r
        )
        self.cert_expiry = Gauge(
            "ambit_cert_expiry_seconds", "Seconds until a workload certificate expires", ("identity",), registry=r
        )
        self.pool_connections = Gauge(
            "ambit_hbone_pool_connections", "HBONE client connections in the pool", registry=r
        )
        self._cert_source: Callable[[], Iterable[tuple[str, float]]] | None = None

    def connection_opened(self, rec: ConnRecord) -> None:
        if rec.decision == "allow":
            self.opened.labels(**tcp_labels(rec)).inc()

    def connection_closed(self, rec: ConnRecord) -> None:
        labels = tcp_labels(rec)
        if rec.decision == "deny":
            name, ns = _split(rec.dst_workload)
            self.denials.labels(rec.direction, name, ns, rec.policy or "-").inc()
            return
        if rec.decision != "allow":
            return
        self._flush_bytes(rec, labels)
        self.closed.labels(**labels).inc()

    def _flush_bytes(self, rec: ConnRecord, labels: dict[str, str] | None = None) -> None:
        c = rec.counters
        d_recv, d_sent = c.received - rec.reported_received, c.sent - rec.reported_sent
        if not (d_recv or d_sent):
            return
        labels = labels or tcp_labels(rec)
        if d_recv:
            self.received.labels(**labels).inc(d_recv)
            rec.reported_received = c.received
        if d_sent:
            self.sent.labels(**labels).inc(d_sent)
            rec.reported_sent = c.sent

    def flush(self, live: Iterable[ConnRecord]) -> None:
        """Report the bytes of still-open connections (called periodically and before a scrape)."""
        for rec in live:
            if rec.decision == "allow":
                self._flush_bytes(rec)

    def refuse(self, refusal: Refusal) -> None:
        self.refused.labels(refusal.spec.label).inc()

    def set_cert_source(self, source: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """`source()` yields (identity, expiry unix time) for the certificate gauge."""
        self._cert_source = source

    def render(self, now: float, live: Iterable[ConnRecord] = ()) -> bytes:
        self.flush(live)
        if self._cert_source is not None:
            self.cert_expiry.clear()
            for ident, not_after in self._cert_source():
                self.cert_expiry.labels(ident).set(max(0.0, not_after - now))
        out: Any = generate_latest(self.registry)
        return bytes(out)
