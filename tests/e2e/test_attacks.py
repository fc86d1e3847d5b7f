"""The holes a hostile test found (issue 8), each tried again the way an attacker would:
from inside pods of a two-node local cluster, by the pods' own means (root).

One cluster for the module, always brought down. Every test leaves the cluster's
policies as it found them.

  node-a: mesh/client (enrolled), mesh/local (enrolled echo, PERMISSIVE), plain/outsider (not enrolled)
  node-b: mesh/server (enrolled echo), plain/web (not enrolled echo)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import ECHO, ENROLL, SLEEP, Cluster, ambit, namespace, pod, poll

PORT = 9000


def manifests() -> list[dict[str, Any]]:
    return [
        namespace("mesh", {ENROLL: "ambient"}),
        namespace("plain"),
        pod("mesh", "client", "node-a", SLEEP, sa="client"),
        pod("mesh", "local", "node-a", ECHO, sa="local", labels={"app": "local"}),
        pod("mesh", "server", "node-b", ECHO, sa="server", labels={"app": "server"}),
        pod("plain", "outsider", "node-a", SLEEP),
        pod("plain", "web", "node-b", ECHO, labels={"app": "web"}),
    ]


def authz(name: str, spec: dict[str, Any], ns: str = "mesh") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _ready(c: Cluster) -> bool:
    want = {"node-a": {"mesh/client", "mesh/local"}, "node-b": {"mesh/server"}}
    for node, pods in want.items():
        r = c.cli("status", "--node", node, "-o", "json", check=False)
        if r.returncode != 0:
            return False
        if not pods <= {p["pod"] for p in json.loads(r.stdout)["pods"] if p["redirected"]}:
            return False
    return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import require_root

    require_root()
    tmp = tmp_path_factory.mktemp("ambit-attacks")
    c = Cluster(state=tmp / "state", tmp=tmp)
    try:
        c.local("up", timeout=120)
        c.apply(manifests(), "attacks.yaml")
        poll(lambda: all(x["status"].get("phase") == "Running" for x in c.pods().values()), 20, "every pod Running")
        poll(lambda: _ready(c), 30, "enrolled pods redirected and both ztunnels ready", interval=0.3)
        poll(lambda: c.talk("mesh/client", c.ip("mesh/server"), PORT, "warmup").ok, 20,
             "mesh/client -> mesh/server", interval=0.2)
        poll(lambda: c.talk("mesh/client", c.ip("mesh/local"), PORT, "warmup").ok, 20,
             "mesh/client -> mesh/local", interval=0.2)
        yield c
    finally:
        ambit("local", "down", "--state-dir", str(c.state), check=False, timeout=120)


def _wait_policy(c: Cluster, node: str, name: str, present: bool = True) -> None:
    def seen() -> bool:
        pols = c.cli_json("policies", "--node", node)["items"]
        return any(str(p.get("name")) == name for p in pols) == present

    poll(seen, 15, f"policy {name} {'in force' if present else 'gone'} on {node}", interval=0.2)


# An HTTP request from inside a pod; prints {"status": N} or {"error": ...}.
HTTP = r"""
import json, socket, sys
host, port, method, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    s = socket.create_connection((host, port), timeout=2)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    line = buf.split(b"\r\n", 1)[0].decode(errors="replace")
    print(json.dumps({"status": int(line.split()[1]) if line.startswith("HTTP/") else None, "head": line}))
except OSError as e:
    print(json.dumps({"error": repr(e)}))
"""


def _http(c: Cluster, src: str, host: str, port: int, method: str, path: str) -> dict[str, Any]:
    r = c.exec(src, "python3", "-c", HTTP, host, str(port), method, path)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_pods_cannot_reach_the_nodes_admin_apis(cluster: Cluster) -> None:
    """Hole 1: 0.0.0.0:15000/15010 from a pod answered 200, and /quitquitquit restarted the ztunnel."""
    c = cluster
    ztunnel_pid = c.pid("node-a.ztunnel.pid")
    assert ztunnel_pid is not None
    for src in ("mesh/client", "plain/outsider"):
        for host in ("0.0.0.0", "0.0.0.1", "127.0.0.1"):
            for port, method, path in ((15000, "GET", "/config_dump"), (15010, "GET", "/status"),
                                       (15000, "POST", "/quitquitquit")):
                got = _http(c, src, host, port, method, path)
                assert got.get("status") is None, f"{src} reached {host}:{port}{path}: {got}"
    assert c.pid("node-a.ztunnel.pid") == ztunnel_pid, "a pod restarted the node's ztunnel"
    assert c.talk("mesh/client", c.ip("mesh/server"), PORT, "still-up").ok


# From an unenrolled pod: a plaintext connection to a PERMISSIVE pod of its node (so TC
# records an original destination for this client address and port), then a connection
# from the same address and port straight to the node's 15001, hoping the ztunnel takes
# that destination and proxies the plaintext with this pod's service-account identity.
LAUNDER = r"""
import json, socket, sys
target, port, gateway, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
SPORT = 47123
def dial(host, p, data):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", SPORT)); s.settimeout(3)
    try:
        s.connect((host, p)); s.sendall(data); s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        return buf.decode(errors="replace")
    except OSError as e:
        return "error " + repr(e)
    finally:
        s.close()
