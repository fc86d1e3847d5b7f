"""The benchmark's network: two nodes and their pods as network namespaces, made and removed here.

```
 node A (netns)                                   node B (netns)
   10.B.0.1 ------------- veth, MTU 1500 ----------- 10.B.0.2
   10.B.1.1 (gateway on every pod veth)              10.B.2.1 (likewise)
   |  |  |  |  |                                     |  |  |  |
  cli clt clp srva gw   pods 10.B.1.n/32            srv srw srp wp    pods 10.B.2.n/32
```

Every pod is a network namespace with one veth to its node (MTU 1500, a /32
address and a default route via the node, as Calico lays pods out) and a
cgroup v2 of its own; every proxy process runs in a cgroup of its own too, so
its CPU time is read from `cpu.stat` and its memory from its processes' PSS.
ambit's eBPF programs are loaded per node (agent/bpf.py `Datapath`, pinned maps
of their own) and attached as the agent would: pod programs on enrolled pods'
cgroups, the SO_ORIGINAL_DST program on the ztunnel's, TC on the node's
interfaces. Nothing is added to the machine's own network namespace.
`Topology.destroy()` removes every namespace, cgroup and pin, also after a
failure half-way through `create()`.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NOFILE = 65536  # processes of the benchmark hold thousands of idle connections (or the hard limit)


class TopologyError(RuntimeError):
    """Making the benchmark's namespaces, links, cgroups or eBPF programs failed."""


@dataclass(frozen=True)
class PodSpec:
    name: str  # short: it is part of interface names
    node: str  # "a" or "b"
    index: int  # last byte of its address
    kernel_enrolled: bool = False  # ambit's eBPF programs redirect it


# The pods (see the module docstring): which variant uses which is in bench/variants.py.
PODS: tuple[PodSpec, ...] = (
    PodSpec("cli", "a", 2, kernel_enrolled=True),  # ambit client: eBPF redirect
    PodSpec("clt", "a", 3),  # ambit client through iptables REDIRECT instead
    PodSpec("clp", "a", 4),  # plain client: direct and HAProxy
    PodSpec("srva", "a", 5, kernel_enrolled=True),  # server on node A (same-node)
    PodSpec("srv", "b", 2, kernel_enrolled=True),  # server behind ztunnel B
    PodSpec("srw", "b", 3, kernel_enrolled=True),  # server that uses the waypoint
    PodSpec("srp", "b", 4),  # plain server: direct and HAProxy
    PodSpec("wp", "b", 5),  # the waypoint's pod (waypoints are not enrolled)
    PodSpec("gw", "a", 6),  # the ingress gateway's pod (the edge: not enrolled either)
)


