"""The local cluster end to end (root): up, apply, traffic, hosts, get, exec, relabel, delete, down.

One cluster per module (up costs ~1 s); each test cleans up the objects it
added. The machine's own network namespace must be unchanged by all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import AgentError
from agent import netns as nsops
from agent.local import LocalError
from agent.local import cluster as C
from agent.local import layout as L
from agent.local.supervisor import AMBIT, pidfile_alive

SERVER = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080)); s.listen()\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(('hello ' + a[0] + '\\n').encode()); c.close()\n"
)


def root_net() -> tuple[str, str, list[str]]:
    addr = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    route = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return addr, route, sorted(line.split(":")[1].strip() for line in links.splitlines())


def ambit(state: Path, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [*AMBIT, "local", *args, "--state-dir", str(state)]
        if args[0] != "exec"
        else [*AMBIT, "local", "exec", *args[1:2], "--state-dir", str(state), *args[2:]],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"ambit local {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def running(pid: int) -> bool:
    """Alive and not a zombie (the supervisor started in-process is our child until reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pod_yaml(ns: str, name: str, node: str, command: list[str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "command": command}]},
    }


def write_manifest(path: Path, *objs: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump_all(list(objs)))
    return path


def wait_for(fn: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L.Layout]:
    from tests.conftest import require_root

    require_root()
    state = tmp_path_factory.mktemp("ambit-local") / "state"
    before = root_net()
    try:
        report = C.up(state, 2, wait=0.5)
        yield report.layout
    finally:
        C.down(state)
    assert root_net() == before, "the machine's own network namespace changed"


