"""The local cluster's operations: up, down, apply, delete, exec, and reading objects back.

Each operation that builds something keeps an undo list and runs it when a
step fails, so a command that fails half-way leaves nothing of its own
behind. `down` does not rely on any record being intact: every name it removes
is derived from the state dir (cluster id), so it also cleans up after a crash.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import cgroups
from agent import netns as nsops
from agent.local import LocalError
from agent.local import layout as L
from agent.local import supervisor as sup
from agent.local.layout import Layout
from agent.local.store import Obj, Store, describe, object_key
from ambit.cluster import (
    DATAPLANE_MODE,
    GATEWAY_NAME_LABEL,
    INGRESS_CLASS,
    KNOWN_KINDS,
    POLICY_KINDS,
    WAYPOINT_CLASS,
    ClusterError,
    build_state,
    load_documents,
    parse_object,
)
from ambit.policy import PolicyError, compile_policy

log = logging.getLogger("ambit.local")

APPLY_ORDER = {"Namespace": 0, "Service": 1, "Secret": 1, "AuthorizationPolicy": 2, "PeerAuthentication": 2,
               "RequestAuthentication": 2, "Gateway": 2, "HTTPRoute": 2, "RateLimitPolicy": 2, "Pod": 3}
# The annotation on a pod the local cluster made for a Gateway (its waypoint), naming it.
OWNER = "ambit.dev/owner"
# On a waypoint Gateway of the local cluster: the node its pod runs on.
NODE_ANNOTATION = "ambit.dev/node"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class Undo:
    """Steps to reverse, run newest first; errors while undoing are logged, not raised."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    def run(self) -> None:
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except Exception as e:
                log.warning("while undoing (%s): %s", what, e)

    def clear(self) -> None:
        self._steps.clear()


def store_of(layout: Layout) -> Store:
    return Store(layout.cluster_dir, layout.state / "store.lock")


def _run(argv: Sequence[str], what: str) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise LocalError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")


def _node_object(n: L.NodePlan) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}},
        "spec": {"podCIDR": n.pod_cidr},
        "status": {
            "addresses": [{"type": "InternalIP", "address": n.address}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


# ---------------------------------------------------------------------------
# up


@dataclass
class UpReport:
    layout: Layout
    units: list[dict[str, Any]] = field(default_factory=list)


def supervisor_alive(layout: Layout) -> int | None:
    return sup.pidfile_alive(layout.pids_dir / "supervisor.pid")


def up(
    state_dir: Path, nodes: int = 2, *, wait: float = 3.0, components: Iterable[str] = L.COMPONENTS,
    cert_ttl: int = 86400,
) -> UpReport:
    """Create the cluster: fabric, control and node namespaces, the CA files, the supervisor."""
    state_dir = Path(os.path.realpath(state_dir))
    if (state_dir / "cluster.json").exists():
        old = Layout.load(state_dir)
        if supervisor_alive(old):
            raise LocalError(f"a local cluster is already up in {state_dir}; `ambit local down --state-dir {state_dir}` first")
        log.warning("a previous cluster in %s was not shut down; cleaning it up first", state_dir)
        down(state_dir)
    layout = L.plan(state_dir, nodes, cgroups.find_root(), components, cert_ttl)
    report = UpReport(layout)
    undo = Undo()
    try:
        _up_steps(layout, undo, report, wait)
    except BaseException:
        undo.run()
        raise
    return report


def _up_steps(layout: Layout, undo: Undo, report: UpReport, wait: float) -> None:
    state = layout.state
    made_state = not state.exists()
    state.mkdir(parents=True, exist_ok=True)
    if made_state:
        undo.push("state dir", lambda: shutil.rmtree(state, ignore_errors=True))
    else:
        for sub in ("cluster", "ca", "nodes", "pids", "cluster.json", "supervisor.sock", "store.lock"):
            undo.push(f"state {sub}", lambda sub=sub: _rm(state / sub))  # type: ignore[misc]
    # cluster.json first: if this process dies mid-way, `down` still finds the plan.
    (state / "cluster.json").write_text(layout.to_json())
    for d in (layout.cluster_dir, layout.logs_dir, layout.pids_dir):
        d.mkdir(parents=True, exist_ok=True)

    cgroups.create(layout.cgroup_base)
    undo.push("cgroups", lambda: cgroups.remove(layout.cgroup_base))

    def make_ns(name: str) -> None:
        nsops.create(name)
        undo.push(f"netns {name}", lambda: nsops.remove(name))

    make_ns(layout.fabric_netns)
    nsops.add_bridge(layout.fabric_netns, L.FABRIC_BRIDGE)
    make_ns(layout.control_netns)
    nsops.add_veth(layout.fabric_netns, "ctl", layout.control_netns, L.NODE_UPLINK, master=L.FABRIC_BRIDGE)
    nsops.add_address(layout.control_netns, L.NODE_UPLINK, layout.control_address, 24)
    for n in layout.nodes:
        make_ns(n.netns)
        nsops.add_veth(layout.fabric_netns, f"n-{n.name}", n.netns, L.NODE_UPLINK, master=L.FABRIC_BRIDGE)
        nsops.add_address(n.netns, L.NODE_UPLINK, n.address, 24)
        nsops.add_bridge(n.netns, L.NODE_BRIDGE)
        nsops.add_address(n.netns, L.NODE_BRIDGE, n.gateway, 24)
        nsops.set_sysctl(n.netns, "net.ipv4.ip_forward", "1")
        (layout.state / "nodes" / n.name).mkdir(parents=True, exist_ok=True)
    for n in layout.nodes:
        for other in layout.nodes:
            if other.name != n.name:
                nsops.add_route(n.netns, other.pod_cidr, other.address)
        # the CA answers pods too (a waypoint asks it for its identity), as a cluster's CA would
        nsops.add_route(layout.control_netns, n.pod_cidr, n.address)
    undo.push("bpf pins", lambda: shutil.rmtree(layout.bpf_dir, ignore_errors=True))
    _init_ca(layout)

    store = store_of(layout)
    for n in layout.nodes:
        store.put(_node_object(n))
    store.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})

    undo.push("supervisor", lambda: _stop_supervisor(layout))
    sup.spawn(layout)
    # Let the node processes get going, so a unit that dies at once is reported now.
    deadline = time.monotonic() + wait
    units: list[dict[str, Any]] = sup.request(layout, {"op": "status"}).get("units", [])
    while time.monotonic() < deadline and any(u["state"] not in ("unavailable", "failed") for u in units):
        time.sleep(0.2)
        units = sup.request(layout, {"op": "status"}).get("units", [])
    report.units = units
    undo.clear()


