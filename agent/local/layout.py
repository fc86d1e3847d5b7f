"""The local cluster's naming and address plan: pure functions of the state dir and node index.

Every name (network namespaces, cgroups, BPF pin dir, interfaces) and every
address is derived from the cluster id, a short hash of the state dir's real
path, so several clusters can live side by side and `down` can find all that a
cluster made even when its state dir is damaged.

Addresses (k = 1 + cid mod 95, so two clusters rarely share a plan, and never
collide with 10.96.0.0/16 or 10.200.0.0/16):
  fabric          10.200.k.0/24   control netns (CA) .2, node i .(10+i)
  pods of node i  10.k.i.0/24     gateway (node bridge) .1, pods .2-.254
  service VIPs    10.96.0.0/16    from 10.96.0.10 upwards
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.local import LocalError

DEFAULT_STATE_DIR = Path("/run/ambit/local")
BPF_ROOT = Path("/sys/fs/bpf/ambit")
MAX_NODES = 16
CA_PORT = 15012
SERVICE_RANGE = ipaddress.ip_network("10.96.0.0/16")
FABRIC_BRIDGE = "fab0"
NODE_BRIDGE = "cbr0"
NODE_UPLINK = "eth0"
POD_IFNAME = "eth0"
TRUST_DOMAIN = "cluster.local"


def cluster_id(state_dir: Path) -> str:
    """8 hex digits of sha256 over the state dir's real path."""
    real = os.path.realpath(state_dir)
    return hashlib.sha256(real.encode()).hexdigest()[:8]


def node_names(n: int) -> list[str]:
    """node-a, node-b, ... (n between 1 and MAX_NODES)."""
    if not 1 <= n <= MAX_NODES:
        raise LocalError(f"--nodes {n}: a local cluster has 1 to {MAX_NODES} nodes")
    return [f"node-{chr(ord('a') + i)}" for i in range(n)]


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    netns: str
    address: str  # on the fabric
    pod_cidr: str
    gateway: str  # the node's address on its pod bridge; the pods' default route
    bpf_dir: str
    cgroup: str  # relative to the cgroup2 root


@dataclass(frozen=True)
class Layout:
    """Everything `up` decides, written to <state>/cluster.json and read by every other command."""

    state_dir: str
    cid: str
    k: int
    cgroup_root: str  # the cgroup2 mount point
    fabric_netns: str
    control_netns: str
    control_address: str
    nodes: tuple[NodePlan, ...]
    # which node processes the supervisor runs (`up --without` drops some)
    components: tuple[str, ...] = ("ca", "agent", "ztunnel")
    # validity of workload certificates (seconds); short ones exercise rotation
    cert_ttl: int = 86400

    # -- paths ---------------------------------------------------------------
    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def cluster_dir(self) -> Path:
        return self.state / "cluster"

    @property
    def ca_dir(self) -> Path:
        return self.state / "ca"

    @property
    def logs_dir(self) -> Path:
        return self.state / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.state / "pids"

    @property
    def socket_path(self) -> Path:
        return self.state / "supervisor.sock"

    @property
    def cgroup_base(self) -> Path:
        """<cgroup2 root>/ambit-<cid>: every process the cluster starts lives below it."""
        return Path(self.cgroup_root) / f"ambit-{self.cid}"

    @property
    def bpf_dir(self) -> Path:
        return BPF_ROOT / self.cid

    @property
    def netns_prefix(self) -> str:
        return f"ambit-{self.cid}-"

    @property
    def ca_address(self) -> str:
        return f"{self.control_address}:{CA_PORT}"

    def node_credential_dir(self, node: str) -> Path:
        return self.state / "nodes" / node / "credential"

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise LocalError(f"unknown node {name!r}; this cluster has {known}")

    # -- pods ----------------------------------------------------------------
    def pod_netns(self, namespace: str, name: str) -> str:
        return f"{self.netns_prefix}pod-{namespace}.{name}"

    def pod_cgroup(self, node: str, namespace: str, name: str) -> Path:
        return self.cgroup_base / node / f"{namespace}.{name}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Layout:
        d: dict[str, Any] = json.loads(text)
        d["nodes"] = tuple(NodePlan(**n) for n in d["nodes"])
        if "components" in d:
            d["components"] = tuple(d["components"])
        return cls(**d)

    @classmethod
    def load(cls, state_dir: Path) -> Layout:
        p = state_dir / "cluster.json"
        try:
            return cls.from_json(p.read_text())
        except FileNotFoundError as e:
            raise LocalError(f"no local cluster in {state_dir} (no cluster.json); run `ambit local up` first") from e
        except (ValueError, KeyError, TypeError) as e:
            raise LocalError(f"{p} is damaged ({e}); `ambit local down --state-dir {state_dir}` cleans up") from e


