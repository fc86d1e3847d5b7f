"""The agent's Prometheus metrics: what the kernel dropped and whether the node's redirection holds.

Nothing is counted on a hot path: every value is read when Prometheus scrapes,
from a `NodeView` the agent gives (its pods, the kernel's per-cgroup drop
counters, its ztunnel's readiness). Served as `/metrics` on the agent's admin
listener (127.0.0.1:15010) and, for Prometheus on other hosts, on its
metrics-only listener (`ambit agent run --metrics`, 15014 in the DaemonSet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The kernel's drop counters per pod (agent.bpf.DropCounts), by the label they carry.
DIRECTIONS = ("egress", "ingress", "inbound_strict")


@dataclass(frozen=True)
class PodDrops:
    """One enrolled pod's bypass drops: TCP packets the kernel dropped because they did not
    go through the ztunnel (`egress`: out of the pod, `ingress`: into it around the
    ztunnel, `inbound_strict`: plaintext into a STRICT port)."""

    namespace: str
    pod: str
    egress: int = 0
    ingress: int = 0
    inbound_strict: int = 0


@dataclass(frozen=True)
class NodeView:
    node: str
    drops: tuple[PodDrops, ...]
    redirected: int  # enrolled pods whose programs are attached
    retrying: int  # pods the agent could not set up yet (it retries)
    ztunnel_ready: bool


class _Collector:
    def __init__(self, view: Callable[[], NodeView]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        v = self._view()
        drops = CounterMetricFamily(
            "ambit_bypass_drops",
            "TCP packets of enrolled pods the kernel dropped because they bypassed the ztunnel",
            labels=("node", "namespace", "pod", "direction"),
        )
        for p in v.drops:
            for d in DIRECTIONS:
                drops.add_metric((v.node, p.namespace, p.pod, d), getattr(p, d))
        yield drops
        pods = GaugeMetricFamily("ambit_agent_pods", "Pods the node agent manages, by state",
                                 labels=("node", "state"))
        pods.add_metric((v.node, "redirected"), v.redirected)
        pods.add_metric((v.node, "retrying"), v.retrying)
        yield pods
        ready = GaugeMetricFamily("ambit_agent_ztunnel_ready",
                                  "1 when the node's ztunnel reports ready on its admin endpoint, else 0",
                                  labels=("node",))
        ready.add_metric((v.node,), 1.0 if v.ztunnel_ready else 0.0)
        yield ready


class AgentMetrics:
    """`render()` is the body of `/metrics`, read from `view()` at each call."""

    def __init__(self, view: Callable[[], NodeView]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(view))  # type: ignore[arg-type]

    def render(self) -> bytes:
        out: bytes = generate_latest(self.registry)
        return out


def split_pod_key(key: str) -> tuple[str, str]:
    """`ns/name` -> (namespace, name)."""
    ns, _, name = key.partition("/")
    return (ns, name) if name else ("", ns)


def pod_drops(rows: Iterable[tuple[str, int, int, int]]) -> tuple[PodDrops, ...]:
    """(pod key, egress, ingress, inbound_strict) rows -> PodDrops, by pod."""
    return tuple(PodDrops(*split_pod_key(k), egress=e, ingress=i, inbound_strict=s) for k, e, i, s in sorted(rows))
