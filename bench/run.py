"""The benchmark harness: ambit's data path against real alternatives, on loopback.

Topologies (each carries the same traffic from one client to one echo/sink server):
- direct:  client -> server (the floor: what the kernel and the Python client cost)
- stunnel: client -> stunnel (client, mTLS) -> stunnel (server) -> server; a C/OpenSSL TLS tunnel
- ambit:   client -> ztunnel A -> HBONE (HTTP/2 CONNECT in mTLS) -> ztunnel B -> server

Measured per topology: bulk throughput of one connection, new connections per
second (connect, one round trip, close), round-trip latency of small messages on
one connection (p50/p99), and the resident memory of the proxy processes. Plus
the sans-IO HBONE layer alone, in memory. Writes bench/results/latest.json and
a Markdown table (bench/results/latest.md) that the README quotes.

Run with `make bench` (or `python -m bench.run --quick`). Numbers are for this
machine (2 cores); compare rows, not machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

Connect = Callable[[], socket.socket]


# ---------------------------------------------------------------------------
# the server side: a sink/echo server in its own thread


class EchoServer:
    """A threaded TCP server: echoes small messages; for bulk, counts bytes and acks at EOF."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.addr = self.sock.getsockname()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, name="bench-echo", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(256 * 1024)
        total = 0
        try:
            mode = c.recv(1)
            if mode == b"E":  # echo until EOF
                while True:
                    n = c.recv_into(buf)
                    if not n:
                        break
                    c.sendall(memoryview(buf)[:n])
            elif mode == b"S":  # sink until EOF, then report the count
                while True:
                    n = c.recv_into(buf)
                    if not n:
                        break
                    total += n
                c.sendall(struct.pack("!Q", total))
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


# ---------------------------------------------------------------------------
# measurements


def bulk_mbps(connect: Connect, megabytes: int) -> float:
    chunk = b"\xab" * (256 * 1024)
    total = megabytes * 1024 * 1024
    s = connect()
    try:
        start = time.perf_counter()
        s.sendall(b"S")
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        got = _recv_exact(s, 8)
        elapsed = time.perf_counter() - start
    finally:
        s.close()
    (count,) = struct.unpack("!Q", got)
    if count != sent:
        raise RuntimeError(f"bulk transfer lost bytes: sent {sent}, the server counted {count}")
    return sent / elapsed / 1e6


def connection_rate(connect: Connect, seconds: float, concurrency: int) -> float:
    deadline = time.perf_counter() + seconds
    counts = [0] * concurrency
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            while time.perf_counter() < deadline:
                s = connect()
                try:
                    s.sendall(b"Eping")
                    _recv_exact(s, 4)
                finally:
                    s.close()
                counts[i] += 1
        except BaseException as e:
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"connection-rate run failed: {errors[0]!r}")
    return sum(counts) / (time.perf_counter() - start)