@pytest.fixture
def apps(cluster: L.Layout, tmp_path: Path) -> Iterator[Path]:
    """A namespace with a server on node-b (+ Service) and a client on node-a."""
    m = write_manifest(
        tmp_path / "apps.yaml",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
        pod_yaml("demo", "server", "node-b", ["python3", "-c", SERVER], {"app": "server"}),
        pod_yaml("demo", "client", "node-a", ["sleep", "600"]),
        {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "server", "namespace": "demo"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    C.apply(cluster.state, [m])
    try:
        yield m
    finally:
        C.delete(cluster.state, [m], ignore_not_found=True)


def pod(cluster: L.Layout, ns: str, name: str) -> dict[str, Any]:
    return C.find_pod(cluster, f"{ns}/{name}")


def test_pods_get_addresses_and_run(cluster: L.Layout, apps: Path) -> None:
    srv, cli = pod(cluster, "demo", "server"), pod(cluster, "demo", "client")
    assert srv["status"]["podIP"].startswith(f"10.{cluster.k}.1.")
    assert cli["status"]["podIP"].startswith(f"10.{cluster.k}.0.")
    assert srv["status"]["phase"] == "Running" and cli["status"]["phase"] == "Running"
    cg = cluster.pod_cgroup("node-b", "demo", "server")
    assert (cg / "cgroup.procs").read_text().split(), "the pod's command runs in its cgroup"
    assert nsops.exists(cluster.pod_netns("demo", "server"))


def test_pod_to_pod_tcp_across_nodes(cluster: L.Layout, apps: Path) -> None:
    srv_ip = pod(cluster, "demo", "server")["status"]["podIP"]
    cli_ip = pod(cluster, "demo", "client")["status"]["podIP"]
    code = (
        "import socket, sys, time\n"
        "for i in range(50):\n"
        "    try:\n"
        f"        s = socket.create_connection(('{srv_ip}', 8080), timeout=2); break\n"
        "    except OSError: time.sleep(0.1)\n"
        "print(s.recv(100).decode().strip())\n"
    )
    r = ambit(cluster.state, "exec", "demo/client", "--", "python3", "-c", code)
    # the server sees the client's pod IP: routed, not NATed
    assert r.stdout.strip() == f"hello {cli_ip}"


def test_service_names_resolve_via_hosts(cluster: L.Layout, apps: Path) -> None:
    svc = C.store_of(cluster).get(("Service", "demo", "server"))
    assert svc is not None
    vip = svc["spec"]["clusterIP"]
    assert vip.startswith("10.96.")
    code = "import socket; print(socket.gethostbyname('server.demo.svc.cluster.local'), socket.gethostbyname('server.demo'))"
    r = ambit(cluster.state, "exec", "demo/client", "--", "python3", "-c", code)
    assert r.stdout.split() == [vip, vip]


def test_a_pods_hostname_resolves_to_the_pod_and_dns_stays_inside(cluster: L.Layout, apps: Path) -> None:
    # Python's HTTPServer looks the hostname up at bind: it must come from the pod's hosts file,
    # not from the machine's resolver (no query may leave the pod)
    code = "import socket; print(socket.gethostbyname(socket.gethostname()))"
    r = ambit(cluster.state, "exec", "demo/client", "--", "python3", "-c", code)
    assert r.stdout.split() == [pod(cluster, "demo", "client")["status"]["podIP"]]
    resolv = Path("/etc/netns", cluster.pod_netns("demo", "client"), "resolv.conf").read_text()
    assert "nameserver" not in resolv


def test_connect_at_reaches_a_pods_loopback_which_other_pods_cannot(cluster: L.Layout, apps: Path, tmp_path: Path) -> None:
    # the means the node's agent asks a waypoint for its request records with (the attack on the
    # real waypoint's /requests is in tests/e2e/test_waypoint.py)
    listener = (
        "import socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 15000)); s.listen()\n"
        "print('listening', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(b'only on the loopback'); c.close()\n"
    )
    m = write_manifest(tmp_path / "lo.yaml", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lo"}},
                       pod_yaml("lo", "proxy", "node-a", ["python3", "-c", listener]))
    C.apply(cluster.state, [m])
    try:
        path = nsops.netns_path(cluster.pod_netns("lo", "proxy"))
        deadline = time.monotonic() + 15
        while True:
            try:
                sock = nsops.connect_at(path, "127.0.0.1", 15000, 2.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with sock:
            assert sock.recv(100) == b"only on the loopback"
        # the same port on the pod's address is closed to everyone else
        ip = pod(cluster, "lo", "proxy")["status"]["podIP"]
        code = (f"import socket\ntry:\n    socket.create_connection(('{ip}', 15000), timeout=3)\n    print('reached')\n"
                "except OSError as e:\n    print('refused')")
        assert ambit(cluster.state, "exec", "demo/client", "--", "python3", "-c", code).stdout.split() == ["refused"]
        with pytest.raises(AgentError, match="cannot open"):
            nsops.connect_at(tmp_path / "no-such-netns", "127.0.0.1", 15000, 1.0)
    finally:
        C.delete(cluster.state, [m], ignore_not_found=True)


def test_get_json(cluster: L.Layout, apps: Path) -> None:
    nodes = json.loads(ambit(cluster.state, "get", "nodes", "-o", "json").stdout)["items"]
    assert {n["metadata"]["name"]: n["status"]["addresses"][0]["address"] for n in nodes} == {
        n.name: n.address for n in cluster.nodes
    }
    pods = json.loads(ambit(cluster.state, "get", "pods", "-o", "json").stdout)["items"]
    by = {p["metadata"]["name"]: p for p in pods}
    assert by["server"]["spec"]["nodeName"] == "node-b"
    assert by["server"]["status"]["phase"] == "Running"
    assert by["client"]["status"]["podIP"].startswith(f"10.{cluster.k}.0.")
    table = ambit(cluster.state, "get", "pods").stdout
    assert "server" in table and "Running" in table


def test_exec_returns_the_exit_status(cluster: L.Layout, apps: Path) -> None:
    assert ambit(cluster.state, "exec", "demo/client", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    r = ambit(cluster.state, "exec", "demo/client", "--", "cat", "/proc/self/cgroup")
    assert f"ambit-{cluster.cid}/node-a/demo.client" in r.stdout
    r = ambit(cluster.state, "exec", "demo/nope", "--", "true", check=False)
    assert r.returncode == 1 and "pod demo/nope not found" in r.stderr


def test_label_change_on_a_live_pod(cluster: L.Layout, apps: Path, tmp_path: Path) -> None:
    pidfile = cluster.pids_dir / "pod.demo.client.pid"
    pid = pidfile_alive(pidfile)
    assert pid is not None
    m = write_manifest(
        tmp_path / "relabel.yaml",
        pod_yaml("demo", "client", "node-a", ["sleep", "600"], {"ambit.dev/dataplane-mode": "ambient"}),
    )
    assert C.apply(cluster.state, [m]) == ["Pod demo/client configured"]
    assert pod(cluster, "demo", "client")["metadata"]["labels"] == {"ambit.dev/dataplane-mode": "ambient"}
    assert pidfile_alive(pidfile) == pid, "relabelling must not restart the pod"
    # an immutable field is refused, naming it
    m2 = write_manifest(tmp_path / "move.yaml", pod_yaml("demo", "client", "node-b", ["sleep", "600"]))
    with pytest.raises(LocalError, match=r"Pod demo/client: spec.nodeName cannot change"):
        C.apply(cluster.state, [m2])


def test_bad_input_is_refused_with_the_field(cluster: L.Layout, tmp_path: Path) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bad"}}
    cases = [
        (pod_yaml("bad", "p", "node-z", ["true"]), r"Pod bad/p: spec.nodeName 'node-z' is not a node"),
        (pod_yaml("bad", "p", "node-a", []), r"Pod bad/p: spec.containers\[0\].command is required"),
        (pod_yaml("nowhere", "p", "node-a", ["true"]), r"namespace 'nowhere' does not exist"),
        (
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "bad"},
             "spec": {"clusterIP": "10.1.2.3", "ports": [{"port": 80}]}},
            r"Service bad/s: spec.clusterIP 10.1.2.3 is outside",
        ),
        # a policy is compiled as the agent would: an invalid one never reaches the cluster
        (
            {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
             "metadata": {"name": "strict", "namespace": "bad"}, "spec": {"mtls": {"mode": "STRCT"}}},
            r"PeerAuthentication bad/strict: spec.mtls.mode: .*STRICT",
        ),
        (
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "ips", "namespace": "bad"},
             "spec": {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]}},
            r"AuthorizationPolicy bad/ips: spec.rules\[0\].from\[0\].source.ipBlocks\[0\]",
        ),
    ]
    for i, (obj, msg) in enumerate(cases):
        m = write_manifest(tmp_path / f"bad{i}.yaml", ns, obj)
        with pytest.raises(LocalError, match=msg):
            C.apply(cluster.state, [m])
    # nothing of the refused applies was made
    assert C.store_of(cluster).get(("Namespace", "", "bad")) is None
    assert not nsops.list_netns(cluster.pod_netns("bad", ""))