COMPONENTS = ("ca", "agent", "ztunnel")


def plan(state_dir: Path, nodes: int, cgroup_root: Path, components: Iterable[str] = COMPONENTS,
         cert_ttl: int = 86400) -> Layout:
    """The naming and address plan of a cluster with `nodes` nodes in `state_dir`."""
    real = Path(os.path.realpath(state_dir))
    cid = cluster_id(real)
    comps = tuple(components)
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown:
        raise LocalError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    k = 1 + int(cid, 16) % 95
    prefix = f"ambit-{cid}-"
    plans = []
    for i, name in enumerate(node_names(nodes)):
        plans.append(
            NodePlan(
                name=name,
                index=i,
                netns=f"{prefix}{name}",
                address=f"10.200.{k}.{10 + i}",
                pod_cidr=f"10.{k}.{i}.0/24",
                gateway=f"10.{k}.{i}.1",
                bpf_dir=str(BPF_ROOT / cid / name),
                cgroup=f"ambit-{cid}/{name}",
            )
        )
    return Layout(
        state_dir=str(real),
        cid=cid,
        k=k,
        cgroup_root=str(cgroup_root),
        fabric_netns=f"{prefix}fabric",
        control_netns=f"{prefix}control",
        control_address=f"10.200.{k}.2",
        nodes=tuple(plans),
        components=comps,
        cert_ttl=cert_ttl,
    )


def host_veth_name(namespace: str, name: str) -> str:
    """Node-side veth of a pod: 'vp' + 8 hex digits (interface names are at most 15 bytes)."""
    return "vp" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:8]


def allocate_pod_ip(pod_cidr: str, used: Iterable[str]) -> str:
    """Lowest free address of the node's pod range, skipping the network, gateway (.1) and broadcast."""
    net = ipaddress.ip_network(pod_cidr)
    taken = set(used)
    hosts = list(net.hosts())[1:]  # .1 is the gateway
    for h in hosts:
        if str(h) not in taken:
            return str(h)
    raise LocalError(f"pod range {pod_cidr} is full ({len(hosts)} pods); delete pods or add a node")


def allocate_vip(used: Iterable[str]) -> str:
    taken = set(used)
    for i, h in enumerate(SERVICE_RANGE.hosts()):
        if i < 9:  # 10.96.0.1-9 left free, like kube's 10.96.0.1 for the API server
            continue
        if str(h) not in taken:
            return str(h)
    raise LocalError(f"service range {SERVICE_RANGE} is full")


def check_vip(vip: str, where: str) -> str:
    try:
        addr = ipaddress.ip_address(vip)
    except ValueError as e:
        raise LocalError(f"{where}: spec.clusterIP {vip!r} is not an IP address") from e
    if addr not in SERVICE_RANGE:
        raise LocalError(f"{where}: spec.clusterIP {vip} is outside the service range {SERVICE_RANGE}")
    return str(addr)


def render_hosts(pod_name: str, pod_ip: str | None, services: Mapping[tuple[str, str], str],
                 domain: str = "svc.cluster.local", hostname: str | None = None) -> str:
    """/etc/hosts of a pod: localhost, itself, and `<svc>.<ns>.svc.cluster.local` plus `<svc>.<ns>` per service VIP.

    `hostname` is the name the pod's processes see (a local pod shares the machine's UTS
    namespace): it maps to the pod's address, as Kubernetes maps a pod's hostname, so a
    lookup of it (Python's HTTPServer does one at bind) is answered here, not by DNS.
    """
    lines = [
        "# written by ambit local; services of the local cluster",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    if pod_ip:
        names = [pod_name] + ([hostname] if hostname and hostname != pod_name else [])
        lines.append(f"{pod_ip}\t{' '.join(names)}")
    for (ns, svc), vip in sorted(services.items()):
        lines.append(f"{vip}\t{svc}.{ns}.{domain} {svc}.{ns}")
    return "\n".join(lines) + "\n"


# /etc/resolv.conf of a pod: the local cluster has no DNS server; names come from the pod's
# hosts file. Without a nameserver line glibc asks 127.0.0.1, the pod's own loopback, which
# refuses at once: no query leaves the pod (the machine's resolver is not ours to reach) and
# no lookup waits for a timeout.
RESOLV_CONF = "# written by ambit local: no DNS server in the local cluster; names are in /etc/hosts\noptions attempts:1\n"
