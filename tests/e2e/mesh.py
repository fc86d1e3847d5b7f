"""Helpers for the end-to-end tests: drive one real local cluster through the `ambit` CLI.

Everything goes through `python -m agent.cli` subprocesses, as an operator
would type it; pods are reached only with `ambit local exec`. Every wait is a
bounded poll.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
AMBIT = [sys.executable, "-m", "agent.cli"]
ENROLL = "ambit.dev/dataplane-mode"

T = TypeVar("T")

# A threaded echo server: one read, then `peer=<ip it sees> echo=<data>`, then close.
ECHO_SERVER = """\
import socketserver
class H(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(4096)
        self.request.sendall(b"peer=" + self.client_address[0].encode() + b" echo=" + data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), H).serve_forever()
"""

# One connection from inside a pod: prints JSON {reply, error, errno, elapsed}.
# Through a ztunnel the connect always succeeds; a refusal there is an EOF
# (empty reply), which the tests treat as failure.
CLIENT = """\
import errno, json, socket, sys, time
ip, port, marker, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
out = {"reply": "", "error": None, "errno": None}
t0 = time.monotonic()
try:
    s = socket.create_connection((ip, port), timeout=timeout)
    s.sendall(marker)
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        buf += d
    out["reply"] = buf.decode(errors="replace")
except OSError as e:
    out["error"] = repr(e)
    out["errno"] = errno.errorcode.get(e.errno or 0) if e.errno else type(e).__name__
out["elapsed"] = time.monotonic() - t0
print(json.dumps(out))
"""


def ambit(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*AMBIT, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"ambit {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def poll(fn: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call fn until it returns something truthy; fail naming `what` (and the last value) after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def pod(ns: str, name: str, node: str, command: list[str], *, sa: str | None = None,
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "command": command}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": spec}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


ECHO = ["python3", "-u", "-c", ECHO_SERVER]
SLEEP = ["sleep", "infinity"]


def manifests() -> list[dict[str, Any]]:
    return [
        namespace("mesh", {ENROLL: "ambient"}),
        namespace("plain"),
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "strict", "namespace": "mesh"}, "spec": {"mtls": {"mode": "STRICT"}}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "deny-intruder", "namespace": "mesh"},
         "spec": {"action": "DENY",
                  "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/intruder"]}}]}]}},
        pod("mesh", "server", "node-b", ECHO, sa="server", labels={"app": "server"}),
        pod("mesh", "client", "node-a", SLEEP, sa="client"),
        pod("mesh", "intruder", "node-a", SLEEP, sa="intruder"),
        pod("plain", "outsider", "node-a", SLEEP),
        pod("plain", "web", "node-b", ECHO, labels={"app": "web"}),
    ]


def write_manifest(path: Path, objs: Iterable[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(list(objs)))
    return path


def same_process_runs(pid: int, start: str) -> bool:
    """Is `pid` alive (not a zombie) and still the process that started at `start` (clock ticks)?"""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def leftovers(cid: str, cgroup_root: str | Path) -> list[str]:
    """What local cluster `cid` still has on the machine: its netns, cgroup dir, pinned BPF dir."""
    out = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    out += [f"netns {ln.split()[0]}" for ln in netns.splitlines() if ln.startswith(f"ambit-{cid}")]
    if (Path(cgroup_root) / f"ambit-{cid}").exists():
        out.append(f"cgroup {cgroup_root}/ambit-{cid}")
    if Path(f"/sys/fs/bpf/ambit/{cid}").exists():
        out.append(f"bpf /sys/fs/bpf/ambit/{cid}")
    return out


@dataclass
class Result:
    reply: str
    error: str | None
    errno: str | None
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.reply.startswith("peer=")

    @property
    def peer(self) -> str | None:
        return self.reply.split()[0].removeprefix("peer=") if self.ok else None


@dataclass
class Cluster:
    state: Path
    tmp: Path
    root_before: tuple[str, str] = ("", "")

    @property
    def plan(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state / "cluster.json").read_text())
        return data

    @property
    def cid(self) -> str:
        return str(self.plan["cid"])

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.plan["nodes"] if n["name"] == name)

    def local(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return ambit("local", *args, "--state-dir", str(self.state), check=check, timeout=timeout)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ambit(*args, "--state-dir", str(self.state), check=check)

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def apply(self, objs: Iterable[dict[str, Any]], name: str = "apply.yaml") -> str:
        return self.local("apply", "-f", str(write_manifest(self.tmp / name, objs))).stdout

    def pods(self) -> dict[str, dict[str, Any]]:
        items = json.loads(self.local("get", "pods", "-o", "json").stdout)["items"]
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in items}

    def ip(self, key: str) -> str:
        return str(self.pods()[key]["status"]["podIP"])

    def exec(self, key: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return ambit("local", "exec", key, "--state-dir", str(self.state), "--", *cmd, check=False, timeout=timeout)

    def talk(self, src: str, ip: str, port: int, marker: str, timeout: float = 3.0) -> Result:
        r = self.exec(src, "python3", "-c", CLIENT, ip, str(port), marker, str(timeout), timeout=timeout + 30)
        if r.returncode != 0:
            raise AssertionError(f"client in {src} crashed: {r.stderr}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        return Result(d["reply"], d["error"], d["errno"], d["elapsed"])

    def pid(self, unit_file: str) -> int | None:
        """A pid file of the cluster (`pid starttime`), if its process is still that process."""
        try:
            pid_s, start = (self.state / "pids" / unit_file).read_text().split()[:2]
            pid = int(pid_s)
        except (OSError, ValueError):
            return None
        return pid if same_process_runs(pid, start) else None

    def access_log(self, node: str) -> list[dict[str, Any]]:
        """The JSON access-log lines of a node's ztunnel (the log also has plain text lines)."""
        out = []
        for line in (self.state / "nodes" / node / "ztunnel.log").read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line being written right now
        return out

    def records(self, node: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.access_log(node) if all(r.get(k) == v for k, v in match.items())]


class Capture:
    """tcpdump on the fabric bridge (in the cluster's fabric netns), written to a pcap file."""

    def __init__(self, cluster: Cluster, path: Path) -> None:
        netns = cluster.plan["fabric_netns"]
        links = subprocess.run(["ip", "netns", "exec", netns, "ip", "-br", "link"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        # the bridge: the one link that is neither loopback nor a veth end (name@ifN)
        names = [ln.split()[0] for ln in links if ln.strip()]
        bridges = [n for n in names if n != "lo" and "@" not in n]
        assert len(bridges) == 1, f"cannot tell the fabric bridge in {netns} from {names}"
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-U", "-n", "-i", bridges[0], "-w", str(path), "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        # tcpdump says "listening on ..." once the capture is live
        line = self.proc.stderr.readline().decode(errors="replace")
        assert "listening on" in line, f"tcpdump did not start: {line}"

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path.read_bytes() if self.path.exists() else b""
