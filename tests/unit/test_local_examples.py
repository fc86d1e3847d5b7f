"""The demo manifests in examples/ parse, and mean what the demo says, by the real policy engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.local.cluster import read_manifests
from ambit.cluster import build_state
from ambit.policy import ConnectionFacts, authorize, mtls_mode
from ambit.snapshot import build_snapshot
from ambit.spiffe import SpiffeId

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _cluster() -> Any:
    objs = read_manifests([EXAMPLES])
    ips = {"backend": "10.1.1.2", "frontend": "10.1.0.2", "client": "10.1.0.3", "catalog": "10.1.0.4"}
    for o in objs:
        if o["kind"] == "Pod":
            o["status"] = {"podIP": ips[o["metadata"]["name"]], "phase": "Running"}
    nodes = [
        {"kind": "Node", "metadata": {"name": n}, "status": {"addresses": [{"type": "InternalIP", "address": a}]}}
        for n, a in (("node-a", "10.200.1.10"), ("node-b", "10.200.1.11"))
    ]
    return build_state([*objs, *nodes])


def test_examples_describe_the_demo() -> None:
    state = _cluster()
    assert set(state.namespaces) == {"shop", "legacy"}
    pods = {k[1]: p for k, p in state.pods.items()}
    assert pods["frontend"].node_name == "node-a" and pods["backend"].node_name == "node-b"
    assert state.is_enrolled(pods["frontend"]) and state.is_enrolled(pods["backend"])
    assert not state.is_enrolled(pods["client"])
    assert pods["catalog"].node_name == "node-a" and state.is_enrolled(pods["catalog"])
    for name in ("backend", "catalog"):
        svc = state.services[("shop", name)]
        assert [p.name for p in state.service_endpoints(svc)] == [name]
    assert all(p.command and p.command[0] == "python3" for p in pods.values() if p.name != "client")


def test_examples_policy_allows_only_the_frontend_with_mtls() -> None:
    snap = build_snapshot(_cluster(), "node-b")
    assert snap.errors == ()
    backend = snap.workload_by_ip("10.1.1.2")
    assert backend is not None
    assert mtls_mode(backend, 8080, snap.policies) == "STRICT"
    frontend = SpiffeId("cluster.local", "shop", "frontend")
    other = SpiffeId("cluster.local", "shop", "catalog")
    assert authorize(ConnectionFacts("10.1.0.2", frontend, backend, 8080, True), snap.policies).allowed
    assert not authorize(ConnectionFacts("10.1.0.2", other, backend, 8080, True), snap.policies).allowed
    # the unenrolled legacy client speaks plaintext: STRICT refuses it
    assert not authorize(ConnectionFacts("10.1.0.3", None, backend, 8080, False), snap.policies).allowed