def _rm(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _init_ca(layout: Layout) -> None:
    """Create the cluster CA in <state>/ca and one node credential per node, with `ambit ca init`
    (the CA's own command: the local cluster uses the control plane only through its interfaces)."""
    argv = [*sup.AMBIT, "ca", "init", "--dir", str(layout.ca_dir), "--trust-domain", L.TRUST_DOMAIN]
    for n in layout.nodes:
        argv += ["--node-credential", f"{n.name}={layout.node_credential_dir(n.name)}"]
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise LocalError(f"creating the cluster CA in {layout.ca_dir}: {r.stderr.strip() or r.stdout.strip()}")


def _stop_supervisor(layout: Layout, timeout: float = 10.0) -> None:
    pid = supervisor_alive(layout)
    if pid is None:
        return
    try:
        sup.request(layout, {"op": "shutdown"}, timeout=5)
    except LocalError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sup.pidfile_alive(layout.pids_dir / "supervisor.pid"):
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# down


def down(state_dir: Path) -> list[str]:
    """Remove every process, cgroup, pinned BPF object, namespace and state file of the cluster. Idempotent."""
    state_dir = Path(os.path.realpath(state_dir))
    try:
        layout = Layout.load(state_dir)
    except LocalError:
        # Damaged or missing cluster.json: the names still follow from the state dir.
        layout = L.plan(state_dir, 1, cgroups.find_root())
    done: list[str] = []
    if supervisor_alive(layout):
        _stop_supervisor(layout)
        done.append("stopped the supervisor")
    # Anything recorded in a pid file that still runs (e.g. moved out of its cgroup).
    if layout.pids_dir.is_dir():
        for pf in layout.pids_dir.glob("*.pid"):
            pid = sup.pidfile_alive(pf)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    done.append(f"killed pid {pid} ({pf.stem})")
                except ProcessLookupError:
                    pass
    if layout.cgroup_base.exists():
        cgroups.remove(layout.cgroup_base)
        done.append(f"removed cgroup {layout.cgroup_base}")
    if layout.bpf_dir.exists():
        shutil.rmtree(layout.bpf_dir, ignore_errors=True)
        done.append(f"removed BPF pins {layout.bpf_dir}")
        with contextlib.suppress(OSError):
            L.BPF_ROOT.rmdir()  # only when no other cluster has pins
    for name in nsops.list_netns(layout.netns_prefix):
        nsops.remove(name)
        done.append(f"removed netns {name}")
    if nsops.NETNS_ETC_DIR.is_dir():
        for d in nsops.NETNS_ETC_DIR.glob(f"{layout.netns_prefix}*"):
            shutil.rmtree(d, ignore_errors=True)
    for sub in ("cluster", "ca", "pids", "cluster.json", "supervisor.sock", "store.lock"):
        _rm(state_dir / sub)
    nodes_dir = state_dir / "nodes"
    if nodes_dir.is_dir():
        for cred in nodes_dir.glob("*/credential"):
            shutil.rmtree(cred, ignore_errors=True)
    # the last good policies and the flow history belong to this cluster (only its agents read
    # the history): a new one in the same dir starts clean (logs stay for a post-mortem)
    for kept in (*state_dir.glob("nodes/*/last-good-policies.json"), *state_dir.glob("nodes/*/flows.db*"),
                 *state_dir.glob("waypoints/*/last-good-policies.json"),
                 *state_dir.glob("gateways/*/last-good-policies.json")):
        kept.unlink(missing_ok=True)
    return done


# ---------------------------------------------------------------------------
# apply / delete


def read_manifests(paths: Iterable[Path]) -> list[Obj]:
    """Objects from files and directories (every *.yaml/*.yml/*.json, sorted), validated one by one."""
    out: list[Obj] = []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in MANIFEST_SUFFIXES and f.is_file())
        elif p.is_file():
            files = [p]
        else:
            raise LocalError(f"{p}: no such file or directory")
        for f in files:
            try:
                docs = load_documents(f.read_text(), origin=str(f))
                for d in docs:
                    if d.get("kind") == "Node":
                        raise LocalError(f"{f}: Node {d.get('metadata', {}).get('name')}: nodes are made by `ambit local up`, not applied")
                    parse_object(d)
            except ClusterError as e:
                raise LocalError(f"{f}: {e}" if not str(e).startswith(str(f)) else str(e)) from e
            out.extend(docs)
    return out