def test_pod_phase_follows_its_command(cluster: L.Layout, tmp_path: Path) -> None:
    m = write_manifest(
        tmp_path / "jobs.yaml",
        pod_yaml("default", "ok", "node-a", ["true"]),
        pod_yaml("default", "fails", "node-b", ["sh", "-c", "exit 3"]),
    )
    C.apply(cluster.state, [m])
    try:
        wait_for(lambda: pod(cluster, "default", "ok")["status"]["phase"] == "Succeeded", what="Succeeded")
        wait_for(lambda: pod(cluster, "default", "fails")["status"]["phase"] == "Failed", what="Failed")
    finally:
        C.delete(cluster.state, [m])


def test_delete_removes_the_pod(cluster: L.Layout, tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "one.yaml", pod_yaml("default", "gone", "node-a", ["sleep", "600"]))
    C.apply(cluster.state, [m])
    pid = pidfile_alive(cluster.pids_dir / "pod.default.gone.pid")
    assert pid is not None
    veth = L.host_veth_name("default", "gone")
    assert nsops.run_in(cluster.nodes[0].netns, ["ip", "link", "show", veth]).returncode == 0
    assert C.delete(cluster.state, [m]) == ["Pod default/gone deleted"]
    assert not nsops.exists(cluster.pod_netns("default", "gone"))
    assert not cluster.pod_cgroup("node-a", "default", "gone").exists()
    assert not running(pid)
    assert nsops.run_in(cluster.nodes[0].netns, ["ip", "link", "show", veth]).returncode != 0
    with pytest.raises(LocalError, match="not found: Pod default/gone"):
        C.delete(cluster.state, [m])


