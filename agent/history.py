"""The node's flow history: every closed connection, every waypoint request and every kernel
drop of this node, kept in an embedded SQLite database bounded by size and age.

Two halves:
- pure: what a history row is (`conn_row`, `request_row`, `drop_row`), which of the
  ztunnel's connection records are newly closed (`ZtunnelCursor`), which of a waypoint's
  numbered request records are new (`RequestCursor`), the folding of a dropped SYN's
  retransmissions (`DropFolder`), and the ranking of sources by denials against their own
  earlier rate (`rank_denials`);
- I/O: `FlowHistory`, the database. The agent's event loop only appends rows to a queue
  (`add`, never blocks); one writer thread inserts them in batches (WAL mode, one
  transaction per batch), deletes what is older than the age bound, and deletes the oldest
  rows and returns their pages to the file system whenever the database grows past its
  size bound. Queries open their own read connection and run off the loop
  (`asyncio.to_thread`).

A row is written once: a connection when it closes (its bytes and verdict are final),
a request when its response ended, a dropped connection attempt once per 4-tuple. The
history is the node's own view: a connection between two nodes is in both histories
(outbound on the source's, inbound on the destination's, where the policy decided).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import AgentError

log = logging.getLogger("ambit.agent.history")

SCHEMA_VERSION = "1"
# The ztunnel's states of a record that will not change any more.
CLOSED_STATES = frozenset({"closed", "refused", "failed"})
REASON_MAX = 240  # characters of a decision's reason kept per row
PATH_MAX = 512
MIN_BYTES = 2**20  # the smallest size bound: the write-ahead log alone takes up to an eighth

Row = dict[str, Any]
# Who the destination workload is, kept with the row so that a replay can still judge a flow
# to a pod that has gone since (a Deployment's pods change names on every rollout).
MetaOf = Callable[[str], "Mapping[str, Any] | None"]

COLUMNS = (
    "kind", "node", "t_start", "t_end", "direction", "route",
    "src_ip", "src_port", "src_workload", "src_identity",
    "dst_ip", "dst_port", "dst_workload", "dst_identity", "dst_service", "waypoint",
    "mtls", "verdict", "policy", "rule", "reason", "state", "bytes_sent", "bytes_received",
    "method", "host", "path", "status", "dst_meta", "extra", "rkey",
)
# Fields of the ztunnel's and the waypoint's records that map to columns; any other field
# (e.g. one added by a later version) is kept in `extra`, so nothing recorded is lost.
_ZTUNNEL_FIELDS = frozenset({
    "id", "direction", "src", "dst", "original_dst", "client_ip", "src_workload", "dst_workload",
    "src_identity", "dst_identity", "src_cert_serial", "dst_service", "waypoint", "upstream_local", "mtls",
    "route", "decision", "policy", "rule", "reason", "response_flags", "state", "error", "bytes_received",
    "bytes_sent", "age_s", "started_at",
})
_REQUEST_FIELDS = frozenset({
    "time", "method", "authority", "path", "status", "decision", "policy", "rule", "reason", "client_ip",
    "src_workload", "src_identity", "dst_workload", "dst_identity", "dst_service", "waypoint", "trace_id",
    "bytes_received", "bytes_sent", "seq", "dst_port", "duration_ms", "protocol",
})


class HistoryError(AgentError):
    """The flow history database cannot be opened or used; names the file and why."""


# ---------------------------------------------------------------------------
# rows (pure)


def _split_addr(addr: Any) -> tuple[str | None, int | None]:
    if not isinstance(addr, str) or ":" not in addr:
        return (addr if isinstance(addr, str) and addr else None), None
    host, _, port = addr.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return host, None


def _meta_json(meta_of: MetaOf | None, uid: Any) -> str | None:
    if meta_of is None or not isinstance(uid, str) or not uid:
        return None
    meta = meta_of(uid)
    return json.dumps(meta, sort_keys=True, separators=(",", ":")) if meta else None


def _extra(rec: Mapping[str, Any], known: frozenset[str]) -> str | None:
    rest = {k: v for k, v in rec.items() if k not in known and v not in (None, "", [], {})}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), default=str) if rest else None


def conn_key(rec: Mapping[str, Any]) -> str:
    """A ztunnel record's identity across polls and agent restarts (ids restart with the ztunnel)."""
    return f"{rec.get('started_at')}:{rec.get('id')}"