def _immutable_pod_fields(obj: Obj) -> dict[str, Any]:
    spec = obj.get("spec") or {}
    c0 = (spec.get("containers") or [{}])[0]
    return {
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or spec.get("serviceAccount"),
        "spec.containers[0].command": list(c0.get("command") or []) + list(c0.get("args") or []),
    }


def _clean(obj: Obj) -> Obj:
    """What the user wrote, minus status (the cluster owns it)."""
    o = copy.deepcopy(obj)
    o.pop("status", None)
    md = o.setdefault("metadata", {})
    if o.get("kind") not in ("Namespace", "Node"):
        md.setdefault("namespace", "default")
    return o


def validate(layout: Layout, store: Store, objs: Sequence[Obj]) -> None:
    """Everything that can be checked before touching the machine, naming object and field."""
    existing = store.list()
    new_keys = {object_key(o) for o in objs}
    merged = [o for o in existing if object_key(o) not in new_keys] + [_clean(o) for o in objs]
    try:
        state = build_state(merged)
    except ClusterError as e:
        raise LocalError(str(e)) from e
    for o in objs:
        key = object_key(o)
        where = describe(key)
        if key[0] not in KNOWN_KINDS:
            raise LocalError(f"{where}: unsupported kind")
        if key[1] and key[1] not in state.namespaces:
            raise LocalError(f"{where}: namespace {key[1]!r} does not exist; add a Namespace object to the manifests")
        if key[0] == "Pod":
            pod = state.pods[(key[1], key[2])]
            if not pod.node_name:
                raise LocalError(f"{where}: spec.nodeName is required (one of {', '.join(n.name for n in layout.nodes)})")
            if pod.node_name not in {n.name for n in layout.nodes}:
                raise LocalError(
                    f"{where}: spec.nodeName {pod.node_name!r} is not a node of this cluster "
                    f"({', '.join(n.name for n in layout.nodes)})"
                )
            if not pod.command:
                raise LocalError(f"{where}: spec.containers[0].command is required (the process the pod runs)")
            old = store.get(key)
            if old is not None:
                before, after = _immutable_pod_fields(old), _immutable_pod_fields(o)
                changed = [f for f in before if before[f] != after[f]]
                if changed:
                    raise LocalError(
                        f"{where}: {', '.join(changed)} cannot change on a live pod; delete the pod and apply it again"
                    )
        if key[0] in POLICY_KINDS:
            # Compiled as the agent will compile it: an invalid policy never reaches the cluster
            # (where the last good version would stay in force and the edit be ignored).
            try:
                compile_policy(next(p for p in state.policies if p.kind == key[0] and p.meta.namespace == key[1]
                                    and p.meta.name == key[2]))
            except PolicyError as e:
                raise LocalError(str(e)) from e
        if key[0] == "Service":
            cip = (o.get("spec") or {}).get("clusterIP")
            old = store.get(key)
            old_ip = ((old or {}).get("spec") or {}).get("clusterIP")
            if cip not in (None, "", "None"):
                L.check_vip(str(cip), where)
                if old_ip and str(cip) != old_ip:
                    raise LocalError(f"{where}: spec.clusterIP is immutable (it is {old_ip})")
                owner = state.service_by_ip(str(cip))
                if owner is not None and owner.key != f"{key[1]}/{key[2]}":
                    raise LocalError(f"{where}: spec.clusterIP {cip} is already used by Service {owner.key}")


