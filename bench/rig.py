"""The processes of a benchmark run, on the topology of bench/topology.py.

`Rig` starts what the chosen variants need, each thing once: the servers in the
server pods, a load generator in each client pod, ambit's CA, the two
ztunnels (`ambit ztunnel run`, one per node netns) and the eBPF datapaths, the
waypoint (`ambit waypoint run` in its pod), the ingress gateway (`ambit gateway
run` in its pod, with bench/edge.py's objects), the iptables REDIRECT, and the
HAProxy instances. Every proxy runs in a cgroup of its own (its CPU time and
its processes' PSS are what a variant costs). `close()` stops everything by pid.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import edge, haproxy
from bench.topology import PODS, Proc, Topology, TopologyError, wait_until

SERVER_PORT = 8080
AMBIT = [sys.executable, "-m", "agent.cli"]
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"


class LoadClient:
    """The load generator in a client pod (bench/load.py `client`), one JSON command at a time."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def run(self, op: str, **args: Any) -> dict[str, Any]:
        p = self.proc.popen
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise TopologyError(f"the load generator in {self.proc.name} exited "
                                f"(see {self.proc.name}.log in the work directory)")
        out: dict[str, Any] = json.loads(line)
        if not out.pop("ok"):
            raise TopologyError(f"{self.proc.name}: {out['error']}")
        return out