def conn_row(rec: Mapping[str, Any], node: str, meta_of: MetaOf | None = None) -> Row:
    """A closed ztunnel connection record (`/connections`) as a history row."""
    src_ip, src_port = _split_addr(rec.get("src"))
    dst_ip, dst_port = _split_addr(rec.get("dst"))
    started = rec.get("started_at")
    start = float(started) if isinstance(started, int | float) else time.time()
    age = rec.get("age_s")
    reason = rec.get("reason") or rec.get("error") or None
    return {
        "kind": "conn", "node": node, "t_start": start,
        "t_end": start + (float(age) if isinstance(age, int | float) else 0.0),
        "direction": rec.get("direction"), "route": rec.get("route") or None,
        # policy saw the client's address (an inbound HBONE stream's `forwarded`), not the peer ztunnel's
        "src_ip": rec.get("client_ip") or src_ip, "src_port": src_port,
        "src_workload": rec.get("src_workload"), "src_identity": rec.get("src_identity"),
        "dst_ip": dst_ip, "dst_port": dst_port, "dst_workload": rec.get("dst_workload"),
        "dst_identity": rec.get("dst_identity"), "dst_service": rec.get("dst_service"),
        "waypoint": rec.get("waypoint"), "mtls": 1 if rec.get("mtls") else 0,
        "verdict": rec.get("decision"), "policy": rec.get("policy"), "rule": rec.get("rule"),
        "reason": str(reason)[:REASON_MAX] if reason else None, "state": rec.get("state"),
        # Istio's direction: sent = request bytes (source -> destination), as `ambit flows` shows them
        "bytes_sent": rec.get("bytes_received"), "bytes_received": rec.get("bytes_sent"),
        "method": None, "host": None, "path": None, "status": None,
        "dst_meta": _meta_json(meta_of, rec.get("dst_workload")),
        "extra": _extra(rec, _ZTUNNEL_FIELDS), "rkey": conn_key(rec),
    }


def request_row(rec: Mapping[str, Any], node: str, instance: str, meta_of: MetaOf | None = None) -> Row:
    """A waypoint's request record (its `/requests` report) as a history row."""
    end = rec.get("time")
    t_end = float(end) if isinstance(end, int | float) else time.time()
    dur = rec.get("duration_ms")
    host, port = _split_addr(rec.get("authority"))
    path = rec.get("path")
    reason = rec.get("reason")
    return {
        "kind": "request", "node": node,
        "t_start": t_end - (float(dur) / 1000 if isinstance(dur, int | float) else 0.0), "t_end": t_end,
        "direction": "inbound", "route": _request_route(rec),
        "src_ip": rec.get("client_ip") or None, "src_port": None,
        "src_workload": rec.get("src_workload"), "src_identity": rec.get("src_identity"),
        "dst_ip": None, "dst_port": rec.get("dst_port") if isinstance(rec.get("dst_port"), int) else port,
        "dst_workload": rec.get("dst_workload"), "dst_identity": rec.get("dst_identity"),
        "dst_service": rec.get("dst_service"), "waypoint": rec.get("waypoint"), "mtls": 1,
        "verdict": rec.get("decision"), "policy": rec.get("policy"), "rule": rec.get("rule"),
        "reason": str(reason)[:REASON_MAX] if reason else None, "state": None,
        "bytes_sent": rec.get("bytes_received"), "bytes_received": rec.get("bytes_sent"),
        "method": rec.get("method") or None, "host": host or None,
        "path": str(path)[:PATH_MAX] if path else None, "status": rec.get("status"),
        "dst_meta": _meta_json(meta_of, rec.get("dst_workload")),
        "extra": _extra(rec, _REQUEST_FIELDS), "rkey": f"{instance}:{rec.get('seq')}",
    }


def _request_route(rec: Mapping[str, Any]) -> str:
    """Where a request was decided: at an ingress gateway, or at a waypoint (opaque TCP through a
    waypoint is judged as a whole connection, `authorize_opaque`)."""
    if rec.get("gateway"):
        return "gateway"
    return "waypoint_tcp" if rec.get("protocol") == "tcp" else "waypoint"


