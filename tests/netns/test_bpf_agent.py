"""The agent's reconcile pass on the real datapath: enroll by namespace label,
annotate, STRICT from PeerAuthentication, unenroll by pod label; admin views."""

from __future__ import annotations

from pathlib import Path

from agent.agentd import Agent, AgentConfig
from agent.enroll import Annotate
from ambit.cluster import ClusterState, Pod, build_state, load_documents
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
        assert agent.admin_view("/pods")[1][0]["attached"] is True
        agent.reconcile(state(extra=STRICT))
        assert agent.actual["shop/web"].mode == "STRICT"
        assert env.dp.pods()[agent.actual["shop/web"].cgroup_ids[0]]["mode"] == "STRICT"
        agent.reconcile(state(labels="ambit.dev/dataplane-mode: none"))
        assert "shop/web" not in agent.actual
        assert not any(env.dp.pod_attached(env.cg["pod"]).values())
        assert client.ask(f"tcp {NODE_IP} 8080").startswith("APP")
        assert agent.admin_view("/nope")[0] == 404
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
