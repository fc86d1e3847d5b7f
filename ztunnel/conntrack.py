"""The ztunnel's connection table: one record per proxied (or refused) TCP connection.

Live records are visible at the admin `/connections`; a closed record moves to a
bounded ring of recent ones, numbered in the order they closed (`closed_seq`, so
the node agent takes each once with `/connections?closed_after=N`), and is
reported once to the metrics and the access log. Byte counters are plain ints bumped by the copy path; metrics read them in
batches (on close and on a periodic flush), never per chunk.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from ambit.policy import Verdict
from ztunnel.refusal import ResponseFlag

OUTBOUND = "outbound"
INBOUND = "inbound"
INBOUND_PLAINTEXT = "inbound_plaintext"


class Route(StrEnum):
    """Which way a connection goes, as records, the access log and `ambit flows` name it."""

    HBONE = "hbone"  # tunnelled to (outbound) or from (inbound) another node's ztunnel
    LOCAL = "same-node"  # both ends on this node: no TLS, the destination's policy in-process
    PASSTHROUGH = "passthrough"  # to a destination outside the mesh: plain TCP
    REFUSE = "refuse"  # refused by the outbound plan before it went anywhere
    WAYPOINT = "waypoint"  # tunnelled to the destination's waypoint, which decides per request
    PLAINTEXT = "plaintext"  # inbound plaintext on 15006 (PERMISSIVE)


@dataclass
class ByteCounters:
    """Bytes each way, shared by the records of one proxied connection."""

    # Istio's meaning: received = request bytes (source -> destination), sent = response bytes
    received: int = 0
    sent: int = 0


@dataclass
class ConnRecord:
    """What the ztunnel knows about one connection, for /connections, metrics and logs."""

    direction: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    id: int = 0
    original_dst: str | None = None  # what the client dialed, when it differs (a VIP)
    client_ip: str | None = None  # inbound: the `forwarded: for=` of the HBONE request (logs only)
    src_workload: str | None = None  # "ns/name"
    dst_workload: str | None = None
    src_identity: str | None = None
    dst_identity: str | None = None
    # hex serial of the certificate that proved the source identity (inbound HBONE), or that the
    # ztunnel presented for it (outbound): which certificate authenticated this connection
    src_cert_serial: str | None = None
    dst_service: str | None = None  # "ns/name" when dialed through a service VIP
    waypoint: str | None = None  # "ns/name" of the waypoint the connection went through
    # The local end of the ztunnel's own connection to the destination: the key by
    # which the agent joins this record with the kernel's (sock_ops) view of the flow.
    upstream_local: str | None = None
    mtls: bool = False
    route: Route | Literal[""] = ""  # "": not routed (yet)
    decision: Verdict = "pending"
    policy: str | None = None
    rule: int | None = None
    reason: str = ""
    # What each dry-run policy in scope would have decided (`Decision.dry_run`, as dicts):
    # logged and counted, never enforced.
    dry_run: list[dict[str, Any]] = field(default_factory=list)
    response_flags: ResponseFlag = ResponseFlag.NONE
    state: str = "connecting"  # connecting | open | closed | refused
    error: str | None = None
    counters: ByteCounters = field(default_factory=ByteCounters)
    started_wall: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    closed_seq: int = 0  # the order it closed in (0: still live)
    # counters already reported to metrics (batched deltas)
    reported_received: int = 0
    reported_sent: int = 0

    @property
    def duration(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "direction": self.direction,
            "src": f"{self.src_ip}:{self.src_port}",
            "dst": f"{self.dst_ip}:{self.dst_port}",
            "original_dst": self.original_dst,
            "client_ip": self.client_ip,
            "src_workload": self.src_workload,
            "dst_workload": self.dst_workload,
            "src_identity": self.src_identity,
            "dst_identity": self.dst_identity,
            "src_cert_serial": self.src_cert_serial,
            "dst_service": self.dst_service,
            "waypoint": self.waypoint,
            "upstream_local": self.upstream_local,
            "mtls": self.mtls,
            "route": self.route,
            "decision": self.decision,
            "policy": self.policy,
            "rule": self.rule,
            "reason": self.reason,
            "dry_run": self.dry_run,
            "response_flags": self.response_flags,
            "state": self.state,
            "error": self.error,
            "bytes_received": self.counters.received,
            "bytes_sent": self.counters.sent,
            "age_s": round(self.duration, 3),
            "started_at": round(self.started_wall, 3),
            "closed_seq": self.closed_seq or None,
        }


Listener = Callable[[ConnRecord], None]


class ConnectionTable:
    """Live records plus a ring of recently closed ones; notifies observers on open/close."""

    def __init__(self, recent: int = 2048) -> None:
        self._ids = itertools.count(1)
        self.live: dict[int, ConnRecord] = {}
        self.recent: deque[ConnRecord] = deque(maxlen=recent)
        self.closed = 0  # records closed so far (the last `closed_seq`)
        self.on_open: list[Listener] = []
        self.on_close: list[Listener] = []

    def open(self, rec: ConnRecord) -> ConnRecord:
        rec.id = next(self._ids)
        self.live[rec.id] = rec
        for f in self.on_open:
            f(rec)
        return rec

    def close(self, rec: ConnRecord, error: str | None = None) -> None:
        """Finish a record (idempotent): state, end time, observers, move to recent."""
        if self.live.pop(rec.id, None) is None:
            return
        rec.ended = time.monotonic()
        if error and rec.error is None:
            rec.error = error
        if rec.decision == "deny":
            rec.state = "refused"
        elif rec.state == "connecting":
            rec.state = "failed"
            if rec.response_flags == ResponseFlag.NONE:
                rec.response_flags = ResponseFlag.UPSTREAM_FAILURE
        else:
            rec.state = "closed"
        self.closed += 1
        rec.closed_seq = self.closed
        self.recent.append(rec)
        for f in self.on_close:
            f(rec)

    def snapshot(self, closed_after: int = 0) -> list[dict[str, Any]]:
        """The live records and the closed ones numbered past `closed_after`."""
        closed = (r for r in self.recent if r.closed_seq > closed_after) if closed_after else self.recent
        return [r.to_json() for r in (*self.live.values(), *closed)]