def apply(state_dir: Path, paths: Sequence[Path]) -> list[str]:
    """Create or update objects; returns one line per object ('created'/'configured'/'unchanged')."""
    layout = Layout.load(Path(os.path.realpath(state_dir)))
    if not supervisor_alive(layout):
        raise LocalError(f"the cluster in {layout.state_dir} is not running (no supervisor); run `ambit local up`")
    store = store_of(layout)
    objs = read_manifests(paths)
    objs += [wp for o in objs if (wp := waypoint_pod(layout, o)) is not None and store.get(object_key(wp)) is None]
    validate(layout, store, objs)
    objs = sorted(objs, key=lambda o: APPLY_ORDER.get(str(o.get("kind")), 9))
    undo = Undo()
    lines: list[str] = []
    try:
        for o in objs:
            lines.append(_apply_one(layout, store, _clean(o), undo))
        refresh_hosts(layout, store)
    except BaseException:
        undo.run()
        with contextlib.suppress(Exception):
            refresh_hosts(layout, store)
        raise
    return lines


def waypoint_pod(layout: Layout, gw: Obj) -> Obj | None:
    """The pod that serves a waypoint Gateway in the local cluster (what a controller's
    Deployment would be on Kubernetes); None for any other object.

    It runs `ambit waypoint run` as the Gateway's service account (its name, as Istio does)
    on the node named by the Gateway's `ambit.dev/node` annotation (else the first), is not
    enrolled itself (it speaks HBONE), and asks the CA with its node's credential, which the
    CA accepts because a pod with that service account runs on that node.
    An ingress Gateway (class ambit-ingress) gets the same, running `ambit gateway run`: its
    pod's address is the gateway's, which clients outside the mesh reach.
    """
    cls = (gw.get("spec") or {}).get("gatewayClassName")
    if gw.get("kind") != "Gateway" or cls not in (WAYPOINT_CLASS, INGRESS_CLASS):
        return None
    role = "waypoint" if cls == WAYPOINT_CLASS else "gateway"
    md = gw.get("metadata") or {}
    ns, name = str(md.get("namespace") or "default"), str(md.get("name"))
    node = str((md.get("annotations") or {}).get(NODE_ANNOTATION) or layout.nodes[0].name)
    state = layout.state / f"{role}s" / f"{ns}.{name}"
    argv = [*sup.AMBIT, role, "run", "--gateway", f"{ns}/{name}", "--node", node,
            "--cluster", f"local:{layout.cluster_dir}", "--ca", layout.ca_address,
            "--credential-dir", str(layout.node_credential_dir(node)), "--state-dir", str(state),
            "--access-log", str(state / "access.log")]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-{role}", "namespace": ns,
                     "labels": {GATEWAY_NAME_LABEL: name, DATAPLANE_MODE: "none"},
                     "annotations": {OWNER: f"Gateway/{name}"}},
        "spec": {"nodeName": node, "serviceAccountName": name,
                 "containers": [{"name": role, "command": argv}]},
    }


