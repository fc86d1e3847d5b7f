"""The agent's reconcile pass on the real datapath: enroll by namespace label,
annotate, STRICT from PeerAuthentication, unenroll by pod label; admin views."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agent.agentd import Agent, AgentConfig
from agent.enroll import Annotate
from ambit.cluster import ClusterState, Pod, build_state, load_documents
from ambit.http import HttpServer
from ambit.sources import LocalDirSource
from tests.netns.test_bpf import CLIENT, GW2, NODE_IP, POD_IP, Env, env  # noqa: F401  (fixture)

DOCS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {POD_LABELS}}
spec: {nodeName: n1, containers: [{name: c, command: [sleep, "1"]}]}
status: {podIP: 10.77.1.2, phase: Running}
"""
STRICT = """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""


class FixtureRuntime:
    """The fixture's one pod as a PodRuntime (the local cluster's runtime is tested by its owner)."""

    def __init__(self, env: Env) -> None:  # noqa: F811
        self.env = env

    def cgroup_path(self, pod: Pod) -> Path | None:
        return self.env.cg["pod"] if pod.name == "web" else None

    def netns_path(self, pod: Pod) -> Path | None:
        return Path("/run/netns") / self.env.ns["pod"]

    def host_interface(self, pod: Pod) -> str | None:
        return self.env.node_ifs[0]

    def node_interfaces(self) -> list[str]:
        return [self.env.node_ifs[1]]


class Annotations:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], str | None] = {}

    def set_annotation(self, pod: Pod, key: str, value: str | None) -> None:
        self.values[(pod.key, key)] = value


def state(labels: str = "", extra: str = "") -> ClusterState:
    return build_state(load_documents(DOCS.replace("POD_LABELS", labels) + extra))


def admin(agent: Agent, path: str) -> tuple[int, Any]:
    """GET `path` from the agent's admin routes (the HTTP server's own dispatch, no socket)."""
    resp = asyncio.run(HttpServer("agent admin", agent.admin_routes()).dispatch("GET", path))
    return resp.status, json.loads(resp.body)


STRICT_TYPO = STRICT.replace("mode: STRICT", "mode: STRCT")


def test_last_good_strict_survives_an_invalid_edit_and_an_agent_restart(env: Env, tmp_path: Path) -> None:  # noqa: F811
    """Issue 8, hole 4: an invalid edit of a STRICT PeerAuthentication keeps STRICT in the
    kernel, also in a restarted agent (the last good policies are saved on the node)."""
    cfg = AgentConfig(node="n1", ztunnel_outbound=(NODE_IP, 15001), ztunnel_inbound=(NODE_IP, 15006),
                      ztunnel_addresses=[NODE_IP, GW2], ztunnel_cgroup=env.cg["ztunnel"],
                      node_netns=Path("/run/netns") / env.ns["node"], state_dir=tmp_path / "node")

    def new_agent() -> Agent:
        return Agent(source=LocalDirSource(tmp_path), runtime=FixtureRuntime(env), annotator=Annotations(),
                     datapath=env.dp, config=cfg)

    def kernel_mode(agent: Agent) -> str:
        return str(env.dp.pods()[agent.actual["shop/web"].cgroup_ids[0]]["mode"])

    first = new_agent()
    try:
        first.reconcile(state(extra=STRICT))
        assert kernel_mode(first) == "STRICT"
        first.reconcile(state(extra=STRICT_TYPO))
        assert kernel_mode(first) == "STRICT", "an invalid edit must keep the last good STRICT"
        assert first.snapshot is not None and any("STRCT" in e for e in first.snapshot.errors)
        # a restarted agent (same node, same state dir) sees only the invalid object
        second = new_agent()
        second.reconcile(state(extra=STRICT_TYPO))
        assert kernel_mode(second) == "STRICT", "the restarted agent forgot the last good version"
        assert second.snapshot is not None
        assert "PeerAuthentication/shop/strict" in second.snapshot.policies.by_key
        # a valid edit replaces it, and a deletion removes it
        second.reconcile(state(extra=STRICT.replace("STRICT", "PERMISSIVE")))
        assert kernel_mode(second) == "PERMISSIVE"
        second.reconcile(state())
        assert second.snapshot is not None and not second.snapshot.policies.peer_authn
    finally:
        env.dp.set_pod(env.cg["pod"], POD_IP, enrolled=False)


def test_agent_reconcile(env: Env, tmp_path: Path) -> None:  # noqa: F811
    ann = Annotations()
    cfg = AgentConfig(node="n1", ztunnel_outbound=(NODE_IP, 15001), ztunnel_inbound=(NODE_IP, 15006),
                      ztunnel_addresses=[NODE_IP, GW2], ztunnel_cgroup=env.cg["ztunnel"],
                      node_netns=Path("/run/netns") / env.ns["node"])
    agent = Agent(source=LocalDirSource(tmp_path), runtime=FixtureRuntime(env), annotator=ann,
                  datapath=env.dp, config=cfg)
    client = env.spawn("pod", CLIENT, cgroup="pod")
    try:
        agent.reconcile(state())
        assert ann.values[("shop/web", "ambit.dev/redirection")] == "enabled"
        assert client.ask("tcp 10.77.9.9 8080").startswith("ORIG 10.77.9.9:8080")
        # idempotent: the second pass only repeats the annotation (the in-memory annotator does not change the YAML)
        assert agent.reconcile(state()) == [Annotate("shop/web", "enabled")]
        assert admin(agent, "/pods")[1][0]["attached"] is True
        agent.reconcile(state(extra=STRICT))
        assert agent.actual["shop/web"].mode == "STRICT"
        assert env.dp.pods()[agent.actual["shop/web"].cgroup_ids[0]]["mode"] == "STRICT"
        agent.reconcile(state(labels="ambit.dev/dataplane-mode: none"))
        assert "shop/web" not in agent.actual
        assert not any(env.dp.pod_attached(env.cg["pod"]).values())
        assert client.ask(f"tcp {NODE_IP} 8080").startswith("APP")
        assert admin(agent, "/nope")[0] == 404
    finally:
        client.stop()
        env.procs.remove(client)
        env.dp.attach_pod(env.cg["pod"])


class MissingInterfaceRuntime(FixtureRuntime):
    def node_interfaces(self) -> list[str]:
        return [*super().node_interfaces(), "ambit-nosuch0"]


def test_interface_attach_failure_is_pending_and_retried(env: Env, tmp_path: Path) -> None:  # noqa: F811
    cfg = AgentConfig(node="n1", ztunnel_outbound=(NODE_IP, 15001), ztunnel_inbound=(NODE_IP, 15006),
                      ztunnel_addresses=[NODE_IP, GW2], ztunnel_cgroup=env.cg["ztunnel"],
                      node_netns=Path("/run/netns") / env.ns["node"])
    agent = Agent(source=LocalDirSource(tmp_path), runtime=MissingInterfaceRuntime(env), annotator=Annotations(),
                  datapath=env.dp, config=cfg)
    agent.reconcile(state())
    # the failure survives the rest of the pass: /status shows it and the short retry interval applies
    assert "iface/ambit-nosuch0" in agent.retries
    assert any(p["pod"] == "iface/ambit-nosuch0" for p in agent.status_view()["pending"])
    assert agent.status_view()["healthy"] is False