@dataclass
class Rig:
    topo: Topology
    workdir: Path
    started: set[str] = field(default_factory=set)
    clients: dict[str, LoadClient] = field(default_factory=dict)

    def once(self, what: str, start: Callable[[], None]) -> None:
        if what not in self.started:
            start()
            self.started.add(what)

    # -- the pods' own processes

    def server(self, pod: str) -> tuple[str, int]:
        def start() -> None:
            ip = self.topo.pod_ip(pod)
            p = self.topo.spawn(f"server-{pod}", pod, [sys.executable, "-m", "bench.load", "server", ip,
                                                       str(SERVER_PORT)],
                                cgroup=pod, stdout=subprocess.PIPE)
            assert p.popen.stdout is not None
            if p.popen.stdout.readline().strip() != b"ready":
                raise TopologyError(f"the server in pod {pod} did not start (see server-{pod}.log)")

        self.once(f"server-{pod}", start)
        return self.topo.pod_ip(pod), SERVER_PORT

    def client(self, pod: str) -> LoadClient:
        if pod not in self.clients:
            p = self.topo.spawn(f"client-{pod}", pod, [sys.executable, "-m", "bench.load", "client"],
                                cgroup=pod, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.clients[pod] = LoadClient(p)
        return self.clients[pod]

    # -- ambit

    @property
    def cluster_dir(self) -> Path:
        return self.workdir / "cluster"

    def ca_material(self) -> Any:
        from controlplane.pki import CaMaterial

        return CaMaterial.load(self.workdir / "ca", TRUST_DOMAIN)

    def pki(self) -> None:
        def start() -> None:
            from controlplane.pki import CaMaterial, write_node_credential

            material = CaMaterial.generate(TRUST_DOMAIN)
            material.write(self.workdir / "ca")
            for node in ("a", "b"):
                write_node_credential(material, f"node-{node}", self.workdir / "cred" / node)

        self.once("pki", start)

    def ca(self) -> None:
        def start() -> None:
            self.pki()
            self.cluster_dir.mkdir(exist_ok=True)
            (self.cluster_dir / "bench.yaml").write_text(cluster_yaml(self.topo))
            addr = self.topo.node_ip("a")
            p = self.topo.spawn("ca", "na", [*AMBIT, "ca", "run", "--dir", str(self.workdir / "ca"),
                                             "--cluster", f"local:{self.cluster_dir}",
                                             "--listen", f"{addr}:15012",
                                             "--audit-log", str(self.workdir / "ca-audit.log")])
            wait_until(lambda: _listening("na", addr, 15012, self.topo), 30, "the CA to listen", [p])

        self.once("ca", start)

    def ztunnels(self) -> None:
        """Both nodes' ztunnels and eBPF datapaths (the agent's part, done here without an agent)."""
        def start() -> None:
            self.ca()
            procs = []
            for node in ("a", "b"):
                ip, gw = self.topo.node_ip(node), self.topo.gateway(node)
                procs.append(self.topo.spawn(f"ztunnel-{node}", f"n{node}", [
                    *AMBIT, "ztunnel", "run", "--node", f"node-{node}",
                    "--cluster", f"local:{self.cluster_dir}", "--ca", f"{self.topo.node_ip('a')}:15012",
                    "--credential-dir", str(self.workdir / "cred" / node),
                    "--admin", "127.0.0.1:15000", "--readiness", f"{ip}:15021", "--metrics", f"{ip}:15020",
                    "--hbone", f"{ip}:15008", "--outbound", f"{gw}:15001",
                    "--inbound-plaintext", f"{gw}:15006",
                    "--access-log", str(self.workdir / f"access-{node}.log"),
                ], cgroup=f"zt{node}"))
            self.topo.load_datapaths({n: self.topo.cgroup(f"zt{n}") for n in ("a", "b")})
            for node in ("a", "b"):
                ip = self.topo.node_ip(node)
                wait_until(lambda ip=ip, node=node: _http_ok(self.topo, f"n{node}", ip, 15021, "/healthz/ready"),  # type: ignore[misc]
                           60, f"ztunnel {node} to be ready", procs)

        self.once("ztunnels", start)

    def iptables(self) -> None:
        def start() -> None:
            if shutil.which("iptables") is None:
                raise TopologyError("iptables is not installed (make bench installs it: apt-get install iptables)")
            self.ztunnels()
            self.topo.iptables_redirect("clt", 15001)

        self.once("iptables", start)

    def waypoint(self) -> None:
        def start() -> None:
            self.ztunnels()
            ip = self.topo.pod_ip("wp")
            p = self.topo.spawn("waypoint", "wp", [
                *AMBIT, "waypoint", "run", "--gateway", f"{NAMESPACE}/wp", "--node", "node-b",
                "--cluster", f"local:{self.cluster_dir}", "--ca", f"{self.topo.node_ip('a')}:15012",
                "--credential-dir", str(self.workdir / "cred" / "b"), "--listen", f"{ip}:15008",
                "--metrics", f"{ip}:15020", "--readiness", f"{ip}:15021", "--admin", "127.0.0.1:15000",
                "--access-log", str(self.workdir / "access-waypoint.log"),
                "--state-dir", str(self.workdir / "waypoint-state"),
            ], cgroup="wpx")
            wait_until(lambda: _http_ok(self.topo, "wp", ip, 15021, "/healthz/ready"), 60, "the waypoint to be ready", [p])

        self.once("waypoint", start)

    def edge_tls(self) -> dict[str, Path]:
        """The certificate both ingress rows serve for edge.HOSTNAME (bench/edge.py)."""
        def start() -> None:
            edge.write_tls(self.workdir / "edge")

        self.once("edge-tls", start)
        return edge.tls_paths(self.workdir / "edge")

    def edge_client(self) -> dict[str, str]:
        """How the load generator speaks HTTPS to either ingress row (load.py's `tls`)."""
        return {"server_name": edge.HOSTNAME, "ca": str(self.edge_tls()["ca"]),
                "cipher": haproxy.CIPHERSUITE}

    def gateway(self) -> tuple[str, int]:
        """The ingress gateway in its pod on node A: HTTPS from outside, HBONE to ztunnel B."""
        def start() -> None:
            self.ztunnels()
            self.server("srv")
            ip = self.topo.pod_ip("gw")
            objects = edge.cluster_yaml(self.edge_tls(), gateway_ip=ip, server_ns=NAMESPACE, server="srv",
                                        server_port=SERVER_PORT)
            tmp = self.cluster_dir / "gateway.tmp"  # not a *.yaml: the source never reads half a file
            tmp.write_text(objects)
            tmp.replace(self.cluster_dir / "gateway.yaml")
            p = self.topo.spawn("gateway", "gw", [
                *AMBIT, "gateway", "run", "--gateway", f"{edge.NAMESPACE}/{edge.GATEWAY}", "--node", "node-a",
                "--cluster", f"local:{self.cluster_dir}", "--ca", f"{self.topo.node_ip('a')}:15012",
                "--credential-dir", str(self.workdir / "cred" / "a"), "--bind", ip,
                "--metrics", f"{ip}:15020", "--readiness", f"{ip}:15021", "--admin", "127.0.0.1:15000",
                "--access-log", str(self.workdir / "access-gateway.log"),
                "--state-dir", str(self.workdir / "gateway-state"),
            ], cgroup="gwx")
            wait_until(lambda: _http_ok(self.topo, "gw", ip, 15021, "/healthz/ready"), 60,
                       "the ingress gateway to be ready", [p])

        self.once("gateway", start)
        return self.topo.pod_ip("gw"), edge.PORT

    # -- HAProxy

    def haproxy_certs(self) -> dict[str, Path]:
        def start() -> None:
            self.pki()
            haproxy.write_certs(self.ca_material(), self.workdir / "haproxy")

        self.once("haproxy-certs", start)
        return haproxy.cert_paths(self.workdir / "haproxy")

    def haproxy_tcp(self, name: str, port: int, threads: int | None) -> tuple[str, int]:
        """A two-hop mTLS TCP tunnel: node A (plain in, TLS out) -> node B (TLS in, plain out)."""
        def start() -> None:
            certs = self.haproxy_certs()
            server = self.server("srp")
            front = (self.topo.gateway("a"), port)
            middle = (self.topo.node_ip("b"), port)
            procs = [
                self._haproxy(f"{name}-b", "nb", haproxy.tls_in(middle, server, certs, threads)),
                self._haproxy(f"{name}-a", "na", haproxy.tls_out(front, middle, certs, threads)),
            ]
            for ns, addr in (("nb", middle), ("na", front)):
                wait_until(lambda ns=ns, addr=addr: _listening(ns, addr[0], addr[1], self.topo),  # type: ignore[misc]
                           15, f"{name} to listen on {addr}", procs)

        self.once(name, start)
        return self.topo.gateway("a"), port

    def haproxy_http(self, name: str, port: int) -> tuple[str, int]:
        """HAProxy as the waypoint's counterpart: TCP mTLS out on node A, `mode http` with mTLS
        in and out in the waypoint's pod, TCP mTLS in on node B."""
        def start() -> None:
            certs = self.haproxy_certs()
            server = self.server("srp")
            front = (self.topo.gateway("a"), port)
            mid = (self.topo.pod_ip("wp"), port)
            back = (self.topo.node_ip("b"), port)
            procs = [
                self._haproxy(f"{name}-b", "nb", haproxy.tls_in(back, server, certs, 1)),
                self._haproxy(f"{name}-w", "wp", haproxy.http_tls(mid, back, certs, 1)),
                self._haproxy(f"{name}-a", "na", haproxy.tls_out(front, mid, certs, 1)),
            ]
            for ns, addr in (("nb", back), ("wp", mid), ("na", front)):
                wait_until(lambda ns=ns, addr=addr: _listening(ns, addr[0], addr[1], self.topo),  # type: ignore[misc]
                           15, f"{name} to listen on {addr}", procs)

        self.once(name, start)
        return self.topo.gateway("a"), port

    def haproxy_https(self, name: str, port: int) -> tuple[str, int]:
        """HAProxy as the ingress gateway's counterpart: `mode http` terminating the edge's TLS in
        the gateway's pod, mTLS to a TCP-mode HAProxy on node B, plain TCP to the server."""
        def start() -> None:
            certs = self.haproxy_certs()
            pem = self.edge_tls()["pem"]
            server = self.server("srp")
            front = (self.topo.pod_ip("gw"), port)
            back = (self.topo.node_ip("b"), port)
            procs = [
                self._haproxy(f"{name}-b", "nb", haproxy.tls_in(back, server, certs, 1)),
                self._haproxy(f"{name}-g", "gw", haproxy.https_edge(front, back, pem, certs, 1,
                                                                    edge.ALLOWED_CLIENTS)),
            ]
            for ns, addr in (("nb", back), ("gw", front)):
                wait_until(lambda ns=ns, addr=addr: _listening(ns, addr[0], addr[1], self.topo),  # type: ignore[misc]
                           15, f"{name} to listen on {addr}", procs)

        self.once(name, start)
        return self.topo.pod_ip("gw"), port

    def _haproxy(self, name: str, where: str, config: str) -> Proc:
        exe = shutil.which("haproxy")
        if exe is None:
            raise TopologyError("haproxy is not installed (make bench installs it: apt-get install haproxy)")
        path = self.workdir / "haproxy" / f"{name}.cfg"
        path.write_text(config)
        check = subprocess.run([exe, "-c", "-f", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise TopologyError(f"haproxy refused {path}: {check.stderr.strip() or check.stdout.strip()}")
        return self.topo.spawn(name, where, [exe, "-db", "-f", str(path)])

    # -- accounting

    def cgroup_of(self, proxy: str) -> Path:
        return self.topo.cgroup(proxy)

    def close(self) -> None:
        for c in self.clients.values():
            p = c.proc.popen
            if p.stdin is not None and p.poll() is None:
                try:
                    p.stdin.write(b'{"op": "exit"}\n')
                    p.stdin.flush()
                except OSError:
                    pass
        self.topo.destroy()


def _listening(ns: str, host: str, port: int, topo: Topology) -> bool:
    from agent.netns import connect_in

    try:
        connect_in(topo.netns(ns), host, port, 1.0).close()
        return True
    except OSError:
        return False


def _http_ok(topo: Topology, ns_short: str, host: str, port: int, path: str) -> bool:
    """An HTTP GET from inside a namespace answered 200 (readiness)."""
    from agent.netns import connect_in

    try:
        s = connect_in(topo.netns(ns_short), host, port, 2.0)
    except OSError:
        return False
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    except OSError:
        return False
    finally:
        s.close()
    return data.startswith(b"HTTP/1.1 200 ")


def cluster_yaml(topo: Topology) -> str:
    """The cluster state both ztunnels, the CA and the waypoint read (local:DIR source)."""
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, "
        "labels: {ambit.dev/dataplane-mode: ambient}}",
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: {NAMESPACE}, "
        "labels: {ambit.dev/waypoint-for: workload}}\n"
        "spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}",
    ]
    for node in ("a", "b"):
        docs.append(f"apiVersion: v1\nkind: Node\nmetadata: {{name: node-{node}}}\n"
                    f"status: {{addresses: [{{type: InternalIP, address: {topo.node_ip(node)}}}]}}")
    labels = {
        "srw": "app: srw, ambit.dev/use-waypoint: wp",
        "wp": "gateway.networking.k8s.io/gateway-name: wp, ambit.dev/dataplane-mode: none",
    }
    for p in PODS:
        if p.name in ("clp", "srp"):
            continue  # the plain pods are not in the mesh at all
        if p.name == "gw":
            continue  # the ingress gateway's pod is in its Gateway's namespace (bench/edge.py)
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {p.name}, namespace: {NAMESPACE}, "
            f"labels: {{{labels.get(p.name, f'app: {p.name}')}}}}}\n"
            f"spec: {{nodeName: node-{p.node}, serviceAccountName: {p.name}}}\n"
            f"status: {{podIP: {topo.pod_ip(p.name)}, phase: Running}}"
        )
    return "\n---\n".join(docs) + "\n"