def _apply_one(layout: Layout, store: Store, obj: Obj, undo: Undo) -> str:
    key = object_key(obj)
    where = describe(key)
    with store.locked():
        old = store.get(key)
        if old is not None and key[0] == "Pod":
            # Live pod: only metadata changes (labels replace; annotations merge, so
            # the agent's own annotations survive a re-apply).
            new = copy.deepcopy(old)
            md = new.setdefault("metadata", {})
            umd = obj.get("metadata") or {}
            md["labels"] = dict(umd.get("labels") or {})
            md["annotations"] = {**(md.get("annotations") or {}), **(umd.get("annotations") or {})}
            if new == old:
                return f"{where} unchanged"
            store.put(new)
            undo.push(f"restore {where}", lambda: store.put(old))
            return f"{where} configured"
        if key[0] == "Service":
            spec = obj.setdefault("spec", {})
            if old is not None:
                spec["clusterIP"] = (old.get("spec") or {}).get("clusterIP")
            elif spec.get("clusterIP") in (None, "", "None"):
                used = [str((s.get("spec") or {}).get("clusterIP")) for s in store.list("Service")]
                spec["clusterIP"] = L.allocate_vip(used)
        if key[0] != "Pod":
            if old is not None and old == obj:
                return f"{where} unchanged"
            store.put(obj)
            if old is None:
                undo.push(f"remove {where}", lambda: store.remove(key))
            else:
                undo.push(f"restore {where}", lambda: store.put(old))
            return f"{where} {'created' if old is None else 'configured'}"
        # A new pod: network, cgroup, then its process (by the supervisor).
        node = layout.node(str(obj["spec"]["nodeName"]))
        used = [
            str((p.get("status") or {}).get("podIP"))
            for p in store.list("Pod")
            if (p.get("spec") or {}).get("nodeName") == node.name
        ]
        ip = L.allocate_pod_ip(node.pod_cidr, used)
        obj["status"] = {"phase": "Pending", "podIP": ip, "hostIP": node.address}
        store.put(obj)  # reserves the IP before the lock is released
        undo.push(f"remove {where}", lambda: store.remove(key))
    undo.push(f"tear down {where}", lambda: _teardown_pod(layout, key[1], key[2], node.name))
    _setup_pod_network(layout, node, key[1], key[2], ip)
    command = _immutable_pod_fields(obj)["spec.containers[0].command"]
    resp = sup.request(
        layout, {"op": "pod_start", "namespace": key[1], "name": key[2], "node": node.name, "argv": command}
    )
    if not resp.get("ok"):
        raise LocalError(f"{where}: {resp.get('error')}")
    return f"{where} created ({ip} on {node.name})"


def _setup_pod_network(layout: Layout, node: L.NodePlan, ns: str, name: str, ip: str) -> None:
    pns = layout.pod_netns(ns, name)
    nsops.create(pns)
    veth = L.host_veth_name(ns, name)
    nsops.add_veth(node.netns, veth, pns, L.POD_IFNAME, master=L.NODE_BRIDGE)
    nsops.add_address(pns, L.POD_IFNAME, ip, 24)
    nsops.add_route(pns, "default", node.gateway)
    cgroups.create(layout.pod_cgroup(node.name, ns, name))
    nsops.write_etc_file(pns, "hosts", L.render_hosts(name, ip, {}, hostname=socket.gethostname()))
    nsops.write_etc_file(pns, "resolv.conf", L.RESOLV_CONF)


def _teardown_pod(layout: Layout, ns: str, name: str, node: str) -> None:
    with contextlib.suppress(LocalError):
        sup.request(layout, {"op": "pod_stop", "namespace": ns, "name": name}, timeout=15)
    cgroups.remove(layout.pod_cgroup(node, ns, name))
    # The kernel frees a netns (and the veths in it) asynchronously; delete the
    # node side now so the same pod can be applied again at once.
    with contextlib.suppress(LocalError, KeyError):
        nsops.delete_link(layout.node(node).netns, L.host_veth_name(ns, name))
    nsops.remove(layout.pod_netns(ns, name))
    (layout.pids_dir / f"pod.{ns}.{name}.pid").unlink(missing_ok=True)


def refresh_hosts(layout: Layout, store: Store) -> None:
    """Rewrite every pod's /etc/hosts with the current services."""
    services = {
        (str(s["metadata"].get("namespace") or "default"), str(s["metadata"]["name"])): str(s["spec"]["clusterIP"])
        for s in store.list("Service")
        if (s.get("spec") or {}).get("clusterIP")
    }
    for p in store.list("Pod"):
        md = p["metadata"]
        pns = layout.pod_netns(str(md.get("namespace") or "default"), str(md["name"]))
        if nsops.exists(pns):
            nsops.write_etc_file(pns, "hosts", L.render_hosts(
                str(md["name"]), (p.get("status") or {}).get("podIP"), services, hostname=socket.gethostname()))
            nsops.write_etc_file(pns, "resolv.conf", L.RESOLV_CONF)