def sh(*args: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise TopologyError(f"{' '.join(args)}: {r.stderr.strip() or r.returncode}")


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        parts = line.split()
        sep = parts.index("-")
        if parts[sep + 1] == "cgroup2":
            return Path(parts[4])
    raise TopologyError("no cgroup v2 mount: the benchmark needs cgroup v2 (as ambit's eBPF does)")


@dataclass
class Proc:
    """A process started in a namespace and cgroup; stopped by pid (its process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    cgroup: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


@dataclass
class Topology:
    """Namespaces, links, cgroups and the two nodes' datapaths of one benchmark run."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    net: int = 0  # second byte of every address: 10.<net>.x.y
    workdir: Path = Path("/tmp")
    made_netns: list[str] = field(default_factory=list)
    made_cgroups: list[Path] = field(default_factory=list)
    pins: list[Path] = field(default_factory=list)
    datapaths: dict[str, Any] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.net:
            self.net = 150 + int(self.tag[:2], 16) % 50

    # -- names and addresses

    def netns(self, who: str) -> str:
        return f"abench-{self.tag}-{who}"

    def node_ip(self, node: str) -> str:
        return f"10.{self.net}.0.{1 if node == 'a' else 2}"

    def gateway(self, node: str) -> str:
        """The node's address on every pod veth: the pods' default route, and where its
        ztunnel's outbound and inbound-plaintext listeners are."""
        return f"10.{self.net}.{1 if node == 'a' else 2}.1"

    def pod(self, name: str) -> PodSpec:
        for p in PODS:
            if p.name == name:
                return p
        raise KeyError(name)

    def pod_ip(self, name: str) -> str:
        p = self.pod(name)
        return f"10.{self.net}.{1 if p.node == 'a' else 2}.{p.index}"

    def host_veth(self, pod: str) -> str:
        return f"ab{self.tag}{pod}"[:15]

    @property
    def cgroup_base(self) -> Path:
        return cgroup2_root() / f"abench-{self.tag}"

    def cgroup(self, who: str) -> Path:
        return self.cgroup_base / who

    # -- lifecycle

    def create(self) -> None:
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise

    def _create(self) -> None:
        base = self.cgroup_base
        base.mkdir()
        self.made_cgroups.append(base)
        for node in ("a", "b"):
            self._add_netns(self.netns(f"n{node}"))
        na, nb = self.netns("na"), self.netns("nb")
        fab_a, fab_b = f"ab{self.tag}fa", f"ab{self.tag}fb"
        sh("ip", "link", "add", fab_a, "netns", na, "mtu", "1500", "type", "veth",
           "peer", fab_b, "netns", nb, "mtu", "1500")
        for node, ns, ifname, other in (("a", na, fab_a, "b"), ("b", nb, fab_b, "a")):
            sh("ip", "-n", ns, "addr", "add", f"{self.node_ip(node)}/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            other_pods = f"10.{self.net}.{1 if other == 'a' else 2}.0/24"
            sh("ip", "-n", ns, "route", "add", other_pods, "via", self.node_ip(other))
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for p in PODS:
            ns = self._add_netns(self.netns(p.name))
            node_ns = self.netns(f"n{p.node}")
            host = self.host_veth(p.name)
            sh("ip", "link", "add", host, "netns", node_ns, "mtu", "1500", "type", "veth",
               "peer", "eth0", "netns", ns, "mtu", "1500")
            gw, ip = self.gateway(p.node), self.pod_ip(p.name)
            sh("ip", "-n", node_ns, "addr", "add", f"{gw}/32", "dev", host)
            sh("ip", "-n", node_ns, "link", "set", host, "up")
            sh("ip", "-n", node_ns, "route", "add", f"{ip}/32", "dev", host)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", f"{gw}/32", "dev", "eth0")
            sh("ip", "-n", ns, "route", "add", "default", "via", gw, "dev", "eth0")
            self._add_cgroup(p.name)

    def _add_netns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.made_netns.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _add_cgroup(self, who: str) -> Path:
        cg = self.cgroup(who)
        cg.mkdir()
        self.made_cgroups.append(cg)
        return cg

    def load_datapaths(self, ztunnel_cgroups: dict[str, Path]) -> None:
        """ambit's eBPF on both nodes, as each node's agent would set it up."""
        from agent.bpf import Datapath

        for node in ("a", "b"):
            pin = Path("/sys/fs/bpf") / f"abench-{self.tag}-{node}"
            self.pins.append(pin)
            dp = Datapath(pin)
            self.datapaths[node] = dp
            gw = self.gateway(node)
            dp.set_config((gw, 15001), (gw, 15006))
            dp.set_ztunnel_addresses([gw, self.node_ip(node)])
            dp.attach_ztunnel(ztunnel_cgroups[node])
            netns_path = Path("/run/netns") / self.netns(f"n{node}")
            dp.attach_interface(f"ab{self.tag}f{node}", netns_path)
            for p in PODS:
                if p.node != node:
                    continue
                dp.attach_interface(self.host_veth(p.name), netns_path)
                if p.kernel_enrolled:
                    dp.attach_pod(self.cgroup(p.name))
                    dp.set_pod(self.cgroup(p.name), self.pod_ip(p.name), enrolled=True, mode="STRICT")

    def iptables_redirect(self, pod: str, to_port: int) -> None:
        """Istio's classic capture for one pod: nat PREROUTING REDIRECT of its TCP on its node."""
        node_ns = self.netns(f"n{self.pod(pod).node}")
        sh("ip", "netns", "exec", node_ns, "iptables", "-w", "-t", "nat", "-A", "PREROUTING",
           "-i", self.host_veth(pod), "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(to_port))

    def spawn(self, name: str, where: str, argv: Sequence[str], *, cgroup: str | None = None,
              stdin: int | None = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
              env: dict[str, str] | None = None) -> Proc:
        """Run argv in netns `where` (a pod name, or "na"/"nb"), in cgroup `cgroup` (made if new)."""
        cg_name = cgroup or name
        cg = self.cgroup(cg_name)
        if not cg.exists():
            self._add_cgroup(cg_name)

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)

        def enter() -> None:
            os.setpgid(0, 0)
            (cg / "cgroup.procs").write_text(str(os.getpid()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        log = (self.workdir / f"{name}.log").open("ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.netns(where), *argv], stdin=stdin,
                             stdout=stdout if stdout is not None else log,
                             stderr=stderr if stderr is not None else log,
                             preexec_fn=enter, env=env)
        log.close()
        proc = Proc(name, p, cg)
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop()
        self.procs.clear()
        for dp in self.datapaths.values():
            with contextlib.suppress(Exception):
                dp.close()
        self.datapaths.clear()
        for ns in reversed(self.made_netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made_netns.clear()
        for cg in reversed(self.made_cgroups):
            _remove_cgroup(cg)
        self.made_cgroups.clear()
        from agent.bpf import remove_pins

        for pin in self.pins:
            remove_pins(pin)
        self.pins.clear()

    def leftovers(self) -> list[str]:
        """What of this run is still on the machine (empty after destroy())."""
        out = [ns for ns in os.listdir("/run/netns") if ns.startswith(f"abench-{self.tag}-")] \
            if os.path.isdir("/run/netns") else []
        if self.cgroup_base.exists():
            out.append(str(self.cgroup_base))
        out += [str(p) for p in Path("/sys/fs/bpf").glob(f"abench-{self.tag}-*")]
        return out


def sweep_stale(tags: Collection[str] | None = None, min_age: float = 120.0) -> list[str]:
    """Remove what killed runs left on the machine (their namespaces, cgroups and pinned maps:
    a run killed by a signal it cannot catch never reaches destroy()). A run is over when
    no process is left in its cgroup or its namespaces and its namespaces are older than
    `min_age` seconds (a run still making its topology has no process yet); a live one is
    left alone. `tags`: only these runs. Returns what was removed."""
    from agent.bpf import remove_pins

    netns = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    cg_root = cgroup2_root()
    pins = sorted(Path("/sys/fs/bpf").glob("abench-*"))
    found = {m.group(1) for name in netns if (m := re.fullmatch(r"abench-([0-9a-f]{6})-.+", name))}
    found |= {m.group(1) for p in cg_root.glob("abench-*") if (m := re.fullmatch(r"abench-([0-9a-f]{6})", p.name))}
    found |= {m.group(1) for p in pins if (m := re.fullmatch(r"abench-([0-9a-f]{6})-.+", p.name))}
    removed: list[str] = []
    now = time.time()
    for tag in sorted(found if tags is None else found & set(tags)):
        names = [n for n in netns if n.startswith(f"abench-{tag}-")]
        cg = cg_root / f"abench-{tag}"
        made = [Path("/run/netns", n) for n in names] + ([cg] if cg.exists() else [])
        if any(now - _mtime(m) < min_age for m in made):
            continue
        if _cgroup_has_procs(cg) or any(_netns_has_pids(n) for n in names):
            continue
        for n in names:
            if subprocess.run(["ip", "netns", "del", n], capture_output=True).returncode == 0:
                removed.append(f"netns {n}")
        if cg.exists():
            for sub in sorted((d for d in cg.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
                _remove_cgroup(sub)
            _remove_cgroup(cg)
            removed.append(f"cgroup {cg}")
        for pin in pins:
            if pin.name.startswith(f"abench-{tag}-"):
                remove_pins(pin)
                removed.append(f"pins {pin}")
    return removed


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _cgroup_has_procs(cg: Path) -> bool:
    if not cg.is_dir():
        return False
    for procs in cg.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            if procs.read_text().strip():
                return True
    return False


def _netns_has_pids(name: str) -> bool:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return r.returncode != 0 or bool(r.stdout.strip())  # unreadable: taken as in use


def _remove_cgroup(cg: Path, timeout: float = 5.0) -> None:
    """Kill what is left in the cgroup (by pid), then remove it."""
    if not cg.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
        with contextlib.suppress(OSError):
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)


# -- accounting


def cgroup_cpu_s(cg: Path) -> float:
    """CPU seconds (user + system) used by every process of the cgroup so far."""
    for line in (cg / "cpu.stat").read_text().splitlines():
        k, v = line.split()
        if k == "usage_usec":
            return int(v) / 1e6
    raise TopologyError(f"{cg}/cpu.stat has no usage_usec")


def cgroup_pids(cg: Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def pss_kib(pids: Sequence[int]) -> int:
    """Proportional set size of the processes (their shared pages split among the sharers)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


def wait_until(check: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise TopologyError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}")
        if check():
            return
        time.sleep(0.1)
    raise TopologyError(f"timed out after {timeout:g}s waiting for {what}")


@contextlib.contextmanager
def topology(workdir: Path) -> Iterator[Topology]:
    t = Topology(workdir=workdir)
    t.create()
    try:
        yield t
    finally:
        t.destroy()