def test_deleting_a_namespace_deletes_what_is_in_it(cluster: L.Layout, tmp_path: Path) -> None:
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tmpns"}}
    m = write_manifest(tmp_path / "ns.yaml", ns, pod_yaml("tmpns", "p", "node-b", ["sleep", "600"]))
    C.apply(cluster.state, [m])
    only_ns = write_manifest(tmp_path / "only.yaml", ns)
    assert C.delete(cluster.state, [only_ns]) == ["Pod tmpns/p deleted", "Namespace tmpns deleted"]
    assert not nsops.exists(cluster.pod_netns("tmpns", "p"))
    assert C.store_of(cluster).get(("Pod", "tmpns", "p")) is None


def test_stop_and_start_units(cluster: L.Layout) -> None:
    units = {u["unit"]: u for u in C.unit_status(cluster.state)}
    assert set(units) >= {"ca", "node-a/agent", "node-a/ztunnel", "node-b/agent", "node-b/ztunnel"}
    # Units whose program is not in this build are reported, never silently absent.
    for u in units.values():
        assert u["state"] in ("running", "backoff", "unavailable"), u
        if u["state"] == "unavailable":
            assert u["reason"]
    r = ambit(cluster.state, "stop", "ztunnel", "--node", "node-a")
    assert "node-a/ztunnel: stopped" in r.stdout or "unavailable" in r.stdout
    r = ambit(cluster.state, "start", "ztunnel", check=False)
    assert r.returncode == 1 and "--node is required" in r.stderr
    r = ambit(cluster.state, "start", "ztunnel", "--node", "node-a", check=False)
    assert "node-a/ztunnel:" in r.stdout


def test_up_twice_is_refused(cluster: L.Layout) -> None:
    with pytest.raises(LocalError, match="already up"):
        C.up(cluster.state, 2)


def test_fabric_has_no_way_out(cluster: L.Layout) -> None:
    for n in cluster.nodes:
        routes = nsops.run_in(n.netns, ["ip", "route"]).stdout
        assert "default" not in routes
        # routes to the other nodes' pod ranges via their fabric addresses
        for other in cluster.nodes:
            if other.name != n.name:
                assert f"{other.pod_cidr} via {other.address}" in routes
    assert "default" not in nsops.run_in(cluster.fabric_netns, ["ip", "route"]).stdout
    control = nsops.run_in(cluster.control_netns, ["ip", "route"]).stdout
    assert "default" not in control
    assert all(f"{n.pod_cidr} via {n.address}" in control for n in cluster.nodes), control


def _leftovers(state: Path) -> list[str]:
    cid = L.cluster_id(state)
    out = [f"netns {n}" for n in nsops.list_netns(f"ambit-{cid}")]
    out += [f"cgroup {p}" for p in Path("/sys/fs/cgroup/unified").glob(f"ambit-{cid}*")]
    out += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"ambit-{cid}*")]
    if (L.BPF_ROOT / cid).exists():
        out.append(f"bpf {L.BPF_ROOT / cid}")
    out += [f"etc {p}" for p in Path("/etc/netns").glob(f"ambit-{cid}*")] if Path("/etc/netns").exists() else []
    return out


