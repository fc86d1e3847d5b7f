"""The agent's bounded table of TCP flows seen by the datapath (sock_ops events)
and of dropped bypass attempts. Pure: fed `FlowEvent`s, read with `snapshot()`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from agent.bpf import FlowEvent

PodByIp = Callable[[str], "str | None"]


class FlowTable:
    """Flows keyed by socket cookie (open -> close), newest last; the oldest are evicted past `max_entries`."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._flows: OrderedDict[tuple[str, int, int], dict[str, Any]] = OrderedDict()
        self._seq = 0

    def ingest(self, ev: FlowEvent, pod_by_ip: PodByIp = lambda ip: None) -> None:
        if ev.kind.startswith("drop"):
            self._seq += 1
            self._put(("drop", self._seq, 0), {
                "kind": ev.kind, "state": "dropped", "pod": pod_by_ip(ev.src) or pod_by_ip(ev.dst),
                "src": f"{ev.src}:{ev.sport}", "dst": f"{ev.dst}:{ev.dport}", "cgroup_id": ev.cgroup_id,
                "ts_ns": ev.ts_ns,
            })
            return
        key = ("flow", ev.cookie, 0)
        rec = self._flows.get(key)
        if ev.kind in ("open_active", "open_passive"):
            rec = {
                "kind": "outbound" if ev.kind == "open_active" else "inbound",
                "state": "open", "pod": pod_by_ip(ev.src), "cookie": ev.cookie,
                "src": f"{ev.src}:{ev.sport}", "dst": f"{ev.dst}:{ev.dport}",
                "original_dst": f"{ev.orig_dst}:{ev.orig_dport}" if ev.orig_dst else None,
                "opened_ns": ev.ts_ns, "closed_ns": None, "bytes_sent": 0, "bytes_received": 0, "srtt_us": ev.srtt_us,
            }
            self._put(key, rec)
        elif ev.kind == "close":
            if rec is None:  # opened before the agent (re)started
                rec = {"kind": "unknown", "pod": pod_by_ip(ev.src), "cookie": ev.cookie, "src": f"{ev.src}:{ev.sport}",
                       "dst": f"{ev.dst}:{ev.dport}", "original_dst": None, "opened_ns": None}
            rec.update(state="closed", closed_ns=ev.ts_ns, bytes_sent=ev.bytes_acked,
                       bytes_received=ev.bytes_received, srtt_us=ev.srtt_us)
            self._put(key, rec)

    def _put(self, key: tuple[str, int, int], rec: dict[str, Any]) -> None:
        self._flows[key] = rec
        self._flows.move_to_end(key)
        while len(self._flows) > self.max_entries:
            self._flows.popitem(last=False)

    def snapshot(self) -> list[dict[str, Any]]:
        """Copies of every record, oldest first."""
        return [dict(r) for r in self._flows.values()]