def delete(state_dir: Path, paths: Sequence[Path], ignore_not_found: bool = False) -> list[str]:
    """Delete the named objects; a Namespace takes everything in it along (as in Kubernetes)."""
    layout = Layout.load(Path(os.path.realpath(state_dir)))
    store = store_of(layout)
    objs = read_manifests(paths)
    lines: list[str] = []
    missing: list[str] = []

    def remove(key: tuple[str, str, str], old: Obj) -> None:
        if key[0] == "Pod":
            _teardown_pod(layout, key[1], key[2], str((old.get("spec") or {}).get("nodeName")))
        if store.remove(key):
            lines.append(f"{describe(key)} deleted")

    # a waypoint Gateway takes its pod along
    owned = {(str((p["metadata"].get("annotations") or {}).get(OWNER)), str(p["metadata"].get("namespace"))): p
             for p in store.list("Pod") if (p["metadata"].get("annotations") or {}).get(OWNER)}
    objs += [owned[(f"Gateway/{k[2]}", k[1])] for o in objs if (k := object_key(o))[0] == "Gateway"
             and (f"Gateway/{k[2]}", k[1]) in owned]
    for o in sorted(objs, key=lambda o: -APPLY_ORDER.get(str(o.get("kind")), 9)):
        key = object_key(o)
        old = store.get(key)
        if old is None:
            if describe(key) + " deleted" not in lines:
                missing.append(describe(key))
            continue
        if key[0] == "Namespace":
            inside = [x for x in store.list() if object_key(x)[1] == key[2]]
            for x in sorted(inside, key=lambda x: -APPLY_ORDER.get(str(x.get("kind")), 9)):
                remove(object_key(x), x)
        remove(key, old)
    refresh_hosts(layout, store)
    if missing and not ignore_not_found:
        raise LocalError(f"not found: {', '.join(missing)} (the rest was deleted: {len(lines)} objects)")
    return lines


# ---------------------------------------------------------------------------
# exec / get


def find_pod(layout: Layout, ref: str) -> Obj:
    ns, sep, name = ref.partition("/")
    if not sep:
        ns, name = "default", ref
    obj = store_of(layout).get(("Pod", ns, name))
    if obj is None:
        raise LocalError(f"pod {ns}/{name} not found; `ambit local get pods` lists them")
    return obj


def exec_in_pod(state_dir: Path, ref: str, argv: Sequence[str]) -> int:
    """Run `argv` in the pod's netns and cgroup (stdio inherited); its exit status."""
    if not argv:
        raise LocalError("exec: no command given (ambit local exec NS/POD -- CMD ...)")
    layout = Layout.load(Path(os.path.realpath(state_dir)))
    pod = find_pod(layout, ref)
    md = pod["metadata"]
    ns, name = str(md.get("namespace") or "default"), str(md["name"])
    pns = layout.pod_netns(ns, name)
    if not nsops.exists(pns):
        raise LocalError(f"pod {ns}/{name} has no network namespace {pns}; delete and apply it again")
    cg = layout.pod_cgroup(str(pod["spec"]["nodeName"]), ns, name)
    try:
        r = subprocess.run(nsops.exec_argv(pns, argv), preexec_fn=nsops.preexec(None, cg / "cgroup.procs"), check=False)
    except FileNotFoundError as e:
        raise LocalError(f"exec: {e}") from e
    return r.returncode


def list_objects(state_dir: Path, kind: str) -> list[Obj]:
    layout = Layout.load(Path(os.path.realpath(state_dir)))
    return store_of(layout).list(kind)


def unit_status(state_dir: Path) -> list[dict[str, Any]]:
    layout = Layout.load(Path(os.path.realpath(state_dir)))
    units: list[dict[str, Any]] = sup.request(layout, {"op": "status"}).get("units", [])
    return units


def control(state_dir: Path, op: str, unit: str) -> dict[str, Any]:
    layout = Layout.load(Path(os.path.realpath(state_dir)))
    resp = sup.request(layout, {"op": op, "unit": unit}, timeout=30)
    if not resp.get("ok"):
        raise LocalError(str(resp.get("error")))
    info: dict[str, Any] = resp["unit"]
    return info
