"""The flow history database (real SQLite files): filters, aggregation for replay, denials per
source, persistence across a reopen, and the age and size bounds under a flood."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent.history import Filter, FlowHistory, HistoryError, conn_row, drop_row, request_row

TD = "spiffe://cluster.local"


def zrec(i: int, src: str, dst: str, *, decision: str = "allow", started: float, direction: str = "inbound",
         route: str = "hbone", policy: str | None = None, port: int = 8080) -> dict[str, Any]:
    ns, sa = src.split("/")
    return {"id": i, "direction": direction, "src": f"10.0.0.{i % 250}:{40000 + i % 20000}", "dst": f"10.9.0.1:{port}",
            "src_workload": src, "dst_workload": dst, "src_identity": f"{TD}/ns/{ns}/sa/{sa}",
            "dst_identity": f"{TD}/ns/{dst.split('/')[0]}/sa/x", "mtls": True, "route": route, "decision": decision,
            "policy": policy, "rule": 0 if policy else None, "reason": "because", "state": "closed",
            "bytes_received": 10, "bytes_sent": 20, "age_s": 0.5, "started_at": started}


@pytest.fixture
def history(tmp_path: Path) -> Any:
    h = FlowHistory(tmp_path / "flows.db", max_bytes=8 * 2**20)
    h.open()
    yield h
    h.close()


def test_rows_are_queried_by_time_identity_verdict_and_policy(history: FlowHistory) -> None:
    now = time.time()
    rows = [
        conn_row(zrec(1, "shop/frontend", "shop/backend", started=now - 7200, policy="shop/allow-fe"), "node-b"),
        conn_row(zrec(2, "shop/catalog", "shop/backend", decision="deny", started=now - 60), "node-b"),
        conn_row(zrec(3, "shop/frontend", "shop/catalog", started=now - 30), "node-b"),
        conn_row(zrec(4, "shop/frontend", "shop/catalog", started=now - 20, direction="outbound"), "node-b"),
        request_row({"seq": 1, "time": now - 10, "method": "GET", "path": "/x", "status": 403, "decision": "deny",
                     "policy": "shop/l7", "rule": 1, "src_workload": "shop/catalog", "dst_workload": "shop/backend",
                     "src_identity": f"{TD}/ns/shop/sa/catalog", "authority": "backend:80", "dst_port": 8080},
                    "node-b", "wp1"),
        drop_row("drop_strict", "10.2.0.1", 5000, "10.9.0.1", 8080, "node-b", now - 5, {"10.2.0.1": "legacy/c"}.get,
                 "PeerAuthentication STRICT"),
    ]
    history.add(rows)
    assert history.flush()

    def q(**kw: Any) -> list[Any]:
        items, _ = history.query(Filter(**kw))
        return [(r["kind"], r["src_workload"], r["dst_workload"]) for r in items]

    assert len(q()) == 6
    assert len(q(since=now - 3600)) == 5 and len(q(until=now - 3600)) == 1
    assert q(source="shop/catalog", since=now - 3600) == [("conn", "shop/catalog", "shop/backend"),
                                                          ("request", "shop/catalog", "shop/backend")]
    # an identity, with or without the scheme; a wildcard
    assert len(q(source="cluster.local/ns/shop/sa/frontend")) == 3
    assert len(q(source=f"{TD}/ns/shop/sa/frontend")) == 3
    assert len(q(destination="shop/*")) == 5 and len(q(source="10.2.0.1")) == 1
    assert q(verdicts=("deny", "dropped")) == [("conn", "shop/catalog", "shop/backend"),
                                               ("request", "shop/catalog", "shop/backend"),
                                               ("drop", "legacy/c", None)]
    assert q(policy="shop/allow-*") == [("conn", "shop/frontend", "shop/backend")]
    assert len(q(pod="shop/catalog")) == 4
    items, more = history.query(Filter(), limit=2)
    assert more and [r["kind"] for r in items] == ["request", "drop"]  # the newest, oldest first
    row = items[0]
    assert row["mtls"] is True and row["status"] == 403 and isinstance(row["dst_port"], int)


def test_aggregate_keeps_one_row_per_replayable_fact_with_counts(history: FlowHistory) -> None:
    now = time.time()
    history.add(conn_row(zrec(i, "shop/frontend", "shop/backend", started=now - i), "node-b") for i in range(50))
    # outbound twins are not replayed: the destination's ztunnel decided
    history.add(conn_row(zrec(100 + i, "shop/frontend", "shop/backend", started=now, direction="outbound"), "n")
                for i in range(5))
    history.add([drop_row("drop_egress", "10.1.0.1", 1, "10.9.0.1", 80, "node-b", now, lambda ip: None, "bypass")])
    assert history.flush()
    agg = history.aggregate(Filter(since=now - 3600))
    # src_ip differs per record here (10.0.0.i): grouped by it, so 50 rows of one
    assert sum(r["count"] for r in agg) == 50 and {r["direction"] for r in agg} == {"inbound"}
    assert all(r["first"] <= r["last"] for r in agg)
    assert history.aggregate(Filter(namespace="other")) == []


def test_denials_per_source_count_a_connection_once(history: FlowHistory) -> None:
    now = time.time()
    rows = [conn_row(zrec(i, "shop/prober", f"shop/t{i % 7}", decision="deny", started=now - 30,
                          direction="outbound", route="hbone"), "node-a") for i in range(20)]
    # a same-node denial has an outbound and an inbound record: counted once
    rows += [conn_row(zrec(50, "shop/prober", "shop/t1", decision="deny", started=now - 30, direction=d,
                           route="same-node"), "node-a") for d in ("outbound", "inbound")]
    rows += [conn_row(zrec(60 + i, "shop/steady", "shop/db", decision="deny", started=now - 3000 - i * 60,
                           direction="outbound"), "node-a") for i in range(30)]
    rows += [conn_row(zrec(99, "shop/steady", "shop/db", decision="deny", started=now - 10, direction="outbound"),
                      "node-a")]
    history.add(rows)
    assert history.flush()
    by = {d.source: d for d in history.denials(now - 86400, now - 300)}
    assert (by["shop/prober"].recent, by["shop/prober"].earlier, by["shop/prober"].targets) == (21, 0, 7)
    assert (by["shop/steady"].recent, by["shop/steady"].earlier) == (1, 30)
    assert by["shop/prober"].identity == f"{TD}/ns/shop/sa/prober"


def test_the_history_survives_a_reopen(tmp_path: Path) -> None:
    now = time.time()
    h = FlowHistory(tmp_path / "flows.db")
    h.open()
    h.add(conn_row(zrec(i, "shop/a", "shop/b", started=now), "node-a") for i in range(10))
    h.close()  # writes what is queued
    h2 = FlowHistory(tmp_path / "flows.db")
    h2.open()
    try:
        assert len(h2.query(Filter())[0]) == 10
        assert set(h2.recent_keys("conn")) == {f"{now}:{i}" for i in range(10)}
    finally:
        h2.close()


def test_the_age_bound_deletes_old_records(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    h = FlowHistory(tmp_path / "flows.db", max_age=3600, clock=lambda: clock[0])
    h.open()
    try:
        h.add(conn_row(zrec(i, "shop/a", "shop/b", started=clock[0] - 7200 + i * 100), "n") for i in range(72))
        assert h.flush()
        clock[0] += 10  # the next maintenance pass
        h._last_maintenance = 0.0
        h.add([conn_row(zrec(999, "shop/a", "shop/b", started=clock[0]), "n")])
        assert h.flush()
        kept = h.query(Filter(), limit=1000)[0]
        assert all(r["t_end"] >= clock[0] - 3600 for r in kept) and h.stats.pruned_age >= 35
    finally:
        h.close()


def test_a_flood_stays_within_the_size_bound(tmp_path: Path) -> None:
    max_bytes = 2**20
    h = FlowHistory(tmp_path / "flows.db", max_bytes=max_bytes, flush_interval=0.05)
    h.open()
    now = time.time()
    peak = 0
    try:
        t0 = time.monotonic()
        for batch in range(40):
            added = time.monotonic()
            h.add(conn_row(zrec(batch * 2500 + i, f"shop/c{i % 50}", f"shop/s{i % 13}", started=now + batch),
                           "node-a") for i in range(2500))
            # adding never waits for the disk
            assert time.monotonic() - added < 0.5
            while len(h._queue) > 5000:  # the agent's rate: what the ztunnel closes, well below this
                peak = max(peak, h.disk_bytes())
                time.sleep(0.01)
            peak = max(peak, h.disk_bytes())
        assert h.flush(60)
        elapsed = time.monotonic() - t0
        peak = max(peak, h.disk_bytes())
        s = h.summary()
        print(f"\nflood: 100000 records in {elapsed:.1f}s ({100000 / elapsed:.0f}/s), {s['rows']} kept, "
              f"{s['disk_bytes']} bytes on disk (peak {peak}, bound {max_bytes})")
        assert peak <= max_bytes, (peak, s)
        assert s["written"] == 100_000 and s["dropped"] == 0 and s["pruned_by_size"] > 0
        # the newest are kept, the oldest went first
        newest = h.query(Filter(), limit=1)[0][0]
        assert newest["t_start"] == now + 39
        assert 1000 < s["rows"] < 100_000
    finally:
        h.close()


def test_a_writer_that_falls_behind_drops_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FlowHistory, "QUEUE_MAX", 10)
    h = FlowHistory(tmp_path / "flows.db", flush_interval=60)
    h.open()
    try:
        h._wake.clear()
        h.add(conn_row(zrec(i, "shop/a", "shop/b", started=1.0), "n") for i in range(25))
        assert h.stats.dropped >= 15
    finally:
        h.close()


def test_a_damaged_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "flows.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(HistoryError, match="move it away"):
        FlowHistory(bad).open()
    with pytest.raises(HistoryError, match="too small"):
        FlowHistory(tmp_path / "x.db", max_bytes=1000)
