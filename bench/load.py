"""The benchmark's traffic: a server for the server pods and a load generator for the client pods.

`python -m bench.load server HOST PORT` serves, per connection, by its first byte:
  E  echo until EOF          S  sink until EOF, then the byte count (8 bytes)
  I  idle: answer "i", then hold the connection open until the peer closes it
  G  HTTP/1.1 keep-alive (`GET ...`): a small fixed response per request

`python -m bench.load client` reads one JSON command per line on stdin and writes
one JSON answer per line (see `Client`); it runs inside a client pod's network
namespace and cgroup, so ambit's eBPF programs redirect its connections like any
enrolled pod's. Plain blocking sockets and threads: the same client costs the
same in every variant, so differences between rows are the paths'. The HTTP ops
speak HTTPS when given `tls` (the ingress rows): TLS 1.3 only, SNI and Host the
certificate's name, ALPN http/1.1, the negotiated suite checked against the one
asked for; the handshake is made when the connection opens, outside every timing.
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

CHUNK = 256 * 1024
HTTP_BODY = b"hello from the bench server\n"
HTTP_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
                 + str(len(HTTP_BODY)).encode() + b"\r\n\r\n" + HTTP_BODY)


# ---------------------------------------------------------------------------
# server


class Server:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(4096)
        # idle connections wait in one epoll set, not in a thread each (thousands of them)
        self.idle = selectors.EpollSelector()
        threading.Thread(target=self._idle_loop, daemon=True).start()

    def serve_forever(self) -> None:
        while True:
            c, _ = self.sock.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            mode = c.recv(1)
            if mode == b"E":
                buf = bytearray(CHUNK)
                while n := c.recv_into(buf):
                    c.sendall(memoryview(buf)[:n])
            elif mode == b"S":
                buf = bytearray(CHUNK)
                total = 0
                while n := c.recv_into(buf):
                    total += n
                c.sendall(struct.pack("!Q", total))
            elif mode == b"I":
                c.sendall(b"i")
                c.setblocking(False)
                self.idle.register(c, selectors.EVENT_READ)  # epoll_ctl: safe from another thread
                return  # the idle loop owns it now
            elif mode == b"G":
                self._http(c, bytearray(b"G"))
        except OSError:
            pass
        c.close()

    @staticmethod
    def _http(c: socket.socket, buf: bytearray) -> None:
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                more = c.recv(65536)
                if not more:
                    return
                buf += more
                end = buf.find(b"\r\n\r\n")
            del buf[: end + 4]  # requests of the benchmark carry no body
            c.sendall(HTTP_RESPONSE)

    def _idle_loop(self) -> None:
        while True:
            for key, _ in self.idle.select(timeout=1.0):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.idle.unregister(s)
                    s.close()


# ---------------------------------------------------------------------------
# client


def _recv_exact(s: socket.socket, n: int, buf: bytearray | None = None) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            raise ConnectionError(f"peer closed after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


def _connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _tls_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _connect_http(host: str, port: int, tls: dict[str, str] | None,
                  ctx: ssl.SSLContext | None = None) -> socket.socket:
    """A connection for HTTP requests: plain, or (with `tls`: server_name, ca, cipher) HTTPS
    with the handshake done."""
    s = _connect(host, port)
    if tls is None:
        return s
    ctx = ctx or _tls_context(tls["ca"])
    try:
        t = ctx.wrap_socket(s, server_hostname=tls["server_name"])
    except BaseException:
        s.close()
        raise
    suite, version, _ = t.cipher() or ("", "", 0)
    if suite != tls["cipher"] or version != "TLSv1.3":
        t.close()
        raise ConnectionError(f"{host}:{port} negotiated {version} {suite}, not TLSv1.3 {tls['cipher']}: "
                              "the ingress rows must all use the same suite")
    return t


def percentile(sorted_samples: list[float], q: float) -> float:
    if not sorted_samples:
        return float("nan")
    i = min(len(sorted_samples) - 1, max(0, round(q * len(sorted_samples)) - 1))
    return sorted_samples[i]


def _summary_us(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {"p50": statistics.median(samples) * 1e6, "p99": percentile(samples, 0.99) * 1e6,
            "n": len(samples)}


class Client:
    """The load generator's commands (one method per op; arguments by name)."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []

    def tput(self, host: str, port: int, conns: int, seconds: float) -> dict[str, Any]:
        """`conns` connections each sending CHUNKs for `seconds`; bytes the server counted / time."""
        chunk = b"\xab" * CHUNK
        results: list[int] = [0] * conns
        errors: list[BaseException] = []
        socks = [_connect(host, port, 30) for _ in range(conns)]
        start = time.perf_counter()
        deadline = start + seconds

        def one(i: int, s: socket.socket) -> None:
            try:
                s.sendall(b"S")
                sent = 1
                while time.perf_counter() < deadline:
                    s.sendall(chunk)
                    sent += CHUNK
                s.shutdown(socket.SHUT_WR)
                (count,) = struct.unpack("!Q", _recv_exact(s, 8))
                if count != sent - 1:
                    raise RuntimeError(f"sent {sent - 1} bytes, the server counted {count}")
                results[i] = count
            except BaseException as e:
                errors.append(e)
            finally:
                s.close()

        threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise RuntimeError(f"throughput run failed: {errors[0]!r}")
        return {"bytes": sum(results), "seconds": elapsed}

    def rtt(self, host: str, port: int, size: int, count: int, rate: float = 0.0) -> dict[str, Any]:
        """Round trips of `size` bytes over one connection: back to back (rate 0) or paced."""
        msg = b"x" * size
        s = _connect(host, port)
        samples: list[float] = []
        try:
            s.sendall(b"E")
            for _ in range(20):  # warm the path (and the pool's connection)
                s.sendall(msg)
                _recv_exact(s, size)
            interval = 1.0 / rate if rate else 0.0
            next_at = time.perf_counter()
            for _ in range(count):
                if interval:
                    next_at += interval
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                t0 = time.perf_counter()
                s.sendall(msg)
                _recv_exact(s, size)
                samples.append(time.perf_counter() - t0)
        finally:
            s.close()
        return _summary_us(samples)

    def connect(self, host: str, port: int, count: int) -> dict[str, Any]:
        """Connect and the first byte back (one echo), one connection after another."""
        samples: list[float] = []
        for _ in range(count):
            t0 = time.perf_counter()
            s = _connect(host, port)
            try:
                s.sendall(b"Ex")
                _recv_exact(s, 1)
                samples.append(time.perf_counter() - t0)
            finally:
                s.close()
        return _summary_us(samples)

    def conns(self, host: str, port: int, seconds: float, concurrency: int) -> dict[str, Any]:
        """New connections per second: each of `concurrency` threads connects, echoes, closes."""
        return self._threads(seconds, concurrency, lambda: self._one_conn(host, port))

    @staticmethod
    def _one_conn(host: str, port: int) -> None:
        s = _connect(host, port)
        try:
            s.sendall(b"Eping")
            _recv_exact(s, 4)
        finally:
            s.close()

    @staticmethod
    def _threads(seconds: float, concurrency: int, op: Callable[[], None]) -> dict[str, Any]:
        deadline = time.perf_counter() + seconds
        counts = [0] * concurrency
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                while time.perf_counter() < deadline:
                    op()
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
            raise RuntimeError(f"run failed after {sum(counts)} operations: {errors[0]!r}")
        return {"rate": sum(counts) / (time.perf_counter() - start), "count": sum(counts)}

    def hold(self, host: str, port: int, n: int) -> dict[str, Any]:
        """Open `n` more connections and leave them idle (each answered once end to end)."""
        batch = 100  # connect in batches: many in flight, then collect the answers
        for i in range(0, n, batch):
            socks = [_connect(host, port, 30) for _ in range(min(batch, n - i))]
            for s in socks:
                s.sendall(b"I")
            for s in socks:
                _recv_exact(s, 1)
            self.held += socks
        return {"held": len(self.held)}

    def release(self) -> dict[str, Any]:
        for s in self.held:
            s.close()
        n, self.held = len(self.held), []
        return {"released": n}

    def http(self, host: str, port: int, count: int, authority: str,
             tls: dict[str, str] | None = None) -> dict[str, Any]:
        """Sequential HTTP/1.1 requests on one keep-alive connection: per-request latency."""
        s = _connect_http(host, port, tls)
        req = f"GET / HTTP/1.1\r\nhost: {authority}\r\n\r\n".encode()
        samples: list[float] = []
        try:
            for i in range(count + 20):
                t0 = time.perf_counter()
                s.sendall(req)
                _read_response(s)
                if i >= 20:
                    samples.append(time.perf_counter() - t0)
        finally:
            s.close()
        return _summary_us(samples)

    def http_rate(self, host: str, port: int, seconds: float, concurrency: int,
                  authority: str, tls: dict[str, str] | None = None) -> dict[str, Any]:
        """Requests per second over `concurrency` keep-alive connections."""
        req = f"GET / HTTP/1.1\r\nhost: {authority}\r\n\r\n".encode()
        ctx = _tls_context(tls["ca"]) if tls is not None else None
        socks: list[socket.socket] = []
        try:
            for _ in range(concurrency):
                socks.append(_connect_http(host, port, tls, ctx))
        except BaseException:
            for s in socks:
                s.close()
            raise
        it = iter(socks)
        local = threading.local()

        def op() -> None:
            s = getattr(local, "s", None)
            if s is None:
                s = local.s = next(it)
            s.sendall(req)
            _read_response(s)

        try:
            return self._threads(seconds, concurrency, op)
        finally:
            for s in socks:
                s.close()


def _read_response(s: socket.socket) -> None:
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].lower()
            i = head.find(b"content-length:")
            if i < 0:
                raise ConnectionError(f"response without content-length: {buf[:200]!r}")
            length = int(head[i + 15 :].split(b"\r\n", 1)[0])
            if not head.startswith(b"http/1.1 200"):
                raise ConnectionError(f"HTTP answer {buf[:80]!r}")
            missing = end + 4 + length - len(buf)
            if missing > 0:
                _recv_exact(s, missing)
            return
        more = s.recv(65536)
        if not more:
            raise ConnectionError("connection closed before the response")
        buf += more


def client_main() -> int:
    client = Client()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "exit":
            break
        try:
            out = {"ok": True, **getattr(client, op)(**cmd)}
        except Exception as e:
            out = {"ok": False, "error": f"{op}: {e!r}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    client.release()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["server"]:
        server = Server(argv[1], int(argv[2]))
        print("ready", flush=True)
        server.serve_forever()
        return 0
    if argv[:1] == ["client"]:
        return client_main()
    print("usage: python -m bench.load server HOST PORT | client", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