def latency_us(connect: Connect, rounds: int) -> tuple[float, float]:
    s = connect()
    samples = []
    try:
        s.sendall(b"E")
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.sendall(b"x" * 64)
            _recv_exact(s, 64)
            samples.append((time.perf_counter() - t0) * 1e6)
    finally:
        s.close()
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise ConnectionError(f"peer closed after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


# ---------------------------------------------------------------------------
# topologies


@dataclass
class Topology:
    name: str
    connect: Connect
    pids: list[int] = field(default_factory=list)
    note: str = ""


def _tcp(addr: tuple[str, int]) -> Connect:
    def connect() -> socket.socket:
        s = socket.create_connection(addr, timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    return connect


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every process, then SIGKILL whichever has not exited after `grace` seconds."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def direct(server: EchoServer) -> Iterator[Topology]:
    yield Topology("direct TCP (no proxy)", _tcp(server.addr))


@contextlib.contextmanager
def stunnel(server: EchoServer, workdir: Path) -> Iterator[Topology]:
    """Two stunnel processes with mutual TLS 1.3 (ECDSA P-256), the classic C tunnel."""
    exe = shutil.which("stunnel4") or shutil.which("stunnel")
    if exe is None:
        raise RuntimeError("stunnel is not installed (make bench installs it: apt-get install stunnel4)")
    from bench.certs import write_pair  # certificates made with `cryptography`, like the CA's

    paths = write_pair(workdir)
    front, back = free_port(), free_port()
    common = "foreground = yes\npid =\nsslVersion = TLSv1.3\ndebug = 3\n"
    (workdir / "server.conf").write_text(
        common + f"[s]\naccept = 127.0.0.1:{back}\nconnect = {server.addr[0]}:{server.addr[1]}\n"
        f"cert = {paths['server_cert']}\nkey = {paths['server_key']}\nCAfile = {paths['ca']}\nverifyChain = yes\n"
    )
    (workdir / "client.conf").write_text(
        common + f"[c]\nclient = yes\naccept = 127.0.0.1:{front}\nconnect = 127.0.0.1:{back}\n"
        f"cert = {paths['client_cert']}\nkey = {paths['client_key']}\nCAfile = {paths['ca']}\nverifyChain = yes\n"
    )
    procs = [
        subprocess.Popen([exe, str(workdir / n)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in ("server.conf", "client.conf")
    ]
    try:
        _wait_port(back)
        _wait_port(front)
        yield Topology("stunnel mTLS pair (C, OpenSSL)", _tcp(("127.0.0.1", front)), [p.pid for p in procs])
    finally:
        stop_processes(procs, 5)


@contextlib.contextmanager
def ambit(workdir: Path) -> Iterator[Topology]:
    """Its own echo server, bound to the server pod's address the ztunnels route to."""
    from bench.ambitpair import ztunnel_pair

    with ztunnel_pair(workdir) as (connect, pids):
        yield Topology("ambit ztunnel pair (HBONE)", connect, pids)


# ---------------------------------------------------------------------------


@dataclass
class Row:
    topology: str
    throughput_mbps: float
    conns_per_s: float
    latency_p50_us: float
    latency_p99_us: float
    proxy_rss_mib: float
    error: str = ""


def measure(topo: Topology, quick: bool) -> Row:
    mb = 64 if quick else 256
    bulk = max(bulk_mbps(topo.connect, mb) for _ in range(2))
    rate = connection_rate(topo.connect, 2.0 if quick else 5.0, concurrency=8)
    p50, p99 = latency_us(topo.connect, 1000 if quick else 5000)
    rss = rss_kib(topo.pids) / 1024
    return Row(topo.name, bulk, rate, p50, p99, rss)


def hbone_in_memory(quick: bool) -> float | None:
    try:
        from ztunnel.hbone.bench import throughput
    except ImportError:
        return None
    return float(throughput(64 if quick else 256))


def to_markdown(rows: list[Row], hbone_mbps: float | None, meta: dict[str, str]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']} with `make bench` (loopback, one client).",
        "",
        "| topology | throughput (MB/s, 1 conn) | new conns/s (8 clients) | RTT p50 (µs) | RTT p99 (µs) | proxy RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.topology} | failed: {r.error} | | | | |")
            continue
        rss = f"{r.proxy_rss_mib:.0f}" if r.proxy_rss_mib else "-"
        lines.append(
            f"| {r.topology} | {r.throughput_mbps:.0f} | {r.conns_per_s:.0f} | {r.latency_p50_us:.0f} "
            f"| {r.latency_p99_us:.0f} | {rss} |"
        )
    if hbone_mbps is not None:
        lines += ["", f"HBONE framing alone (sans-IO client+server in memory, no TLS): {hbone_mbps:.0f} MB/s."]
    return "\n".join(lines) + "\n"


def _topology(name: str, server: EchoServer, workdir: Path) -> contextlib.AbstractContextManager[Topology]:
    if name == "direct":
        return direct(server)
    if name == "stunnel":
        return stunnel(server, workdir)
    return ambit(workdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (for a smoke check)")
    ap.add_argument("--only", choices=("direct", "stunnel", "ambit"), action="append",
                    help="run only these topologies")
    args = ap.parse_args(argv)
    chosen = args.only or ["direct", "stunnel", "ambit"]
    rows: list[Row] = []
    server = EchoServer()
    try:
        for name in chosen:
            with tempfile.TemporaryDirectory(prefix=f"ambit-bench-{name}-") as tmp:
                try:
                    with _topology(name, server, Path(tmp)) as topo:
                        print(f"bench: {topo.name} ...", file=sys.stderr, flush=True)
                        rows.append(measure(topo, args.quick))
                except Exception as e:  # one topology failing must not hide the others
                    print(f"bench: {name} failed: {e}", file=sys.stderr)
                    rows.append(Row(name, 0, 0, 0, 0, 0, error=str(e)[:200]))
    finally:
        server.close()
    hb = hbone_in_memory(args.quick)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "hbone_in_memory_mbps": hb}, indent=2) + "\n"
    )
    md = to_markdown(rows, hb, meta)
    (RESULTS / "latest.md").write_text(md)
    print(md)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
