"""The two-VM cluster's state, made on the host and provisioned to both VMs.

    python vagrant/cluster.py --out DIR --node node-a=IP --node node-b=IP

writes
    DIR/state/   -> /var/lib/ambit/vm on every VM: cluster.json (the local runtime's
                    layout), cluster/ (Kubernetes-shaped objects, one YAML file each, as
                    `ambit local` keeps them), nodes/<node>/credential/ (that node's)
    DIR/ca/      -> /var/lib/ambit/ca on the first VM, where the CA runs
    DIR/pods/<node>   one line per pod of that node: namespace, name, IP, command

Each VM is one node: its agent and ztunnel run in the VM's own network namespace
(as a DaemonSet pod with hostNetwork would); its pods are network namespaces with
a veth on the node's bridge `cbr0` and a cgroup, named as the local cluster names
them, so the agent's `--runtime local:/var/lib/ambit/vm` (LocalPodRuntime) finds
them by the same rules. The VM's one NIC is eth0 (the box boots with
net.ifnames=0), which is the node uplink the local runtime names, so the agent's
inbound TC programs sit on the interface HBONE and plaintext from the other VM
arrive on. The state is static: no API server, so every VM gets the same copy and
the pods' phases are written as Running up front.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.local.layout import BPF_ROOT, Layout, NodePlan  # noqa: E402
from agent.local.store import Obj, Store  # noqa: E402

VM_STATE = "/var/lib/ambit/vm"
CID = "vagrant"
POD_CIDRS = ("10.244.0", "10.244.1")
BACKEND_VIP = "10.96.0.10"
ECHO = "/opt/ambit/src/vagrant/echo.py"
SA_PREFIX = "cluster.local/ns/shop/sa/"

# (namespace, name, node index, service account, command)
PODS = (
    ("shop", "backend", 0, "backend", ["python3", "-u", ECHO, "serve", "8080"]),
    ("shop", "frontend", 1, "frontend", ["sleep", "infinity"]),
    ("shop", "catalog", 1, "catalog", ["sleep", "infinity"]),
)


def layout(nodes: list[tuple[str, str]]) -> Layout:
    plans = tuple(
        NodePlan(
            name=name, index=i,
            netns="",  # the node is the VM's own network namespace
            address=ip, pod_cidr=f"{POD_CIDRS[i]}.0/24", gateway=f"{POD_CIDRS[i]}.1",
            bpf_dir=str(BPF_ROOT / name), cgroup=f"ambit-{CID}/{name}",
        )
        for i, (name, ip) in enumerate(nodes)
    )
    return Layout(
        state_dir=VM_STATE, cid=CID, k=0, cgroup_root="/sys/fs/cgroup", fabric_netns="", control_netns="",
        control_address=nodes[0][1], nodes=plans,
    )


def objects(lay: Layout) -> list[Obj]:
    out: list[Obj] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"ambit.dev/dataplane-mode": "ambient"}}},
    ]
    for n in lay.nodes:
        out.append({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
            "spec": {"podCIDR": n.pod_cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": n.address}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })
    for ns, name, idx, sa, command in PODS:
        node = lay.nodes[idx]
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
            "spec": {"nodeName": node.name, "serviceAccountName": sa,
                     "containers": [{"name": name, "command": command}]},
            "status": {"phase": "Running", "podIP": pod_ip(lay, ns, name), "hostIP": node.address},
        })
    out += [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "shop"},
         "spec": {"clusterIP": BACKEND_VIP, "selector": {"app": "backend"},
                  "ports": [{"name": "tcp", "port": 8080, "targetPort": 8080}]}},
        # only the frontend's identity may reach the backend; plaintext into shop is refused
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "backend-allow-frontend", "namespace": "shop"},
         "spec": {"selector": {"matchLabels": {"app": "backend"}}, "action": "ALLOW",
                  "rules": [{"from": [{"source": {"principals": [SA_PREFIX + "frontend"]}}],
                             "to": [{"operation": {"ports": ["8080"]}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}},
    ]
    return out


def pod_ip(lay: Layout, namespace: str, name: str) -> str:
    for i, (ns, n, idx, _sa, _cmd) in enumerate(PODS):
        if (ns, n) == (namespace, name):
            node = lay.nodes[idx]
            return f"{node.pod_cidr.rsplit('.', 1)[0]}.{2 + sum(1 for p in PODS[:i] if p[2] == idx)}"
    raise KeyError(f"{namespace}/{name}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--node", action="append", required=True, metavar="NAME=IP")
    args = p.parse_args(argv)
    nodes = [tuple(n.split("=", 1)) for n in args.node]
    if len(nodes) != 2 or any(len(n) != 2 for n in nodes):
        p.error("give exactly two --node NAME=IP")
    lay = layout([(n[0], n[1]) for n in nodes])
    state = args.out / "state"
    shutil.rmtree(args.out, ignore_errors=True)
    (state / "cluster").mkdir(parents=True)
    (state / "cluster.json").write_text(lay.to_json())
    store = Store(state / "cluster", state / "store.lock")
    for obj in objects(lay):
        store.put(obj)
    # The CA's root and intermediate, and one node credential per node, by the CA's own command.
    ambit = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"]
    cmd = [*ambit, "ca", "init", "--dir", str(args.out / "ca")]
    for n in lay.nodes:
        cmd += ["--node-credential", f"{n.name}={state / 'nodes' / n.name / 'credential'}"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    (args.out / "pods").mkdir()
    for n in lay.nodes:
        lines = [f"{ns}\t{name}\t{pod_ip(lay, ns, name)}\t{shlex.join(cmd)}"
                 for ns, name, idx, _sa, cmd in PODS if lay.nodes[idx].name == n.name]
        (args.out / "pods" / n.name).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
