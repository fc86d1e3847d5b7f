"""Two faults on a real local cluster (root): every workload certificate rotated under traffic,
and the agent killed with SIGKILL in the middle of a reconcile pass (issue 8).

One cluster for the module, whose workload certificates live 60 s (renewed at about 30 s),
always brought down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.mesh import AMBIT, ENROLL, REPO, SLEEP, Cluster, ambit, namespace, pod, poll

PORT = 9000
CLIENT_SA = "spiffe://cluster.local/ns/mesh/sa/client"
SERVER_SA = "spiffe://cluster.local/ns/mesh/sa/server"

# First chunk answered `peer=<ip> echo=<data>` (as tests.e2e.mesh.ECHO_SERVER), every later
# chunk echoed as is: one-shot clients and long-lived ones use the same server.
STREAM_ECHO = """\
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        first = True
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            if first:
                data = b"peer=" + self.client_address[0].encode() + b" echo=" + data
                first = False
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), H).serve_forever()
"""

# One connection held open: a numbered line every 0.2 s, each echo checked, for `seconds`.
CHATTER = r"""
import json, socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"sent": 0, "echoed": 0, "error": None, "last_ok": None}
try:
    s = socket.create_connection((ip, port), timeout=5)
    s.sendall(b"hello\n")
    s.recv(4096)
    f = s.makefile("rb")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        line = b"ping %d\n" % out["sent"]
        s.sendall(line)
        out["sent"] += 1
        if f.readline() != line:
            out["error"] = "a wrong or missing echo"
            break
        out["echoed"] += 1
        out["last_ok"] = time.time()
        time.sleep(0.2)
    s.close()
except OSError as e:
    out["error"] = repr(e)
print(json.dumps(out), flush=True)
"""


def manifests() -> list[dict[str, Any]]:
    return [
        namespace("mesh", {ENROLL: "ambient"}),
        namespace("plain"),
        pod("mesh", "client", "node-a", SLEEP, sa="client"),
        pod("mesh", "server", "node-b", ["python3", "-u", "-c", STREAM_ECHO], sa="server"),
        pod("plain", "web", "node-b", ["python3", "-u", "-c", STREAM_ECHO]),
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import require_root

    require_root()
    tmp = tmp_path_factory.mktemp("ambit-faults")
    c = Cluster(state=tmp / "state", tmp=tmp)
    try:
        c.local("up", "--cert-ttl", "60s", timeout=120)
        c.apply(manifests(), "faults.yaml")
        poll(lambda: all(x["status"].get("phase") == "Running" for x in c.pods().values()), 20, "every pod Running")
        poll(lambda: c.talk("mesh/client", c.ip("mesh/server"), PORT, "warmup").ok, 30,
             "mesh/client -> mesh/server", interval=0.3)
        yield c
    finally:
        ambit("local", "down", "--state-dir", str(c.state), check=False, timeout=120)


def _serials(c: Cluster) -> dict[str, str]:
    out = {}
    for node in ("node-a", "node-b"):
        for row in c.cli_json("certs", "--node", node)["items"]:
            if row.get("serial"):
                out[row["identity"]] = row["serial"]
    return out


def test_certificates_rotate_under_traffic_without_a_reset(cluster: Cluster) -> None:
    c = cluster
    server_ip = c.ip("mesh/server")
    before = _serials(c)
    assert {CLIENT_SA, SERVER_SA} <= set(before), before
    chatter = subprocess.Popen(
        [*AMBIT, "local", "exec", "mesh/client", "--state-dir", str(c.state), "--",
         "python3", "-c", CHATTER, server_ip, str(PORT), "50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        # renewal at half of the 60 s lifetime; both sides of the connection get new certificates
        def renewed() -> dict[str, str]:
            s = _serials(c)
            return s if s.get(CLIENT_SA) != before[CLIENT_SA] and s.get(SERVER_SA) != before[SERVER_SA] else {}

        after = poll(renewed, 45, "both certificates renewed", interval=1.0)
        rotated_at = time.time()
        # a new connection uses the new client certificate (a new HBONE connection, not the old one)
        n0 = len(c.records("node-b", src_workload="mesh/client"))
        assert c.talk("mesh/client", server_ip, PORT, "after-rotation").ok
        recs = poll(lambda: c.records("node-b", src_workload="mesh/client")[n0:], 5, "the new connection's record")
        assert recs[-1]["src_cert_serial"] == after[CLIENT_SA], (recs[-1], before, after)
        stdout, stderr = chatter.communicate(timeout=90)
    finally:
        if chatter.poll() is None:
            os.kill(chatter.pid, signal.SIGKILL)
            chatter.wait()
    out: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {"error": stderr}
    assert out["error"] is None and out["echoed"] == out["sent"] > 100, out
    assert out["last_ok"] > rotated_at + 5, "the long-lived connection did not outlive the rotation"
    # the long-lived connection was authenticated by the old certificate all along
    old = [r for r in c.records("node-b", src_workload="mesh/client") if r.get("bytes_received", 0) > 1000]
    assert old and old[-1]["src_cert_serial"] == before[CLIENT_SA], old[-1:]
    assert old[-1]["error"] is None and old[-1]["response_flags"] == "-", old[-1]


# From an enrolled pod: connect again and again to an unenrolled server that reports the peer
# it sees; through the mesh that is node-a's ztunnel, never the pod's own address.
LOOP = r"""
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


