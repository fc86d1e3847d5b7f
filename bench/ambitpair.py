"""Two real ztunnel processes and a CA on loopback, for the benchmark.

Node A's ztunnel takes the client's connections on its SOCKS5 listener (the
loopback stand-in for the eBPF redirect, which needs root and namespaces),
carries them over HBONE to node B's ztunnel, which delivers them to the echo
server bound to the server pod's address. Everything runs as separate
`ambit` processes so their memory is measured like in production.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.run import EchoServer, free_port, stop_processes


def _free_prefix() -> str:
    for _ in range(50):
        prefix = f"127.{random.randint(20, 250)}.{random.randint(1, 250)}"
        try:
            for host in (f"{prefix}.11", f"{prefix}.12"):
                with socket.socket() as s:
                    s.bind((host, 15008))
            return prefix
        except OSError:
            continue
    raise RuntimeError("no free 127.x.y.0/24 for the benchmark")


def _cluster_yaml(prefix: str) -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {ambit.dev/dataplane-mode: ambient}}",
    ]
    for name, last in (("node-a", 11), ("node-b", 12)):
        docs.append(
            f"apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n"
            f"status: {{addresses: [{{type: InternalIP, address: {prefix}.{last}}}]}}"
        )
    for pod, node, last in (("client", "node-a", 101), ("server", "node-b", 102)):
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: bench, labels: {{app: {pod}}}}}\n"
            f"spec: {{nodeName: {node}, serviceAccountName: {pod}}}\n"
            f"status: {{podIP: {prefix}.{last}, phase: Running}}"
        )
    return "\n---\n".join(docs) + "\n"


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with {p.returncode} during startup")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {last}")


@contextlib.contextmanager
def ztunnel_pair(workdir: Path) -> Iterator[tuple[Callable[[], socket.socket], list[int]]]:
    """A CA and two ztunnels, and an echo server on the server pod's address; yields a
    SOCKS5 connect function for the client pod and the ztunnels' pids."""
    prefix = _free_prefix()
    server = EchoServer(f"{prefix}.102")
    ambit = [sys.executable, "-m", "agent.cli"]
    cluster = workdir / "cluster"
    cluster.mkdir()
    (cluster / "bench.yaml").write_text(_cluster_yaml(prefix))
    log = (workdir / "processes.log").open("wb")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([*ambit, "ca", "init", "--dir", str(workdir / "ca")], check=True, stdout=log, stderr=log)
        for node in ("node-a", "node-b"):
            subprocess.run(
                [*ambit, "ca", "node-credential", "--dir", str(workdir / "ca"), "--node", node,
                 "--out", str(workdir / "cred" / node)],
                check=True, stdout=log, stderr=log,
            )
        ca_port = free_port()
        procs.append(subprocess.Popen(
            [*ambit, "ca", "run", "--dir", str(workdir / "ca"), "--cluster", f"local:{cluster}",
             "--listen", f"127.0.0.1:{ca_port}", "--audit-log", str(workdir / "audit.log")],
            stdout=log, stderr=log,
        ))
        readiness = {}
        for node, last in (("node-a", 11), ("node-b", 12)):
            addr = f"{prefix}.{last}"
            readiness[node] = free_port()
            procs.append(subprocess.Popen(
                [*ambit, "ztunnel", "run", "--node", node, "--cluster", f"local:{cluster}",
                 "--ca", f"127.0.0.1:{ca_port}", "--credential-dir", str(workdir / "cred" / node),
                 "--admin", f"127.0.0.1:{free_port()}", "--readiness", f"127.0.0.1:{readiness[node]}",
                 "--metrics", f"{addr}:{free_port()}", "--outbound", f"{addr}:{free_port()}",
                 "--inbound-plaintext", f"{addr}:{free_port()}", "--socks5", f"{addr}:15080",
                 "--access-log", str(workdir / f"access-{node}.log")],
                stdout=log, stderr=log,
            ))
        for port in readiness.values():
            _wait_ready(f"http://127.0.0.1:{port}/healthz/ready", procs)

        socks = (f"{prefix}.11", 15080)
        dst = socket.inet_aton(server.addr[0]) + struct.pack("!H", server.addr[1])

        def connect() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(30)
            s.bind((f"{prefix}.101", 0))
            s.connect(socks)
            s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + dst)
            reply = b""
            while len(reply) < 12:
                chunk = s.recv(12 - len(reply))
                if not chunk:
                    raise ConnectionError("the ztunnel closed the SOCKS5 handshake")
                reply += chunk
            if reply[:2] != b"\x05\x00" or reply[3] != 0:
                s.close()
                raise ConnectionError(f"SOCKS5 refused: {reply!r}")
            return s

        yield connect, [p.pid for p in procs[1:]]
    finally:
        stop_processes(procs, 10)
        log.close()
        server.close()
