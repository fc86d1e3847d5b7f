"""Prometheus metrics with Istio's names and labels, plus ambit's own, in a private registry.

Byte counters are updated in batches (on close and by `flush()`, which the
server calls periodically), never per chunk on the copy path. A connection
addressed to a Service carries it (`destination_service*`): the source knows
the VIP it was dialed by; the destination, which sees only a pod address,
takes the Service of that pod that targets the port, as Istio's ztunnel does.
Denials and refusals carry the source workload, so an alert can tell which
workload is probing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ambit.cluster import POLICY_KINDS
from ambit.policy import NOT_FULLY_ENFORCED, PolicySet
from ambit.snapshot import Snapshot
from ztunnel.conntrack import INBOUND, OUTBOUND, ConnRecord
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
    "destination_service_name",
    "destination_service_namespace",
    "response_flags",
    "connection_security_policy",
)

# Who a denial or refusal came from (the workload an alert on probing groups by).
SOURCE_LABELS = ("source_workload", "source_workload_namespace", "source_principal")

CONTENT_TYPE = CONTENT_TYPE_LATEST
SERVICE_DOMAIN = "svc.cluster.local"


def _split(uid: str | None) -> tuple[str, str]:
    if not uid or "/" not in uid:
        return "unknown", "unknown"
    ns, name = uid.split("/", 1)
    return name, ns


def service_host(namespace: str, name: str) -> str:
    return f"{name}.{namespace}.{SERVICE_DOMAIN}"


def split_service_host(host: str | None) -> tuple[str, str]:
    """`name.ns.svc.cluster.local` -> (name, namespace); ("unknown", "unknown") otherwise."""
    parts = (host or "").split(".")
    if len(parts) < 3 or parts[2] != "svc" or not parts[0] or not parts[1]:
        return "unknown", "unknown"
    return parts[0], parts[1]


def inbound_service(snap: Snapshot, workload_uid: str | None, port: int) -> str | None:
    """The Service a connection to `workload_uid`:`port` was most likely addressed to: the
    first (by name) of the pod's Services with a port that targets `port` (Istio's ztunnel
    guesses the same way). None when no Service of the pod targets that port."""
    w = snap.workload(workload_uid) if workload_uid else None
    if w is None or not w.services:
        return None
    mine = set(w.services)
    for svc in sorted((s for s in snap.services.values() if s.uid in mine), key=lambda s: s.uid):
        if port in svc.ports.values():
            return service_host(svc.namespace, svc.name)
    return None


def source_labels(rec: ConnRecord, snap: Snapshot | None = None) -> dict[str, str]:
    """Who a connection came from; a record refused before its source was looked up (an
    unknown name, a plaintext connection) is looked up by its source address in `snap`."""
    uid, principal = rec.src_workload, rec.src_identity
    if uid is None and snap is not None:
        w = snap.workload_by_ip(rec.src_ip)
        if w is not None:
            # the principal only where the ztunnel would lend it (a local pod going out); an
            # address is no proof of identity on the way in
            lend = w.enrolled and rec.direction == OUTBOUND
            uid, principal = w.uid, principal or (str(w.identity) if lend else None)
    name, ns = _split(uid)
    return {"source_workload": name, "source_workload_namespace": ns, "source_principal": principal or "unknown"}


def tcp_labels(rec: ConnRecord) -> dict[str, str]:
    """Istio's TCP metric labels for one connection record."""
    src_name, src_ns = _split(rec.src_workload)
    dst_name, dst_ns = _split(rec.dst_workload)
    svc_name, svc_ns = split_service_host(rec.dst_service)
    return {
        "reporter": "source" if rec.direction == OUTBOUND else "destination",
        "source_workload": src_name,
        "source_workload_namespace": src_ns,
        "source_principal": rec.src_identity or "unknown",
        "destination_workload": dst_name,
        "destination_workload_namespace": dst_ns,
        "destination_principal": rec.dst_identity or "unknown",
        "destination_service": rec.dst_service or "unknown",
        "destination_service_name": svc_name,
        "destination_service_namespace": svc_ns,
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
            ("direction", *SOURCE_LABELS, "destination_workload", "destination_workload_namespace", "policy"),
            registry=r,
        )
        self.refused = Counter(
            "ambit_connections_refused", "Connections the ztunnel refused, by reason and source workload",
            ("reason", "direction", *SOURCE_LABELS), registry=r
        )
        self.cert_expiry = Gauge(
            "ambit_cert_expiry_seconds", "Seconds until a workload certificate expires", ("identity",), registry=r
        )
        self.pool_connections = Gauge(
            "ambit_hbone_pool_connections", "HBONE client connections in the pool", registry=r
        )
        self.dry_run = Counter(
            "ambit_policy_dry_run_decisions",
            "What dry-run AuthorizationPolicies would have decided on inbound connections (never enforced)",
            ("policy", "decision"), registry=r,
        )
        self.not_fully_enforced = Gauge(
            "ambit_policies_not_fully_enforced",
            "Policies in force of which ambit enforces some part stricter than written (stricter), some "
            "target not at all (partial), or nothing (no-effect); `ambit policies` says which field",
            ("kind", "status"), registry=r,
        )
        self._policies_seen: PolicySet | None = None
        self._cert_source: Callable[[], Iterable[tuple[str, float]]] | None = None
        self._snapshot: Callable[[], Snapshot] | None = None

    def set_snapshot_source(self, snapshot: Callable[[], Snapshot]) -> None:
        """The ztunnel's current snapshot: the destination's Service of an inbound connection."""
        self._snapshot = snapshot

    def _current(self) -> Snapshot | None:
        return self._snapshot() if self._snapshot is not None else None

    def connection_opened(self, rec: ConnRecord) -> None:
        if rec.decision == "allow":
            self._name_service(rec)
            self.opened.labels(**tcp_labels(rec)).inc()

    def _name_service(self, rec: ConnRecord) -> None:
        # Once, when the connection opens, so that its open, bytes and close series (and its
        # access-log line) name the same Service even if the snapshot changes meanwhile.
        if rec.dst_service is None and rec.direction == INBOUND and self._snapshot is not None:
            rec.dst_service = inbound_service(self._snapshot(), rec.dst_workload, rec.dst_port)

    def connection_closed(self, rec: ConnRecord) -> None:
        if rec.dry_run and rec.direction != OUTBOUND:  # the destination's decision, counted once
            for d in rec.dry_run:
                self.dry_run.labels(d.get("policy") or "-", d.get("decision") or "-").inc()
        labels = tcp_labels(rec)
        if rec.decision == "deny":
            name, ns = _split(rec.dst_workload)
            self.denials.labels(direction=rec.direction, **source_labels(rec, self._current()),
                                destination_workload=name,
                                destination_workload_namespace=ns, policy=rec.policy or "-").inc()
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

    def refuse(self, refusal: Refusal, rec: ConnRecord | None = None) -> None:
        """Count a refusal; with its record, by the source workload too (else "unknown")."""
        src = source_labels(rec, self._current()) if rec is not None else dict.fromkeys(SOURCE_LABELS, "unknown")
        direction = rec.direction if rec is not None else "unknown"
        self.refused.labels(reason=refusal.spec.label, direction=direction, **src).inc()

    def set_cert_source(self, source: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """`source()` yields (identity, expiry unix time) for the certificate gauge."""
        self._cert_source = source

    def policies_in_force(self, policies: PolicySet) -> None:
        """Set `ambit_policies_not_fully_enforced` from the policies in force (once per snapshot)."""
        if policies is self._policies_seen:
            return
        self._policies_seen = policies
        counts = {(kind, status): 0 for kind in POLICY_KINDS for status in NOT_FULLY_ENFORCED}
        for key, st in policies.statuses.items():
            if not st.fully_enforced:
                counts[(key.split("/", 1)[0], st.status)] += 1
        for (kind, status), n in counts.items():
            self.not_fully_enforced.labels(kind, status).set(n)

    def render(self, now: float, live: Iterable[ConnRecord] = ()) -> bytes:
        self.flush(live)
        if self._snapshot is not None:
            self.policies_in_force(self._snapshot().policies)
        if self._cert_source is not None:
            self.cert_expiry.clear()
            for ident, not_after in self._cert_source():
                self.cert_expiry.labels(ident).set(max(0.0, not_after - now))
        out: Any = generate_latest(self.registry)
        return bytes(out)