def _kernel_pod_map(c: Cluster) -> list[Any]:
    """The node's pinned pod-IP map, read with bpftool (the kernel's own view, not the agent's)."""
    pin = f"/sys/fs/bpf/ambit/{c.cid}/node-a/pod_ips"
    r = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", pin], capture_output=True, text=True, check=True)
    entries: list[Any] = json.loads(r.stdout)
    return entries


def test_agent_sigkill_mid_reconcile_leaves_no_pod_half_enrolled(cluster: Cluster) -> None:
    c = cluster
    web_ip, client_ip = c.ip("plain/web"), c.ip("mesh/client")
    wave_a = [pod("mesh", f"a{i}", "node-a", SLEEP, sa="wave") for i in range(6)]
    wave_b = [pod("mesh", f"b{i}", "node-a", SLEEP, sa="wave") for i in range(6)]
    loop = subprocess.Popen(
        [*AMBIT, "local", "exec", "mesh/client", "--state-dir", str(c.state), "--",
         "python3", "-c", LOOP, web_ip, str(PORT), "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    churn_error: list[BaseException] = []

    def churn() -> None:
        # four waves: each adds six enrolled pods and deletes the six of the wave before
        try:
            for i in range(4):
                c.apply(wave_a if i % 2 == 0 else wave_b, f"wave-{i}.yaml")
                if i:
                    c.local("delete", "-f", str(c.tmp / f"wave-{i - 1}.yaml"), "--ignore-not-found")
                time.sleep(1.5)
        except BaseException as e:  # reported by the test thread
            churn_error.append(e)

    t = threading.Thread(target=churn, name="churn")
    try:
        t.start()
        kills = 0
        for delay in (0.4, 1.3, 2.1, 3.7):
            time.sleep(delay)
            pid = c.pid("node-a.agent.pid")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                kills += 1
        t.join(60)
        assert not churn_error, churn_error
        assert kills >= 3
        stdout, _ = loop.communicate(timeout=60)
    finally:
        if loop.poll() is None:
            os.kill(loop.pid, signal.SIGKILL)
            loop.wait()
    # nothing was let through: every reply came through node-a's ztunnel
    replies = [json.loads(ln).get("reply", "") for ln in stdout.splitlines() if ln.startswith("{")]
    peers = {r.split()[0].removeprefix("peer=") for r in replies if r.startswith("peer=")}
    assert peers, f"no connection succeeded at all: {stdout[-500:]}"
    assert client_ip not in peers, f"a connection bypassed the ztunnel: {peers}"

    # converged: exactly the pods of the last wave (and the client) enrolled, redirected and annotated
    want = {f"mesh/b{i}" for i in range(6)} | {"mesh/client"}

    def converged() -> bool:
        r = c.cli("status", "--node", "node-a", "-o", "json", check=False)
        if r.returncode != 0:
            return False
        st = json.loads(r.stdout)
        return {p["pod"] for p in st["pods"] if p["redirected"]} == want and not st["pending"]

    poll(converged, 30, "node-a to converge after the kills", interval=0.5)
    pods = c.pods()
    for key in want:
        ann = pods[key]["metadata"].get("annotations") or {}
        assert ann.get("ambit.dev/redirection") == "enabled", (key, ann)
    assert not any(k.startswith("mesh/a") for k in pods)
    # the kernel holds an entry for exactly the enrolled pods of node-a: none left half-removed
    ips = {pods[k]["status"]["podIP"] for k in want}
    kernel_ips = set()
    for e in _kernel_pod_map(c):
        key = e["formatted"]["key"] if "formatted" in e else e["key"]
        raw = bytes(int(b, 16) for b in key) if isinstance(key, list) else int(key).to_bytes(4, "little")
        kernel_ips.add(".".join(str(b) for b in raw))
    assert kernel_ips == ips, (sorted(kernel_ips), sorted(ips))
    c.local("delete", "-f", str(c.tmp / "wave-3.yaml"), "--ignore-not-found")