def drop_row(kind: str, src: str, sport: int, dst: str, dport: int, node: str, now: float,
             pod_by_ip: Callable[[str], str | None], reason: str) -> Row:
    """A connection attempt the kernel dropped (no-bypass, or plaintext into a STRICT port)."""
    return {
        "kind": "drop", "node": node, "t_start": now, "t_end": now,
        "direction": "outbound" if kind == "drop_egress" else "inbound", "route": kind,
        "src_ip": src, "src_port": sport, "src_workload": pod_by_ip(src), "src_identity": None,
        "dst_ip": dst, "dst_port": dport, "dst_workload": pod_by_ip(dst), "dst_identity": None,
        "dst_service": None, "waypoint": None, "mtls": 0, "verdict": "dropped", "policy": None, "rule": None,
        "reason": reason[:REASON_MAX], "state": "dropped", "bytes_sent": None, "bytes_received": None,
        "method": None, "host": None, "path": None, "status": None, "dst_meta": None, "extra": None,
        "rkey": None,
    }


# ---------------------------------------------------------------------------
# what is new in a poll (pure)


@dataclass
class ZtunnelCursor:
    """Which of the ztunnel's connection records (live ones and a ring of recently closed ones,
    re-read on every poll) closed since the last poll. Counts the records that closed and left
    the ring between two polls (`lost`): seen open and gone since, or numbered (the ztunnel
    numbers its records in order) between two polls and never seen. The agent polls faster
    while records close fast."""

    seen: set[str] = field(default_factory=set)
    lost: int = 0
    _live: set[str] = field(default_factory=set)
    _top: int | None = None  # the highest record number seen

    def take(self, items: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        present: set[str] = set()
        live: set[str] = set()
        ids: set[int] = set()
        new: list[Mapping[str, Any]] = []
        for rec in items:
            key = conn_key(rec)
            present.add(key)
            if isinstance(rec.get("id"), int):
                ids.add(rec["id"])
            if rec.get("state") not in CLOSED_STATES:
                live.add(key)
            elif key not in self.seen:
                new.append(rec)
        # live at the last poll, gone now without being seen closed: closed and evicted between polls
        self.lost += len(self._live - present)
        self._live = live
        if ids:
            top = max(ids)
            if self._top is not None and top >= self._top:
                self.lost += sum(1 for i in range(self._top + 1, top + 1) if i not in ids)
            self._top = top  # lower: a restarted ztunnel, numbering from 1 again
        # a key no longer listed never comes back, so the set stays as small as the ztunnel's ring
        self.seen = (self.seen & present) | {conn_key(r) for r in new}
        return new


@dataclass
class RequestCursor:
    """Where the agent is in one waypoint's numbered request records (`/requests?after=N`)."""

    instance: str = ""
    after: int = 0
    lost: int = 0

    def take(self, report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The records of `report` not taken yet; a new `instance` (the waypoint restarted)
        starts over. Records numbered past the cursor that the report no longer holds are
        counted as lost."""
        instance = str(report.get("instance") or "")
        if instance != self.instance:
            self.instance, self.after = instance, 0
        items = [r for r in report.get("items") or () if isinstance(r, Mapping)
                 and isinstance(r.get("seq"), int) and r["seq"] > self.after]
        items.sort(key=lambda r: int(r["seq"]))
        if items:
            self.lost += max(0, int(items[0]["seq"]) - self.after - 1)
            self.after = int(items[-1]["seq"])
        return items


@dataclass
class DropFolder:
    """One history row per dropped connection attempt: the SYN's retransmissions (same
    4-tuple within `window` seconds) are folded into the first."""

    window: float = 120.0
    _seen: dict[tuple[str, str, int, str, int], float] = field(default_factory=dict)

    def first(self, kind: str, src: str, sport: int, dst: str, dport: int, now: float) -> bool:
        if len(self._seen) > 4096:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.window}
        key = (kind, src, sport, dst, dport)
        last = self._seen.get(key)
        self._seen[key] = now
        return last is None or now - last >= self.window


# ---------------------------------------------------------------------------
# denial anomalies (pure)


@dataclass(frozen=True)
class SourceDenials:
    """One source's denials: in the recent window, and before it (its own baseline)."""

    source: str
    identity: str | None
    recent: int
    earlier: int
    targets: int  # distinct destinations (workload or address, and port) denied in the window
    last: float
    top_policy: str | None = None


@dataclass(frozen=True)
class RankedSource:
    source: SourceDenials
    recent_per_min: float
    earlier_per_min: float | None  # None: no baseline (the history is younger than the window)
    ratio: float | None
    spike: bool


def rank_denials(counts: Iterable[SourceDenials], window_s: float, baseline_s: float, *,
                 min_denials: int = 5, factor: float = 5.0) -> list[RankedSource]:
    """Sources by denials in the recent window against their own earlier rate.

    A spike: at least `min_denials` in the window and a rate `factor` times its earlier rate
    (a source never denied before counts as one denial over the baseline, so a long clean
    history makes a sudden burst stand out more). Spikes first, then by recent denials."""
    out = []
    for c in counts:
        recent_rate = c.recent / (window_s / 60) if window_s > 0 else 0.0
        if baseline_s >= window_s:
            earlier_rate: float | None = c.earlier / (baseline_s / 60)
            floor = 1 / (baseline_s / 60)
            ratio: float | None = recent_rate / max(earlier_rate or 0.0, floor)
        else:
            earlier_rate, ratio = None, None
        spike = c.recent >= min_denials and ((ratio is None and c.earlier == 0) or (ratio is not None and ratio >= factor))
        out.append(RankedSource(c, recent_rate, earlier_rate, ratio, spike))
    out.sort(key=lambda r: (not r.spike, -r.source.recent, -(r.ratio or 0.0), r.source.source))
    return out


# ---------------------------------------------------------------------------
# queries (pure: SQL text and parameters)


@dataclass(frozen=True)
class Filter:
    """What `ambit flows --since ...` asks for. Patterns match a workload (ns/name), an identity
    (with or without spiffe://), or an address; `*` is a wildcard."""

    since: float | None = None
    until: float | None = None
    source: str | None = None
    destination: str | None = None
    verdicts: tuple[str, ...] = ()
    policy: str | None = None
    kinds: tuple[str, ...] = ()
    pod: str | None = None  # from or to this workload
    namespace: str | None = None  # destination namespace

    @classmethod
    def from_query(cls, q: Mapping[str, str]) -> Filter:
        def num(key: str) -> float | None:
            v = q.get(key)
            if v in (None, ""):
                return None
            try:
                return float(v)  # type: ignore[arg-type]
            except ValueError:
                raise HistoryError(f"{key}={v!r}: expected seconds since the epoch") from None

        def items(key: str) -> tuple[str, ...]:
            return tuple(x for x in (q.get(key) or "").split(",") if x)

        return cls(since=num("since"), until=num("until"), source=q.get("source") or None,
                   destination=q.get("destination") or None, verdicts=items("verdict"),
                   policy=q.get("policy") or None, kinds=items("kind"), pod=q.get("pod") or None,
                   namespace=q.get("namespace") or None)

    def to_query(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k in ("since", "until"):
            v = getattr(self, k)
            if v is not None:
                out[k] = repr(float(v))
        for k in ("source", "destination", "policy", "pod", "namespace"):
            if getattr(self, k):
                out[k] = str(getattr(self, k))
        if self.verdicts:
            out["verdict"] = ",".join(self.verdicts)
        if self.kinds:
            out["kind"] = ",".join(self.kinds)
        return out

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.since is not None:
            clauses.append("t_end >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("t_end <= ?")
            params.append(self.until)
        for side, pattern in (("src", self.source), ("dst", self.destination)):
            if pattern:
                c, p = _who(side, pattern)
                clauses.append(c)
                params += p
        if self.pod:
            a, pa = _who("src", self.pod)
            b, pb = _who("dst", self.pod)
            clauses.append(f"({a} OR {b})")
            params += pa + pb
        if self.verdicts:
            clauses.append(f"verdict IN ({','.join('?' * len(self.verdicts))})")
            params += list(self.verdicts)
        if self.kinds:
            clauses.append(f"kind IN ({','.join('?' * len(self.kinds))})")
            params += list(self.kinds)
        if self.policy:
            op, value = _like(self.policy)
            clauses.append(f"policy {op} ?")
            params.append(value)
        if self.namespace:
            clauses.append("dst_workload LIKE ? ESCAPE '\\'")
            params.append(_escape(self.namespace) + "/%")
        return (" AND ".join(clauses) or "1"), params


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(pattern: str) -> tuple[str, str]:
    if "*" not in pattern:
        return "=", pattern
    return "LIKE", _escape(pattern).replace("*", "%")


def _who(side: str, pattern: str) -> tuple[str, list[Any]]:
    ident = pattern if pattern.startswith("spiffe://") or "*" in pattern else f"spiffe://{pattern}"
    op, value = _like(pattern)
    iop, ivalue = _like(ident)
    esc = " ESCAPE '\\'" if op == "LIKE" else ""
    iesc = " ESCAPE '\\'" if iop == "LIKE" else ""
    return (f"({side}_workload {op} ?{esc} OR {side}_identity {iop} ?{iesc} OR {side}_ip {op} ?{esc})",
            [value, ivalue, value])


# The records a replay judges (where a policy decided): connections at the destination's ztunnel,
# requests at a waypoint, and plaintext the kernel dropped at a STRICT port.
REPLAYABLE = ("(kind = 'request' OR (kind = 'conn' AND direction IN ('inbound', 'inbound_plaintext'))"
              " OR (kind = 'drop' AND route = 'drop_strict'))")
_GROUP = ("kind, direction, route, src_ip, src_workload, src_identity, dst_workload, dst_identity, dst_port, "
          "mtls, verdict, policy, rule, method, host, path, status, waypoint")


# ---------------------------------------------------------------------------
# the database (I/O)


_INT_COLUMNS = frozenset({"src_port", "dst_port", "mtls", "rule", "bytes_sent", "bytes_received", "status"})


def _type(column: str) -> str:
    return "REAL" if column.startswith("t_") else "INTEGER" if column in _INT_COLUMNS else "TEXT"


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS flows (
  id INTEGER PRIMARY KEY,
  {", ".join(f"{c} {_type(c)}" for c in COLUMNS)}
);
CREATE INDEX IF NOT EXISTS flows_end ON flows (t_end);
CREATE INDEX IF NOT EXISTS flows_src ON flows (src_workload, t_end);
CREATE INDEX IF NOT EXISTS flows_dst ON flows (dst_workload, t_end);
"""
_INSERT = f"INSERT INTO flows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


@dataclass
class HistoryStats:
    written: int = 0
    dropped: int = 0  # rows refused because the writer fell behind (queue full)
    pruned_age: int = 0
    pruned_size: int = 0
    batches: int = 0
    last_error: str | None = None


class FlowHistory:
    """The node's flow history in `path` (SQLite, WAL): at most `max_bytes` on disk (the
    database and its write-ahead log) and `max_age` seconds of records."""

    QUEUE_MAX = 20_000  # rows waiting for the writer (a few MiB); past it, rows are dropped and counted

    def __init__(self, path: Path, *, max_bytes: int = 100 * 2**20, max_age: float = 7 * 86400,
                 clock: Callable[[], float] = time.time, flush_interval: float = 0.5) -> None:
        if max_bytes < MIN_BYTES:
            raise HistoryError(f"flow history {path}: a size bound of {max_bytes} bytes is too small "
                               f"(at least {MIN_BYTES // 2**20} MiB)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.clock = clock
        self.flush_interval = flush_interval
        self.stats = HistoryStats()
        self.page_size = 4096
        # The write-ahead log holds at most this much between checkpoints; the database the rest.
        self._wal_budget = max(256 * 1024, max_bytes // 8)
        # prune when the database is larger (the log's shared-memory index takes 32 KiB more)
        self._high = int((max_bytes - self._wal_budget - 32 * 1024) * 0.85)
        self._low = int(self._high * 0.85)  # down to this
        # A batch is one transaction: its pages (rows, and the index pages they land on) must fit
        # in the log's budget several times over.
        self.batch_rows = max(16, min(5000, self._wal_budget // 8192))
        self._queue: deque[Row] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._last_maintenance = 0.0

    # -- lifecycle (blocking: call from a thread)

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
            fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            if fresh:
                # before the first table: freed pages can then be handed back to the file system
                db.execute(f"PRAGMA page_size = {self.page_size}")
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint = {max(16, self._wal_budget // 4 // self.page_size)}")
            db.execute(f"PRAGMA journal_size_limit = {self._wal_budget // 4}")
            db.executescript(_SCHEMA)
            version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif version[0] != SCHEMA_VERSION:
                raise HistoryError(f"flow history {self.path}: schema version {version[0]}, this agent "
                                   f"writes {SCHEMA_VERSION}; move the file away to start a new history")
            self.page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        except sqlite3.Error as e:
            raise HistoryError(f"flow history {self.path}: {e} (is it a SQLite database this agent can "
                               "write? move it away to start a new one)") from e
        self._db = db
        self._maintain(force=True)
        self._thread = threading.Thread(target=self._run, name="flow-history-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, stop the writer, close the database."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    # -- writing (the event loop's side: never blocks)

    def add(self, rows: Iterable[Row]) -> None:
        for r in rows:
            if len(self._queue) >= self.QUEUE_MAX:
                self.stats.dropped += 1
                continue
            self._queue.append(r)
        if len(self._queue) >= self.batch_rows:
            self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything added so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue or not self._idle.is_set():
            self._idle.clear()
            self._wake.set()
            if not self._idle.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- the writer thread

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                while self._queue:
                    batch = [self._queue.popleft() for _ in range(min(self.batch_rows, len(self._queue)))]
                    self._write(batch)
                    self._maintain()
                self._maintain()
            except sqlite3.Error as e:  # a full disk or a damaged file: keep the agent running, say so
                self.stats.last_error = str(e)
                log.error("flow history %s: %s", self.path, e)
                time.sleep(1.0)
            self._idle.set()
            if stopping:
                return

    def _write(self, batch: Sequence[Row]) -> None:
        assert self._db is not None
        values = [tuple(_cell(r.get(c), c) for c in COLUMNS) for r in batch]
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, values)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self.stats.written += len(values)
        self.stats.batches += 1

    def _maintain(self, force: bool = False) -> None:
        """The age bound every few seconds; the size bound after every batch."""
        db = self._db
        assert db is not None
        now = self.clock()
        if force or now - self._last_maintenance >= 5.0:
            self._last_maintenance = now
            n = db.execute("DELETE FROM flows WHERE t_end < ?", (now - self.max_age,)).rowcount
            if n:
                self.stats.pruned_age += n
                self._release()
        if self._used() > self._high:
            self._shrink()

    def _used(self) -> int:
        assert self._db is not None
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self.page_size

    def _shrink(self) -> None:
        """Delete the oldest rows until the database is back to its low-water mark, a slice at a
        time: each slice's pages pass through the write-ahead log, which must stay in its budget."""
        db = self._db
        assert db is not None
        for _ in range(1000):
            used = self._used()
            if used <= self._low:
                break
            count = int(db.execute("SELECT count(*) FROM flows").fetchone()[0])
            if count == 0:
                break
            need = math.ceil(count * (1 - self._low / used))
            per_slice = max(1, int(count * (self._wal_budget / 8) / used))
            n = min(need, per_slice)
            db.execute("DELETE FROM flows WHERE id IN (SELECT id FROM flows ORDER BY id LIMIT ?)", (n,))
            self.stats.pruned_size += n
            self._release()

    def _release(self) -> None:
        """Hand freed pages back to the file system and keep the write-ahead log short."""
        assert self._db is not None
        self._db.execute("PRAGMA incremental_vacuum")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def disk_bytes(self) -> int:
        """The database, its write-ahead log and shared-memory index as on disk now."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        return total

    # -- reading (blocking: run in a thread; each call opens its own connection)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def query(self, flt: Filter, limit: int = 1000) -> tuple[list[Row], bool]:
        """The newest `limit` rows matching `flt`, oldest first; and whether more matched."""
        where, params = flt.where()
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM flows WHERE {where} ORDER BY t_end DESC, id DESC LIMIT ?",
                              [*params, limit + 1]).fetchall()
        more = len(rows) > limit
        return [_row_out(r) for r in reversed(rows[:limit])], more

    def aggregate(self, flt: Filter) -> list[Row]:
        """The replayable records matching `flt`, one row per distinct set of facts, with `count`,
        `first` and `last` (what `ambit policy simulate` and `suggest` read)."""
        where, params = flt.where()
        sql = (f"SELECT {_GROUP}, count(*) AS count, min(t_start) AS first, max(t_end) AS last, "
               f"max(dst_meta) AS dst_meta, node FROM flows WHERE {REPLAYABLE} AND {where} GROUP BY {_GROUP}")
        with self._reader() as db:
            return [_row_out(r) for r in db.execute(sql, params).fetchall()]

    def denials(self, since: float, window_start: float) -> list[SourceDenials]:
        """Denials per source since `since`: in the window (from `window_start`) and before it.
        A denial is counted once per connection on this node: a same-node connection's
        inbound twin of its outbound record is left out."""
        src = "COALESCE(src_workload, src_identity, src_ip, '?')"
        target = "COALESCE(dst_workload, dst_ip, '?') || ':' || COALESCE(dst_port, '')"
        sql = (f"SELECT {src} AS source, max(src_identity) AS identity, "
               "sum(t_end >= ?) AS recent, sum(t_end < ?) AS earlier, "
               f"count(DISTINCT CASE WHEN t_end >= ? THEN {target} END) AS targets, max(t_end) AS last "
               "FROM flows WHERE t_end >= ? AND verdict IN ('deny', 'dropped') "
               "AND NOT (kind = 'conn' AND direction = 'inbound' AND route = 'same-node') "
               f"GROUP BY {src}")
        top_sql = (f"SELECT {src} AS source, policy, count(*) AS n FROM flows WHERE t_end >= ? AND verdict IN "
                   f"('deny', 'dropped') GROUP BY {src}, policy ORDER BY n DESC")
        with self._reader() as db:
            rows = db.execute(sql, (window_start, window_start, window_start, since)).fetchall()
            top: dict[str, str | None] = {}
            for r in db.execute(top_sql, (window_start,)).fetchall():
                top.setdefault(r["source"], r["policy"])
        return [SourceDenials(r["source"], r["identity"], int(r["recent"] or 0), int(r["earlier"] or 0),
                              int(r["targets"] or 0), float(r["last"] or 0), top.get(r["source"]))
                for r in rows]

    def oldest(self) -> float | None:
        with self._reader() as db:
            v = db.execute("SELECT min(t_end) FROM flows").fetchone()[0]
        return float(v) if v is not None else None

    def recent_keys(self, kind: str, limit: int = 4096) -> list[str]:
        """The `rkey`s of the newest rows of a kind: what a restarted agent has written already."""
        with self._reader() as db:
            return [r[0] for r in db.execute(
                "SELECT rkey FROM flows WHERE kind = ? AND rkey IS NOT NULL ORDER BY id DESC LIMIT ?",
                (kind, limit)).fetchall()]

    def summary(self) -> dict[str, Any]:
        with self._reader() as db:
            count, first, last = db.execute("SELECT count(*), min(t_end), max(t_end) FROM flows").fetchone()
        s = self.stats
        return {"path": str(self.path), "rows": count, "oldest": first, "newest": last,
                "disk_bytes": self.disk_bytes(), "max_bytes": self.max_bytes, "max_age_seconds": self.max_age,
                "queued": len(self._queue), "written": s.written, "dropped": s.dropped,
                "pruned_by_age": s.pruned_age, "pruned_by_size": s.pruned_size, "last_error": s.last_error}


def _cell(v: Any, column: str) -> Any:
    if v is None:
        return None
    if column in _INT_COLUMNS:
        if isinstance(v, bool):
            return int(v)
        return v if isinstance(v, int) else None
    if column.startswith("t_"):
        return float(v)
    return v if isinstance(v, str) else str(v)


def _row_out(r: sqlite3.Row) -> Row:
    out = {k: r[k] for k in r.keys()}  # noqa: SIM118 (sqlite3.Row is not a mapping)
    for k in ("dst_meta", "extra"):
        if isinstance(out.get(k), str):
            try:
                out[k] = json.loads(out[k])
            except ValueError:
                out[k] = None
    if out.get("mtls") is not None:
        out["mtls"] = bool(out["mtls"])
    return out
