"""Node flows: the kernel's view of each TCP flow joined with the ztunnel's verdict on it.

Pure. The eBPF side (agent.flows.FlowTable) knows every flow of an enrolled pod,
its bytes and RTT, and every dropped bypass attempt; the ztunnel's connection
records know the identities, mTLS, and the policy that decided. The join keys:
- outbound: the pod's own socket (pod IP:port) is the peer the ztunnel accepted;
- inbound: the ztunnel's connection to the pod (its local IP:port) is the peer
  of the pod's accepted socket.
One row per connection, in the shape `ambit flows` prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ambit.policy import DryRun, Verdict

# The verdicts this module writes or reads; the ztunnel's records carry theirs as `decision`.
DROPPED: Verdict = "dropped"  # the kernel dropped a bypass attempt
DENY: Verdict = "deny"

DROP_POLICY = {
    "drop_egress": "ambit/no-bypass: TCP from an enrolled pod that did not go through the ztunnel",
    "drop_ingress": "ambit/no-bypass: TCP into an enrolled pod that did not come from the ztunnel",
    "drop_strict": "PeerAuthentication STRICT: plaintext into this pod is refused",
}


def _port(addr: str | None) -> int | None:
    if not addr or ":" not in addr:
        return None
    try:
        return int(addr.rsplit(":", 1)[1])
    except ValueError:
        return None


def _ip(addr: str | None) -> str | None:
    return addr.rsplit(":", 1)[0] if addr and ":" in addr else addr


def join_flows(
    kernel: Iterable[Mapping[str, Any]],
    ztunnel: Iterable[Mapping[str, Any]],
    now_ns: int,
    pod_by_ip: Mapping[str, str] | None = None,
    now_wall: float | None = None,
) -> list[dict[str, Any]]:
    """Join kernel flow records and ztunnel connection records into `ambit flows` rows.

    `now_ns` is the kernel's monotonic clock (flow event times), `now_wall` the wall
    clock (the ztunnel's `started_at`). Drops of one connection attempt (the SYN and
    its retransmissions) are folded into one row with a packet count.
    """
    pods = pod_by_ip or {}
    outbound_by_src: dict[str, Mapping[str, Any]] = {}
    inbound_by_peer: dict[str, Mapping[str, Any]] = {}
    drops: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rec in kernel:
        if rec.get("state") == "dropped":
            key = (str(rec.get("kind")), str(rec.get("src")), str(rec.get("dst")))
            seen = drops.get(key)
            if seen is None:
                drops[key] = {**rec, "packets": 1}
            else:
                seen["packets"] += 1
                seen["ts_ns"] = max(seen.get("ts_ns") or 0, rec.get("ts_ns") or 0)
        elif rec.get("kind") == "outbound":
            outbound_by_src[str(rec.get("src"))] = rec
        elif rec.get("kind") == "inbound":
            inbound_by_peer[str(rec.get("dst"))] = rec
    used: set[int] = set()
    rows: list[dict[str, Any]] = []
    for z in ztunnel:
        direction = z.get("direction", "")
        k: Mapping[str, Any] | None = None
        if direction == "outbound":
            k = outbound_by_src.get(str(z.get("src")))
        elif z.get("upstream_local"):
            k = inbound_by_peer.get(str(z.get("upstream_local")))
        if k is not None:
            used.add(id(k))
        dst_addr = z.get("original_dst") or z.get("dst")
        rows.append(
            {
                "direction": direction,
                "source_pod": z.get("src_workload") or pods.get(_ip(z.get("src")) or ""),
                "source_addr": z.get("src"),
                "source_identity": z.get("src_identity"),
                "destination_pod": z.get("dst_workload") or z.get("dst_service"),
                "destination_addr": dst_addr,
                "destination_identity": z.get("dst_identity"),
                "destination_port": _port(z.get("dst")),
                "security": "mutual_tls" if z.get("mtls") else "none",
                "route": z.get("route"),
                "waypoint": z.get("waypoint"),
                "verdict": z.get("decision"),
                "policy": _policy(z),
                "reason": z.get("reason"),
                # what dry-run policies would have decided: [{policy, rule, decision, reason}]
                "dry_run": list(z.get("dry_run") or []),
                "state": z.get("state"),
                # request bytes (source -> destination), response bytes back, as Istio counts them
                "bytes_sent": z.get("bytes_received"),
                "bytes_received": z.get("bytes_sent"),
                "rtt_us": k.get("srtt_us") if k else None,
                "age_seconds": _wall_age(z, now_wall),
                "duration_seconds": z.get("age_s"),
                "kernel": _kernel_view(k),
                "error": z.get("error"),
            }
        )
    for d in drops.values():
        # The packet's own source and destination: for egress drops the pod is the source.
        src, dst = d.get("src"), d.get("dst")
        rows.append(
            {
                "direction": "outbound" if d.get("kind") == "drop_egress" else "inbound",
                "source_pod": pods.get(_ip(src) or ""),
                "source_addr": src,
                "destination_pod": pods.get(_ip(dst) or ""),
                "destination_addr": dst,
                "destination_port": _port(dst),
                "security": "none",
                "route": "bypass",
                "verdict": DROPPED,
                "policy": DROP_POLICY.get(str(d.get("kind")), str(d.get("kind"))),
                "state": "dropped",
                "age_seconds": _age(d.get("ts_ns"), now_ns),
                "kernel": {"event": d.get("kind"), "cgroup_id": d.get("cgroup_id"), "packets": d.get("packets")},
            }
        )
    for kf in [*outbound_by_src.values(), *inbound_by_peer.values()]:
        if id(kf) in used:
            continue
        # A flow the ztunnel has no record of (yet, or any more: its ring is bounded).
        rows.append(
            {
                "direction": kf.get("kind"),
                "source_pod": kf.get("pod") if kf.get("kind") == "outbound" else None,
                "source_addr": kf.get("src") if kf.get("kind") == "outbound" else kf.get("dst"),
                "destination_pod": None if kf.get("kind") == "outbound" else kf.get("pod"),
                "destination_addr": kf.get("original_dst") or (kf.get("dst") if kf.get("kind") == "outbound" else kf.get("src")),
                "destination_port": _port(kf.get("original_dst") or kf.get("dst")),
                "security": None,
                "route": "kernel-only",
                "verdict": None,
                "policy": None,
                "state": kf.get("state"),
                "bytes_sent": kf.get("bytes_sent"),
                "bytes_received": kf.get("bytes_received"),
                "rtt_us": kf.get("srtt_us"),
                "age_seconds": _age(kf.get("opened_ns"), now_ns),
                "kernel": _kernel_view(kf),
            }
        )
    return rows


def _policy(z: Mapping[str, Any]) -> str | None:
    if not z.get("policy"):
        # Istio's default deny: ALLOW policies select the workload and none matched.
        return "(default deny: no ALLOW policy matched)" if z.get("decision") == DENY else None
    rule = z.get("rule")
    return f"{z['policy']}" + (f" rule {rule}" if rule is not None else "")


def dry_run_words(items: Iterable[Mapping[str, Any]] | None) -> str | None:
    """`would deny by ns/name rule N` for each dry-run result ("; " between), None for none."""
    return "; ".join(DryRun(d["policy"], d.get("rule"), d["decision"], d.get("reason", "")).words()
                     for d in items or ()) or None


def _wall_age(z: Mapping[str, Any], now_wall: float | None) -> Any:
    started = z.get("started_at")
    if now_wall is not None and isinstance(started, int | float):
        return max(0.0, now_wall - started)
    return z.get("age_s")


def _age(ts_ns: Any, now_ns: int) -> float | None:
    if not isinstance(ts_ns, int) or ts_ns <= 0:
        return None
    return max(0.0, (now_ns - ts_ns) / 1e9)


def _kernel_view(k: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if k is None:
        return None
    return {
        "cookie": k.get("cookie"),
        "src": k.get("src"),
        "dst": k.get("dst"),
        "original_dst": k.get("original_dst"),
        "state": k.get("state"),
        "bytes_sent": k.get("bytes_sent"),
        "bytes_received": k.get("bytes_received"),
    }
