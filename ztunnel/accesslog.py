"""The access log: one JSON line per connection when it closes, allowed or denied, with what
each dry-run policy in scope would have decided (`dry_run`: policy, rule, decision, reason)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

from ztunnel.conntrack import ConnRecord

log = logging.getLogger("ambit.ztunnel.accesslog")


def entry(rec: ConnRecord) -> dict[str, Any]:
    """The log fields of a finished connection (bytes use Istio's sent/received meaning)."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(rec.started_wall))
        + f".{int((rec.started_wall % 1) * 1000):03d}Z",
        "direction": rec.direction,
        "src": f"{rec.src_ip}:{rec.src_port}",
        "dst": f"{rec.dst_ip}:{rec.dst_port}",
        "original_dst": rec.original_dst,
        "client_ip": rec.client_ip,
        "src_workload": rec.src_workload,
        "dst_workload": rec.dst_workload,
        "dst_service": rec.dst_service,
        "waypoint": rec.waypoint,
        "src_identity": rec.src_identity,
        "dst_identity": rec.dst_identity,
        "src_cert_serial": rec.src_cert_serial,
        "mtls": rec.mtls,
        "route": rec.route,
        "decision": rec.decision,
        "policy": rec.policy,
        "rule": rec.rule,
        "reason": rec.reason,
        "dry_run": rec.dry_run,
        "response_flags": rec.response_flags,
        "bytes_received": rec.counters.received,
        "bytes_sent": rec.counters.sent,
        "duration_ms": round(rec.duration * 1000, 3),
        "error": rec.error,
    }


class AccessLog:
    """Writes JSON lines to a file path, or stdout for "-"."""

    def __init__(self, target: str = "-") -> None:
        self.target = target
        self._owned = target != "-"
        self._out: IO[str] = open(target, "a", buffering=1) if self._owned else sys.stdout  # noqa: SIM115

    def write(self, rec: ConnRecord) -> None:
        try:
            self._out.write(json.dumps(entry(rec), separators=(",", ":")) + "\n")
            if not self._owned:
                self._out.flush()
        except (OSError, ValueError) as e:
            # a full disk or closed stdout must not take the data path down
            log.warning("access log %s: write failed: %s", self.target, e)

    def close(self) -> None:
        if self._owned:
            self._out.close()