first = dial(target, port, b"prime")
second = dial(gateway, 15001, marker)
print(json.dumps({"first": first, "second": second}))
"""


def test_unenrolled_pod_cannot_launder_plaintext_into_an_identity(cluster: Cluster) -> None:
    """Hole 2: 15001 proxied an unenrolled pod with its service account's identity."""
    c = cluster
    local_ip = c.ip("mesh/local")
    # no identity, no entry: plaintext to mesh/local is denied; a laundered identity would pass
    c.apply([authz("deny-no-identity", {"action": "DENY", "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]})],
            "deny-no-identity.yaml")
    try:
        _wait_policy(c, "node-a", "deny-no-identity")
        marker = "LAUNDERED-MARKER"
        r = c.exec("plain/outsider", "python3", "-c", LAUNDER, local_ip, str(PORT), c.node("node-a")["gateway"],
                   marker)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert "echo=prime" not in out["first"], f"plaintext without identity was let in: {out}"
        assert marker not in out["second"], f"15001 proxied an unenrolled pod: {out}"
        # the node-a ztunnel refused it and names why; nothing was allowed for the outsider
        src = f"{c.ip('plain/outsider')}:47123"
        recs = poll(lambda: [x for x in c.access_log("node-a") if x.get("src") == src
                             and x.get("direction") == "outbound"], 5, "node-a's record of the attempt")
        assert all(x.get("decision") != "allow" for x in recs), recs
    finally:
        c.local("delete", "-f", str(c.tmp / "deny-no-identity.yaml"))
        _wait_policy(c, "node-a", "deny-no-identity", present=False)


# Move this process into a cgroup made under its own pod's (after enrollment), then talk.
# The pod mounts the cgroup2 hierarchy itself (its /sys is its netns's), as root in a
# container with CAP_SYS_ADMIN could.
SUBCGROUP = r"""
import json, os, socket, subprocess, sys, tempfile
ip, port = sys.argv[1], int(sys.argv[2])
own = [ln for ln in open("/proc/self/cgroup").read().splitlines() if ln.startswith("0::")][0][3:]
mnt = tempfile.mkdtemp()
subprocess.run(["mount", "-t", "cgroup2", "none", mnt], check=True)
sub = os.path.join(mnt + own, "escape", "deeper")
os.makedirs(sub, exist_ok=True)
with open(os.path.join(sub, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
out = {"cgroup": open("/proc/self/cgroup").read().strip()}
try:
    s = socket.create_connection((ip, port), timeout=3)
    s.sendall(b"sub"); s.shutdown(socket.SHUT_WR)
    buf = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        buf += d
    out["reply"] = buf.decode(errors="replace")
except OSError as e:
    out["error"] = repr(e)
subprocess.run(["umount", mnt], check=False)
os.rmdir(mnt)
print(json.dumps(out))
"""


def test_a_subcgroup_of_an_enrolled_pod_is_still_in_the_mesh(cluster: Cluster) -> None:
    """Hole 3: a cgroup created under the pod's after enrollment connected in plaintext."""
    c = cluster
    plan = c.plan
    pod_cgroup = Path(plan["cgroup_root"]) / f"ambit-{plan['cid']}" / "node-a" / "mesh.client"
    web_ip = c.ip("plain/web")
    n0 = len(c.records("node-a", src_workload="mesh/client", dst_workload="plain/web"))
    try:
        r = c.exec("mesh/client", "python3", "-c", SUBCGROUP, web_ip, str(PORT))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert "escape/deeper" in out["cgroup"], out
        # through the ztunnel (passthrough to an unenrolled server): web sees node-a, not the pod
        assert out.get("reply", "").startswith("peer="), out
        assert not out["reply"].startswith(f"peer={c.ip('mesh/client')} "), f"plaintext bypassed the mesh: {out}"
        poll(lambda: c.records("node-a", src_workload="mesh/client", dst_workload="plain/web")[n0:], 5,
             "node-a's ztunnel record of the sub-cgroup's connection")
        st = c.cli_json("status", "--node", "node-a")
        row = next(p for p in st["pods"] if p["pod"] == "mesh/client")
        assert row["redirected"] and row["subcgroups_uncovered"] == [], row
    finally:
        for d in (pod_cgroup / "escape" / "deeper", pod_cgroup / "escape"):
            if d.exists():
                d.rmdir()


def test_ip_blocks_see_the_client_across_nodes(cluster: Cluster) -> None:
    """Hole 5: the destination judged ipBlocks by the source node's address."""
    c = cluster
    client_ip, server_ip = c.ip("mesh/client"), c.ip("mesh/server")
    sel = {"matchLabels": {"app": "server"}}
    deny = authz("ipblock", {"selector": sel, "action": "DENY",
                             "rules": [{"from": [{"source": {"ipBlocks": [f"{client_ip}/32"]}}]}]})
    allow = authz("ipblock", {"selector": sel, "action": "ALLOW",
                              "rules": [{"from": [{"source": {"ipBlocks": [f"{client_ip}/32"]}}]}]})
    path = c.tmp / "ipblock.yaml"
    try:
        c.apply([deny], "ipblock.yaml")
        _wait_policy(c, "node-b", "ipblock")
        poll(lambda: not c.talk("mesh/client", server_ip, PORT, "deny").ok, 10, "the DENY on the client's IP")
        c.apply([allow], "ipblock.yaml")
        poll(lambda: c.talk("mesh/client", server_ip, PORT, "allow").ok, 10, "the ALLOW on the client's IP")
        # and the ALLOW admits nobody else
        assert not c.talk("mesh/local", server_ip, PORT, "other").ok
    finally:
        c.local("delete", "-f", str(path))
        _wait_policy(c, "node-b", "ipblock", present=False)


def test_same_node_permissive_plaintext_is_delivered(cluster: Cluster) -> None:
    """Hole 6: plaintext from an unenrolled pod to a PERMISSIVE pod of its node was blackholed."""
    c = cluster
    res = c.talk("plain/outsider", c.ip("mesh/local"), PORT, "same-node-plaintext", timeout=3)
    assert res.ok, res
    # delivered by node-a's ztunnel (15006), which dials the pod from the pods' gateway
    assert res.peer == c.node("node-a")["gateway"], res
    recs = poll(lambda: c.records("node-a", direction="inbound_plaintext", dst_workload="mesh/local"), 5,
                "node-a's inbound_plaintext record")
    assert recs[-1]["decision"] == "allow", recs[-1]


def _status_row(c: Cluster, node: str, key: str) -> dict[str, Any]:
    r = c.cli("status", "--node", node, "-o", "json", check=False)
    if r.returncode not in (0, 4):
        return {}
    return next((p for p in json.loads(r.stdout)["pods"] if p["pod"] == key), {})


def _policy_row(c: Cluster, node: str, name: str) -> dict[str, Any]:
    r = c.cli("policies", "--node", node, "-o", "json", check=False)
    if r.returncode != 0:
        return {}
    return next((p for p in json.loads(r.stdout)["items"] if p.get("name") == name), {})


def test_strict_holds_through_an_invalid_edit_and_restarts(cluster: Cluster) -> None:
    """Hole 4: after an invalid edit of a STRICT PeerAuthentication the kernel went PERMISSIVE
    at once, and after a ztunnel (or agent) restart plaintext reached the pod."""
    c = cluster
    local_ip = c.ip("mesh/local")
    def peer_authn(mode: str) -> dict[str, Any]:
        return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                "metadata": {"name": "strict-local", "namespace": "mesh"},
                "spec": {"selector": {"matchLabels": {"app": "local"}}, "mtls": {"mode": mode}}}

    strict = peer_authn("STRICT")
    path = c.tmp / "strict-local.yaml"

    def plaintext_refused() -> bool:
        return not c.talk("plain/outsider", local_ip, PORT, "plaintext", timeout=1.5).ok

    def strict_everywhere() -> bool:
        row, pol = _status_row(c, "node-a", "mesh/local"), _policy_row(c, "node-a", "strict-local")
        return row.get("mode") == "STRICT" and bool(row.get("maps_in_sync")) and pol.get("mode") == "STRICT"

    try:
        c.apply([strict], "strict-local.yaml")
        poll(strict_everywhere, 15, "STRICT in the kernel and the ztunnel", interval=0.3)
        assert plaintext_refused()
        # `ambit local apply` refuses the typo itself ...
        typo = peer_authn("STRCT")
        r = c.local("apply", "-f", str(_write(c.tmp / "typo.yaml", typo)), check=False)
        assert r.returncode != 0 and "spec.mtls.mode" in r.stderr, r
        # ... so it reaches the cluster the way an API server without schema validation would store it
        stored = c.state / "cluster" / "peerauthentication" / "mesh.strict-local.yaml"
        tmp = stored.with_suffix(".tmp")
        tmp.write_text(json.dumps(typo))
        tmp.replace(stored)

        def rejected() -> bool:
            dump = c.cli_json("policies", "--node", "node-a")
            return any("STRCT" in e for e in dump.get("errors", []))

        poll(rejected, 15, "the invalid edit reported by node-a", interval=0.3)
        assert strict_everywhere(), "the last good STRICT left the kernel or the ztunnel"
        assert plaintext_refused()
        for units in (["ztunnel"], ["agent"], ["agent", "ztunnel"]):
            for unit in units:
                c.local("restart", unit, "--node", "node-a")
            poll(lambda: _status_row(c, "node-a", "mesh/local").get("redirected"), 30,
                 f"mesh/local redirected after restarting {' and '.join(units)}", interval=0.3)
            poll(strict_everywhere, 15, f"STRICT after restarting {' and '.join(units)}", interval=0.3)
            assert plaintext_refused(), f"plaintext reached the STRICT pod after restarting {units}"
        assert c.talk("mesh/client", local_ip, PORT, "mtls").ok, "mesh traffic must still flow"
    finally:
        c.local("delete", "-f", str(_write(path, strict)), "--ignore-not-found")
    poll(lambda: not plaintext_refused(), 20, "plaintext to the PERMISSIVE pod again", interval=0.3)


def _write(path: Path, obj: dict[str, Any]) -> Path:
    path.write_text(json.dumps(obj))
    return path


# Istio's "plaintext for health checks only" example, verbatim: the namespace is STRICT, and
# the finance workload is STRICT except on 8080 (issue 9: the kernel keeps modes per port).
SEED_003 = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
"""

# The echo server of tests.e2e.mesh on two ports.
TWO_PORTS = """\
import socketserver, threading
class H(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(4096)
        self.request.sendall(b"peer=" + self.client_address[0].encode() + b" echo=" + data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
servers = [socketserver.ThreadingTCPServer(("0.0.0.0", p), H) for p in (8080, 9000)]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""


def test_port_level_mtls_exceptions_hold_in_the_kernel(cluster: Cluster) -> None:
    c = cluster
    objs = [namespace("foo", {ENROLL: "ambient"}),
            pod("foo", "finance", "node-b", ["python3", "-u", "-c", TWO_PORTS], sa="finance",
                labels={"app": "finance"})]
    seed = c.tmp / "seed-003.yaml"
    seed.write_text(SEED_003)
    try:
        c.apply(objs, "foo.yaml")
        c.local("apply", "-f", str(seed))
        poll(lambda: _status_row(c, "node-b", "foo/finance").get("redirected")
             and _status_row(c, "node-b", "foo/finance").get("port_modes") == {"8080": "PERMISSIVE"}, 30,
             "foo/finance redirected, STRICT with 8080 open to plaintext", interval=0.3)
        ip = c.ip("foo/finance")
        gw_b = c.node("node-b")["gateway"]
        # plaintext from outside the mesh: 8080 only, through node-b's ztunnel (where L4 policy applies)
        poll(lambda: c.talk("plain/outsider", ip, 8080, "health", timeout=2).ok, 15, "plaintext to finance:8080")
        r = c.talk("plain/outsider", ip, 8080, "health", timeout=2)
        assert r.peer == gw_b, r
        assert not c.talk("plain/outsider", ip, 9000, "nope", timeout=1.5).ok, "plaintext reached a STRICT port"
        # mesh traffic reaches both ports
        for port in (8080, 9000):
            assert c.talk("mesh/client", ip, port, "mtls").ok, port
        rec = poll(lambda: c.records("node-b", direction="inbound_plaintext", dst_workload="foo/finance"), 5,
                   "node-b's plaintext record for finance:8080")[-1]
        assert rec["dst"].endswith(":8080") and rec["decision"] == "allow", rec
    finally:
        c.local("delete", "-f", str(seed), "--ignore-not-found")
        c.local("delete", "-f", str(c.tmp / "foo.yaml"), "--ignore-not-found")
