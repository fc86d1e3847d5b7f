"""A loopback mesh for ztunnel tests (and the benchmark): a real CA, two ztunnels as two nodes.

Every harness picks its own 127.A.B.0/24 so suites can run in parallel: node
addresses .11/.12, pod addresses .101+, service VIPs .201+ (never bound: the
ztunnel maps them to endpoints). Test servers bind the pod addresses; clients
bind theirs as source and name the destination through the SOCKS5 listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambit.sources import LocalDirSource
from controlplane.pki import CaMaterial, write_node_credential
from controlplane.server import AuditLog, CaServer
from ztunnel.config import Listen, Timeouts, ZtunnelConfig
from ztunnel.hbone import HboneConfig
from ztunnel.server import Ztunnel


def _free_net() -> str:
    """A 127.A.B prefix whose node addresses are free on port 15008."""
    for _ in range(50):
        prefix = f"127.{random.randint(20, 250)}.{random.randint(1, 250)}"
        ok = True
        for host in (f"{prefix}.11", f"{prefix}.12"):
            s = socket.socket()
            try:
                s.bind((host, 15008))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return prefix
    raise RuntimeError("no free 127.x.y.0/24 found for the ztunnel harness")


NAMESPACES = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
"""


def node_yaml(name: str, ip: str) -> str:
    return (f"---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n"
            f"status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n")


def pod_yaml(ns: str, name: str, node: str, sa: str, ip: str, labels: dict[str, str] | None = None) -> str:
    lab = ", ".join(f"{k}: {v}" for k, v in (labels or {"app": name}).items())
    return (f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{lab}}}}}\n"
            f"spec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}, phase: Running}}\n")


def service_yaml(ns: str, name: str, vip: str, selector: dict[str, str], port: int, target: int) -> str:
    sel = ", ".join(f"{k}: {v}" for k, v in selector.items())
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec: {{clusterIP: {vip}, selector: {{{sel}}}, ports: [{{port: {port}, targetPort: {target}}}]}}\n")