def test_down_removes_everything_even_after_a_crash(tmp_path: Path) -> None:
    state = tmp_path / "crash"
    before = root_net()
    try:
        C.up(state, 2, wait=0.2, components=["ca"])
        m = write_manifest(tmp_path / "p.yaml", pod_yaml("default", "p", "node-b", ["sleep", "600"]))
        C.apply(state, [m])
        lay = L.Layout.load(state)
        pids = [pidfile_alive(p) for p in lay.pids_dir.glob("*.pid")]
        assert all(pids) and len(pids) >= 2
        (L.BPF_ROOT / lay.cid / "node-a").mkdir(parents=True, exist_ok=True)  # as the agent pins there
        # crash: the supervisor dies hard, its children keep running, the socket stays
        sup_pid = pidfile_alive(lay.pids_dir / "supervisor.pid")
        assert sup_pid is not None
        os.kill(sup_pid, signal.SIGKILL)
        (state / "cluster.json").write_text("{damaged")
        out = subprocess.run(
            [*AMBIT, "local", "down", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert out.returncode == 0, out.stderr
        assert _leftovers(state) == []
        assert not [p for p in pids if p and running(p)], "a process of the cluster survived down"
        # idempotent, and a later up in the same state dir works
        C.down(state)
        C.up(state, 1, wait=0.2, components=())
    finally:
        C.down(state)
    assert root_net() == before


def test_failed_up_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "half"
    lay = L.plan(state, 2, Path("/sys/fs/cgroup/unified"))
    squatter = lay.nodes[1].netns  # node-b's netns already exists: up fails half-way
    nsops.create(squatter)
    try:
        with pytest.raises(AgentError, match=f"{squatter} already exists"):
            C.up(state, 2)
        assert _leftovers(state) == [f"netns {squatter}"], "up must remove what it made, and only that"
        assert not state.exists()
    finally:
        nsops.remove(squatter)
        C.down(state)


def test_two_clusters_side_by_side(cluster: L.Layout, tmp_path: Path) -> None:
    state2 = tmp_path / "second"
    try:
        lay2 = C.up(state2, 1, wait=0.2, components=()).layout
        assert lay2.cid != cluster.cid
        m = write_manifest(tmp_path / "p.yaml", pod_yaml("default", "solo", "node-a", ["sleep", "600"]))
        C.apply(state2, [m])
        assert pod(lay2, "default", "solo")["status"]["phase"] == "Running"
        assert C.store_of(cluster).get(("Pod", "default", "solo")) is None
    finally:
        C.down(state2)
    assert _leftovers(state2) == []
    # the first cluster is untouched
    assert all(nsops.exists(n.netns) for n in cluster.nodes)


def test_entered_moves_the_thread_and_back(tmp_path: Path) -> None:
    name = f"ambit-test-{os.getpid()}-entered"
    seen: dict[str, Any] = {}

    def own() -> int:
        return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino

    def body() -> None:
        # on a helper thread: if returning failed, only this thread would be left behind
        try:
            seen["before"] = own()
            with nsops.entered(nsops.netns_path(name)):
                seen["inside"] = own()
            seen["after"] = own()
            with pytest.raises(nsops.NetnsError, match="cannot open network namespace"), \
                    nsops.entered(tmp_path / "missing"):
                pass
            seen["after_error"] = own()
        except BaseException as e:
            seen["error"] = e

    nsops.create(name)
    try:
        t = threading.Thread(target=body)
        t.start()
        t.join(10)
        assert "error" not in seen, seen.get("error")
        assert seen["inside"] == os.stat(nsops.netns_path(name)).st_ino != seen["before"]
        assert seen["after"] == seen["after_error"] == seen["before"]
    finally:
        nsops.remove(name)
