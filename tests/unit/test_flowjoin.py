"""Joining the kernel's flow records with the ztunnel's connection records."""

from __future__ import annotations

from agent.flowjoin import join_flows

NOW = 10_000_000_000

KERNEL = [
    # the client pod's own socket, redirected to the ztunnel (outbound)
    {"kind": "outbound", "state": "closed", "cookie": 1, "src": "10.1.1.5:40000", "dst": "10.1.1.1:15001",
     "original_dst": "10.1.2.7:8080", "bytes_sent": 100, "bytes_received": 900, "srtt_us": 120, "pod": "shop/frontend",
     "opened_ns": NOW - 2_000_000_000},
    # the server pod's accepted socket; its peer is the ztunnel's upstream connection (inbound)
    {"kind": "inbound", "state": "open", "cookie": 2, "src": "10.1.1.9:8080", "dst": "10.1.1.1:51000",
     "original_dst": None, "bytes_sent": 0, "bytes_received": 0, "srtt_us": 80, "pod": "shop/backend",
     "opened_ns": NOW - 1_000_000_000},
    # a raw-socket SYN that never went through the ztunnel
    {"kind": "drop_egress", "state": "dropped", "src": "10.1.1.5:1234", "dst": "10.1.2.7:8080", "cgroup_id": 77,
     "ts_ns": NOW - 500_000_000},
    {"kind": "drop_egress", "state": "dropped", "src": "10.1.1.5:1234", "dst": "10.1.2.7:8080", "cgroup_id": 77,
     "ts_ns": NOW - 400_000_000},  # the SYN's retransmission: same attempt
    # a flow the ztunnel has no record of
    {"kind": "outbound", "state": "open", "cookie": 3, "src": "10.1.1.5:40001", "dst": "10.1.1.1:15001",
     "original_dst": "10.1.2.7:9090", "srtt_us": 50, "pod": "shop/frontend", "opened_ns": NOW - 3_000_000_000},
]
ZTUNNEL = [
    {"direction": "outbound", "src": "10.1.1.5:40000", "dst": "10.1.2.7:8080", "src_workload": "shop/frontend",
     "dst_workload": "shop/backend", "src_identity": "spiffe://cluster.local/ns/shop/sa/frontend",
     "dst_identity": "spiffe://cluster.local/ns/shop/sa/backend", "mtls": True, "decision": "allow",
     "policy": "shop/allow-frontend", "rule": 0, "bytes_received": 100, "bytes_sent": 900, "age_s": 2.0,
     "started_at": 1000.0,
     "state": "closed", "route": "hbone"},
    {"direction": "inbound", "src": "10.200.1.11:33333", "dst": "10.1.1.9:8080", "upstream_local": "10.1.1.1:51000",
     "src_workload": "legacy/client", "dst_workload": "shop/backend", "mtls": False, "decision": "deny",
     "policy": "shop/allow-frontend", "rule": None, "age_s": 1.0, "state": "refused", "route": "plaintext"},
]


def test_join_by_socket_keys() -> None:
    rows = join_flows(KERNEL, ZTUNNEL, NOW, {"10.1.1.5": "shop/frontend", "10.1.2.7": "shop/backend"}, 1030.0)
    out, inb, drop, orphan = rows
    assert out["security"] == "mutual_tls" and out["verdict"] == "allow"
    assert out["source_identity"].endswith("/sa/frontend") and out["destination_identity"].endswith("/sa/backend")
    assert out["policy"] == "shop/allow-frontend rule 0" and out["rtt_us"] == 120
    assert out["age_seconds"] == 30.0 and out["duration_seconds"] == 2.0
    assert out["bytes_sent"] == 100 and out["bytes_received"] == 900 and out["kernel"]["cookie"] == 1
    assert inb["verdict"] == "deny" and inb["security"] == "none" and inb["kernel"]["cookie"] == 2
    assert drop["verdict"] == "dropped" and drop["source_pod"] == "shop/frontend"
    assert drop["destination_pod"] == "shop/backend" and "no-bypass" in drop["policy"]
    assert abs(drop["age_seconds"] - 0.4) < 1e-9 and drop["kernel"]["packets"] == 2
    assert orphan["route"] == "kernel-only" and orphan["destination_port"] == 9090 and orphan["verdict"] is None


def test_no_kernel_records_still_lists_ztunnel_connections() -> None:
    rows = join_flows([], ZTUNNEL, NOW)
    assert [r["verdict"] for r in rows] == ["allow", "deny"] and rows[0]["rtt_us"] is None