@dataclass
class Mesh:
    root: Path
    prefix: str
    ca: CaServer
    material: CaMaterial
    nodes: dict[str, str]  # name -> address
    ztunnels: dict[str, Ztunnel] = field(default_factory=dict)
    pods: dict[str, str] = field(default_factory=dict)  # "ns/name" -> ip

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    def ip(self, n: int) -> str:
        return f"{self.prefix}.{n}"

    def write(self, name: str, text: str) -> None:
        """Write (or replace) one YAML file of the cluster state."""
        p = self.cluster_dir / f"{name}.yaml"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(p)

    def remove(self, name: str) -> None:
        (self.cluster_dir / f"{name}.yaml").unlink(missing_ok=True)

    def credential_dir(self, node: str) -> Path:
        return self.root / "cred" / node

    def config(self, node: str, **kw: Any) -> ZtunnelConfig:
        addr = self.nodes[node]
        base: dict[str, Any] = dict(
            node=node, cluster=f"local:{self.cluster_dir}", ca_address=f"127.0.0.1:{self.ca.port}",
            credential_dir=self.credential_dir(node),
            outbound=Listen(addr, 0), inbound_plaintext=Listen(addr, 0), hbone=Listen(addr, 15008),
            admin=Listen("127.0.0.1", 0), metrics=Listen(addr, 0), readiness=Listen(addr, 0),
            socks5=Listen(addr, 0), access_log=str(self.root / f"access-{node}.log"),
            timeouts=Timeouts(connect=2.0, cert=5.0, pool_idle=30.0, drain=2.0),
            loopback_workloads=True,  # every "pod" of this harness is a 127.x address
        )
        base.update(kw)
        return ZtunnelConfig(**base)

    async def start_ztunnel(self, node: str, hbone: HboneConfig | None = None, **kw: Any) -> Ztunnel:
        zt = Ztunnel(self.config(node, **kw), hbone=hbone)
        await zt.start()
        self.ztunnels[node] = zt
        return zt

    async def wait_ready(self, node: str, timeout: float = 10.0) -> None:
        zt = self.ztunnels[node]
        end = asyncio.get_running_loop().time() + timeout
        while not zt.readiness()[0]:
            if asyncio.get_running_loop().time() > end:
                raise AssertionError(f"ztunnel {node} not ready: {zt.readiness()[1]}")
            await asyncio.sleep(0.02)

    def socks5_addr(self, node: str) -> tuple[str, int]:
        return self.ztunnels[node].addresses["socks5"]

    async def socks5_connect(self, node: str, src_ip: str, host: str, port: int,
                             expect: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection from `src_ip` through node's SOCKS5 listener; checks the reply code."""
        r, w = await asyncio.open_connection(*self.socks5_addr(node), local_addr=(src_ip, 0))
        try:
            ipaddr = socket.inet_aton(host)
            req = b"\x05\x01\x00\x01" + ipaddr + struct.pack("!H", port)
        except OSError:
            req = b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode() + struct.pack("!H", port)
        w.write(b"\x05\x01\x00" + req)
        await w.drain()
        greet = await r.readexactly(2)
        assert greet == b"\x05\x00", greet
        rep = await r.readexactly(10)
        if rep[1] != expect:
            w.close()
            raise ConnectionRefusedError(f"SOCKS5 reply {rep[1]} (expected {expect})")
        return r, w


BASE_POLICY_FREE = ""


@contextlib.asynccontextmanager
async def loopback_mesh(tmp: Path, extra_yaml: str = "", start: tuple[str, ...] = ("node-a", "node-b"),
                        hbone: HboneConfig | None = None) -> AsyncIterator[Mesh]:
    """CA + cluster dir + ztunnels on `start`; pods: shop/client (node-a), shop/server (node-b),
    shop/local (node-a), legacy/plain (node-b, not enrolled); service shop/web -> server:8080."""
    prefix = _free_net()
    nodes = {"node-a": f"{prefix}.11", "node-b": f"{prefix}.12"}
    cluster = tmp / "cluster"
    cluster.mkdir(parents=True)
    pods = {"shop/client": f"{prefix}.101", "shop/server": f"{prefix}.102",
            "shop/local": f"{prefix}.103", "legacy/plain": f"{prefix}.104"}
    text = NAMESPACES + "".join(node_yaml(n, a) for n, a in nodes.items())
    text += pod_yaml("shop", "client", "node-a", "client", pods["shop/client"])
    text += pod_yaml("shop", "server", "node-b", "server", pods["shop/server"], {"app": "web"})
    text += pod_yaml("shop", "local", "node-a", "local", pods["shop/local"])
    text += pod_yaml("legacy", "plain", "node-b", "default", pods["legacy/plain"])
    text += service_yaml("shop", "web", f"{prefix}.201", {"app": "web"}, 80, 8080)
    (cluster / "base.yaml").write_text(text + extra_yaml)
    material = CaMaterial.generate("cluster.local")
    for n in nodes:
        write_node_credential(material, n, tmp / "cred" / n)
    audit_file = (tmp / "ca-audit.log").open("w")
    ca = CaServer(material, LocalDirSource(cluster), host="127.0.0.1", port=0, audit=AuditLog(audit_file))
    await ca.start()
    mesh = Mesh(tmp, prefix, ca, material, nodes, pods=pods)
    try:
        for n in start:
            await mesh.start_ztunnel(n, hbone=hbone)
        yield mesh
    finally:
        for zt in list(mesh.ztunnels.values()):
            await zt.stop(graceful=False)
        await ca.stop(0)
        audit_file.close()


@contextlib.asynccontextmanager
async def serving(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                  host: str, port: int) -> AsyncIterator[asyncio.Server]:
    """A test app's server on host:port for the body of the `async with`, then closed."""
    srv = await asyncio.start_server(handle, host, port, reuse_address=True)
    try:
        yield srv
    finally:
        srv.close()
        await srv.wait_closed()


@contextlib.asynccontextmanager
async def echo_server(host: str, port: int = 8080) -> AsyncIterator[asyncio.Server]:
    """Echoes everything; on EOF from the client, half-closes back after echoing."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await r.read(262144)
                if not data:
                    break
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async with serving(handle, host, port) as srv:
        yield srv
