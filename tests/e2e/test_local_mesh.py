"""The mesh end to end on a real two-node local cluster (root).

One cluster for the whole module (`ambit local up` in a state dir of its own),
always brought down. The tests run in file order and each leaves the cluster
as it found it; the last one brings the cluster down and checks that nothing
of it remains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import (
    AMBIT,
    ECHO,
    ENROLL,
    REPO,
    Capture,
    Cluster,
    ambit,
    leftovers,
    manifests,
    namespace,
    pod,
    poll,
    same_process_runs,
    write_manifest,
)

CLIENT_SA = "spiffe://cluster.local/ns/mesh/sa/client"
SERVER_SA = "spiffe://cluster.local/ns/mesh/sa/server"
INTRUDER_SA = "spiffe://cluster.local/ns/mesh/sa/intruder"
PORT = 9000


def root_net() -> tuple[str, str]:
    addr = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    route = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True, text=True, check=True).stdout
    return addr, route


def _ready(c: Cluster) -> bool:
    want = {"node-a": {"mesh/client", "mesh/intruder"}, "node-b": {"mesh/server"}}
    for node, pods in want.items():
        r = c.cli("status", "--node", node, "-o", "json", check=False)
        if r.returncode != 0:
            return False
        st = json.loads(r.stdout)
        if not pods <= {p["pod"] for p in st["pods"] if p["redirected"]}:
            return False
    return True


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import require_root

    require_root()
    tmp = tmp_path_factory.mktemp("ambit-e2e")
    c = Cluster(state=tmp / "state", tmp=tmp)
    before = root_net()
    try:
        c.local("up", timeout=120)
        c.apply(manifests(), "mesh.yaml")
        poll(lambda: all(x["status"].get("phase") == "Running" for x in c.pods().values()), 20, "every pod Running")
        assert len(c.pods()) == 5
        poll(lambda: _ready(c), 30, "enrolled pods redirected and both ztunnels ready", interval=0.3)
        # the server listens and the mesh path works before any test starts
        poll(lambda: c.talk("mesh/client", c.ip("mesh/server"), PORT, "warmup").ok, 20,
             "mesh/client -> mesh/server echo", interval=0.2)
        c.root_before = before
        yield c
    finally:
        ambit("local", "down", "--state-dir", str(c.state), check=False, timeout=120)


def test_enrolled_traffic_is_mtls_on_the_wire(mesh: Cluster, tmp_path: Path) -> None:
    c = mesh
    server_ip, client_ip = c.ip("mesh/server"), c.ip("mesh/client")
    node_b_gw = c.node("node-b")["gateway"]
    secret = f"E2E-SECRET-{os.getpid()}-{time.monotonic_ns()}"
    control = f"E2E-CONTROL-{os.getpid()}-{time.monotonic_ns()}"
    n_before = len(c.records("node-b", src_workload="mesh/client", dst_workload="mesh/server"))
    cap = Capture(c, tmp_path / "fabric.pcap")
    try:
        r = c.talk("mesh/client", server_ip, PORT, secret)
        ctl = c.talk("plain/outsider", c.ip("plain/web"), PORT, control)
        assert ctl.ok, ctl
        # tcpdump -U writes per packet; wait for the control marker to land in the file
        poll(lambda: control.encode() in cap.path.read_bytes(), 5, "the control marker in the capture")
    finally:
        pcap = cap.stop()
    assert r.ok and r.reply.endswith(f"echo={secret}"), r
    assert control.encode() in pcap, "the capture does not work: the plaintext control marker is missing"
    assert secret.encode() not in pcap, "the enrolled pods' plaintext crossed the fabric"
    assert r.peer == node_b_gw != client_ip, f"the server saw {r.peer}, expected the ztunnel's {node_b_gw}"
    recs = poll(lambda: c.records("node-b", src_workload="mesh/client", dst_workload="mesh/server")[n_before:],
                5, "node-b's access log record")
    rec = recs[-1]
    assert rec["src_identity"] == CLIENT_SA and rec["dst_identity"] == SERVER_SA, rec
    assert rec["mtls"] is True and rec["direction"] == "inbound" and rec["decision"] == "allow", rec
    assert rec["client_ip"] == client_ip


def test_enrollment_follows_labels_without_restarts(mesh: Cluster) -> None:
    c = mesh
    out_ip, web_ip = c.ip("plain/outsider"), c.ip("plain/web")
    node_b_gw = c.node("node-b")["gateway"]
    web_pid = c.pid("pod.plain.web.pid")
    assert web_pid is not None

    def web_records() -> list[dict[str, Any]]:
        return c.records("node-b", dst_workload="plain/web")

    # not enrolled: direct, the server sees the outsider's own address, no ztunnel involved
    n0 = len(web_records())
    r = c.talk("plain/outsider", web_ip, PORT, "direct")
    assert r.ok and r.peer == out_ip, r
    assert len(web_records()) == n0, "an unenrolled pair went through the ztunnel"

    original = [namespace("plain"), pod("plain", "web", "node-b", ECHO, labels={"app": "web"})]
    try:
        # enroll the server by pod label: node-b's plaintext inbound (PERMISSIVE) takes it
        c.apply([pod("plain", "web", "node-b", ECHO, labels={"app": "web", ENROLL: "ambient"})], "web-enrolled.yaml")

        def via_inbound_plaintext() -> Any:
            res = c.talk("plain/outsider", web_ip, PORT, "inbound")
            return res.ok and res.peer == node_b_gw and res

        poll(via_inbound_plaintext, 20, "outsider -> web through node-b's ztunnel", interval=0.2)
        recs = poll(lambda: [x for x in web_records()[n0:] if x["direction"] == "inbound_plaintext"], 5,
                    "an inbound_plaintext record for plain/web")
        assert recs[-1]["mtls"] is False and recs[-1]["decision"] == "allow", recs[-1]
        assert c.pid("pod.plain.web.pid") == web_pid, "enrolling restarted the pod"
        assert c.pods()["plain/web"]["status"]["phase"] == "Running"

        # enroll the namespace by label: the outsider's outbound goes through node-a's ztunnel
        n_a = len(c.records("node-a", src_workload="plain/outsider"))
        c.apply([namespace("plain", {ENROLL: "ambient"})], "plain-enrolled.yaml")

        def via_node_a() -> Any:
            res = c.talk("plain/outsider", web_ip, PORT, "outbound")
            return res.ok and c.records("node-a", src_workload="plain/outsider")[n_a:]

        recs = poll(via_node_a, 20, "a node-a ztunnel record for plain/outsider", interval=0.2)
        assert recs[-1]["direction"] == "outbound" and recs[-1]["dst_workload"] == "plain/web", recs[-1]
        assert c.pid("pod.plain.web.pid") == web_pid

        # unenroll both: direct paths again
        c.apply(original, "plain-original.yaml")

        def direct_again() -> Any:
            res = c.talk("plain/outsider", web_ip, PORT, "direct-again")
            return res.ok and res.peer == out_ip

        poll(direct_again, 20, "outsider -> web direct after unenrolling", interval=0.2)
        n1 = len(web_records())
        assert c.talk("plain/outsider", web_ip, PORT, "direct-check").peer == out_ip
        assert len(web_records()) == n1
        assert c.pid("pod.plain.web.pid") == web_pid, "the server process was restarted"
    finally:
        c.apply(original, "plain-restore.yaml")


# A hand-built TCP SYN on a raw socket (the kernel adds the IP header): the kind
# of packet an app could use to bypass the connect() redirect.
RAW_SYN = r"""
import json, os, socket, struct, sys, time
src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
sport = 40000 + os.getpid() % 20000
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
hdr = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(hdr))
hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr)) + hdr[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
s.settimeout(0.2)
out = {"sent": 0, "send_error": None, "synack": False}
for _ in range(3):
    try:
        s.sendto(hdr, (dst, 0)); out["sent"] += 1
    except OSError as e:
        out["send_error"] = repr(e)
deadline = time.monotonic() + 1.5
while time.monotonic() < deadline:
    try:
        pkt = s.recv(65535)
    except OSError:
        continue
    ihl = (pkt[0] & 0xF) * 4
    sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
    flags = pkt[ihl + 13]
    if sp == dport and dp == sport and flags & 0x12 == 0x12:
        out["synack"] = True
        break
print(json.dumps(out))
"""


def _bypass_drops(c: Cluster, node: str, key: str) -> int:
    st = c.cli_json("status", "--node", node)
    return int(next((p["bypass_drops"] for p in st["pods"] if p["pod"] == key), 0))


def test_bypass_attempts_fail_and_are_counted(mesh: Cluster) -> None:
    c = mesh
    server_ip, client_ip = c.ip("mesh/server"), c.ip("mesh/client")
    drops_before = _bypass_drops(c, "node-a", "mesh/client")
    r = c.exec("mesh/client", "python3", "-c", RAW_SYN, client_ip, server_ip, str(PORT))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["synack"], f"a raw SYN from an enrolled pod got an answer: {out}"
    assert out["sent"] or out["send_error"], out
    poll(lambda: _bypass_drops(c, "node-a", "mesh/client") > drops_before, 5,
         "bypass_drops of mesh/client to grow", interval=0.2)

    # plaintext into a STRICT pod from an unenrolled pod: dropped at node-b and shown as such
    res = c.talk("plain/outsider", server_ip, PORT, "strict", timeout=1.5)
    assert not res.ok, res
    out_ip = c.ip("plain/outsider")

    def dropped_row() -> Any:
        items = c.cli_json("flows", "--node", "node-b", "--denied")["items"]
        return [f for f in items if (f.get("source_pod") == "plain/outsider" or f.get("source_addr") == out_ip)
                and f.get("destination_pod") == "mesh/server"]

    rows = poll(dropped_row, 5, "a dropped flow plain/outsider -> mesh/server on node-b", interval=0.2)
    assert rows[-1]["verdict"] in ("drop", "dropped", "deny", "denied"), rows[-1]


def test_cli_shows_flows_policies_identities(mesh: Cluster) -> None:
    c = mesh
    server_ip = c.ip("mesh/server")
    assert c.talk("mesh/client", server_ip, PORT, "cli").ok
    flows = c.cli_json("flows", "--node", "node-b")["items"]
    allowed = [f for f in flows if f.get("source_pod") == "mesh/client" and f.get("destination_pod") == "mesh/server"
               and f.get("verdict") not in ("deny", "denied", "drop", "dropped")]
    assert allowed, f"no allowed mesh/client -> mesh/server flow on node-b: {flows}"
    f = allowed[-1]
    assert f["source_identity"] == CLIENT_SA and f["destination_identity"] == SERVER_SA, f
    assert f["security"] == "mutual_tls", f

    # the intruder's identity is denied by mesh/deny-intruder: an EOF for the app
    res = c.talk("mesh/intruder", server_ip, PORT, "intrude")
    assert not res.ok and "echo=" not in res.reply, res

    def denied_row() -> Any:
        items = c.cli_json("flows", "--node", "node-b", "--denied")["items"]
        return [x for x in items if x.get("source_pod") == "mesh/intruder"
                and str(x.get("policy") or "").startswith("mesh/deny-intruder")]

    row = poll(denied_row, 5, "a denied intruder flow naming mesh/deny-intruder", interval=0.2)[-1]
    assert row["source_identity"] == INTRUDER_SA and row["destination_pod"] == "mesh/server", row

    r = c.cli("policy", "check", "--from", "mesh/intruder", "--to", "mesh/server:9000", "--node", "node-b",
              check=False)
    assert r.returncode == 3, r
    assert "mesh/deny-intruder" in r.stdout and "rule 0" in r.stdout, r.stdout
    r = c.cli("policy", "check", "--from", "mesh/client", "--to", "mesh/server:9000", "--node", "node-b",
              check=False)
    assert r.returncode == 0, r

    r = c.cli("status", "--node", "node-a", check=False)
    assert r.returncode == 0, r
    line = next((ln for ln in r.stdout.splitlines() if "mesh/client" in ln), "")
    assert "yes" in line and "attached" in line, r.stdout

    wl = c.cli_json("workloads", "--node", "node-a")["items"]
    ids = {w["uid"]: w["identity"] for w in wl}
    assert ids.get("mesh/client") == CLIENT_SA and ids.get("mesh/server") == SERVER_SA, ids
    certs = {x["identity"]: x for x in c.cli_json("certs", "--node", "node-b")["items"]}
    assert SERVER_SA in certs and certs[SERVER_SA]["serial"], certs
    certs_a = {x["identity"] for x in c.cli_json("certs", "--node", "node-a")["items"]}
    assert {CLIENT_SA, INTRUDER_SA} <= certs_a and SERVER_SA not in certs_a, certs_a
    pols = c.cli_json("policies", "--node", "node-b")["items"]
    names = {str(p.get("key") or p.get("name")) for p in pols}
    assert any(n.startswith("mesh/deny-intruder") for n in names), names
    assert any(n.startswith("mesh/strict") for n in names), names

    r = c.cli("flows", "--node", "node-z", check=False)
    assert r.returncode != 0 and "node-z" in r.stderr, r
    assert "Traceback" not in r.stderr, r.stderr


def test_dry_run_decides_nothing_and_shows_in_flows(mesh: Cluster) -> None:
    c = mesh
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "dry-deny-client", "namespace": "mesh",
                           "annotations": {"istio.io/dry-run": "true"}},
              "spec": {"action": "DENY", "rules": [{"from": [{"source": {"principals": [CLIENT_SA[9:]]}}]}]}}
    path = write_manifest(c.tmp / "dry-run.yaml", [policy])
    c.local("apply", "-f", str(path))
    try:
        poll(lambda: any(p.get("dry_run") for p in c.cli_json("policies", "--node", "node-b")["items"]), 15,
             "the dry-run policy in force on node-b", interval=0.3)
        assert c.talk("mesh/client", c.ip("mesh/server"), PORT, "dry").ok  # evaluated, never enforced

        def marked() -> Any:
            return [f for f in c.cli_json("flows", "--node", "node-b")["items"]
                    if f.get("source_pod") == "mesh/client" and f.get("verdict") == "allow"
                    and any(d.get("policy") == "mesh/dry-deny-client" and d.get("decision") == "deny"
                            and d.get("rule") == 0 for d in f.get("dry_run") or [])]

        poll(marked, 10, "an allowed flow marked: would deny by mesh/dry-deny-client rule 0", interval=0.3)
        assert "dry-run" in c.cli("flows", "--node", "node-b").stdout
        logged = [r for r in c.access_log("node-b")
                  if any(d.get("policy") == "mesh/dry-deny-client" for d in r.get("dry_run") or [])]
        assert logged and all(r["decision"] == "allow" for r in logged), logged
        assert "dry-run" in c.cli("policies", "--node", "node-b").stdout
    finally:
        c.local("delete", "-f", str(path))


def test_fail_closed_when_the_ztunnel_is_down(mesh: Cluster) -> None:
    c = mesh
    server_ip = c.ip("mesh/server")
    agent_pid, client_pid = c.pid("node-a.agent.pid"), c.pid("pod.mesh.client.pid")
    assert agent_pid and client_pid
    c.local("stop", "ztunnel", "--node", "node-a")
    try:
        res = c.talk("mesh/client", server_ip, PORT, "while-down", timeout=3)
        assert not res.ok, res
        assert res.errno == "ECONNREFUSED" and res.elapsed < 1.0, res
    finally:
        c.local("start", "ztunnel", "--node", "node-a")
    poll(lambda: c.talk("mesh/client", server_ip, PORT, "back").ok, 20, "traffic after the ztunnel restart",
         interval=0.2)
    assert c.pid("node-a.agent.pid") == agent_pid, "the agent was restarted"
    assert c.pid("pod.mesh.client.pid") == client_pid, "the pod was restarted"


LOOP = """\
import json, socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s = socket.create_connection((ip, port), timeout=1)
        s.sendall(b"loop"); s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        print(json.dumps({"reply": buf.decode(errors="replace")}), flush=True)
        s.close()
    except OSError as e:
        print(json.dumps({"error": repr(e)}), flush=True)
    time.sleep(0.02)
"""


def test_agent_restart_never_opens_a_plaintext_path(mesh: Cluster) -> None:
    c = mesh
    server_ip, client_ip = c.ip("mesh/server"), c.ip("mesh/client")
    node_b_gw = c.node("node-b")["gateway"]
    agent_pid = c.pid("node-a.agent.pid")
    loop = subprocess.Popen(
        [*AMBIT, "local", "exec", "mesh/client", "--state-dir", str(c.state), "--",
         "python3", "-c", LOOP, server_ip, str(PORT), "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert loop.stdout is not None
        first = loop.stdout.readline()  # the loop runs: now restart under it (bounded: the loop ends by itself)
        c.local("restart", "agent", "--node", "node-a")
        stdout, stderr = loop.communicate(timeout=30)
        stdout = first + stdout
    finally:
        if loop.poll() is None:
            os.kill(loop.pid, signal.SIGKILL)
            loop.wait()
    results = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(results) > 10, (stdout, stderr)
    peers = [x["reply"].split()[0].removeprefix("peer=") for x in results if x.get("reply", "").startswith("peer=")]
    assert peers, f"no connection succeeded during the restart: {results[-5:]}"
    assert set(peers) == {node_b_gw}, f"a reply bypassed the ztunnel (client IP {client_ip}): {set(peers)}"
    new_pid = poll(lambda: (p := c.pid("node-a.agent.pid")) and p != agent_pid and p, 20, "the restarted agent")
    assert new_pid != agent_pid
    poll(lambda: c.talk("mesh/client", server_ip, PORT, "after").peer == node_b_gw, 20,
         "traffic after the agent restart", interval=0.2)


def test_down_leaves_nothing(mesh: Cluster) -> None:
    c = mesh
    plan = c.plan
    cid, cgroup_root = plan["cid"], plan["cgroup_root"]
    recorded: dict[str, tuple[int, str]] = {}
    for f in (c.state / "pids").glob("*.pid"):
        if c.pid(f.name):
            pid_s, start = f.read_text().split()[:2]
            recorded[f.name] = (int(pid_s), start)
    assert {"supervisor.pid", "node-a.agent.pid", "node-b.ztunnel.pid", "pod.mesh.server.pid"} <= set(recorded)
    assert leftovers(cid, cgroup_root), "nothing to look for: the cluster's names are wrong"
    assert list(c.state.glob("nodes/*/flows.db")), "the agents keep no flow history: nothing to look for"
    c.local("down", timeout=120)
    assert leftovers(cid, cgroup_root) == []
    # the cluster's own state goes with it (a new cluster in this dir starts clean); logs stay
    assert not [*c.state.glob("nodes/*/flows.db*"), *c.state.glob("*/*/last-good-policies.json")]
    alive = {n: pid for n, (pid, start) in recorded.items() if same_process_runs(pid, start)}
    assert not alive, f"processes of the cluster survived down: {alive}"
    assert root_net() == c.root_before, "the machine's own addresses or routes changed"

