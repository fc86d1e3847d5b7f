"""The ztunnel on loopback: two nodes, a real CA, SOCKS5 clients, HBONE both ways, policy, admin."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.ztunnel_harness import Mesh, echo_server, loopback_mesh

pytestmark = pytest.mark.timeout(60)

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]}]
"""


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with loopback_mesh(tmp_path) as m:
        await m.wait_ready("node-a")
        await m.wait_ready("node-b")
        yield m


async def http_get(addr: tuple[str, int], path: str, method: str = "GET") -> tuple[int, bytes]:
    def go() -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://{addr[0]}:{addr[1]}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    return await asyncio.to_thread(go)


async def admin(mesh: Mesh, node: str, path: str) -> Any:
    status, body = await http_get(mesh.ztunnels[node].addresses["admin"], path)
    assert status == 200, body
    return json.loads(body)


async def until(pred: Any, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_tunnel_both_ways_with_half_close_and_pool_reuse(mesh: Mesh) -> None:
    """Client EOF travels as END_STREAM; the server answers after it; the pool keeps one connection."""
    server_ip = mesh.pods["shop/server"]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until the client's half-close
        w.write(b"got " + hashlib.sha256(data).hexdigest().encode())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, server_ip, 9000)
    try:
        for i in range(5):
            payload = bytes(range(256)) * (100 * (i + 1))
            r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], server_ip, 9000)
            w.write(payload)
            w.write_eof()
            answer = await asyncio.wait_for(r.read(), 5)
            assert answer == b"got " + hashlib.sha256(payload).hexdigest().encode()
            w.close()
    finally:
        srv.close()
    conns = await admin(mesh, "node-a", "/connections")
    assert conns["pool"]["dials"] == 1, conns["pool"]
    assert conns["pool"]["streams"] == 5
    await until(lambda: not mesh.ztunnels["node-b"].ctx.conns.live)  # type: ignore[union-attr]
    b = await admin(mesh, "node-b", "/connections")
    inbound = [c for c in b["items"] if c["direction"] == "inbound"]
    assert len(inbound) == 5
    assert all(c["mtls"] and c["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client" for c in inbound)
    assert all(c["client_ip"] == mesh.pods["shop/client"] and c["src_workload"] == "shop/client" for c in inbound)
    assert sorted(c["bytes_received"] for c in inbound) == [25600 * (i + 1) for i in range(5)]
    # closed records are numbered as they close: a reader takes each once with ?closed_after=N
    seqs = sorted(c["closed_seq"] for c in inbound)
    assert b["closed_last"] >= seqs[-1] and len(set(seqs)) == 5
    later = await admin(mesh, "node-b", f"/connections?closed_after={seqs[2]}")
    assert sorted(c["closed_seq"] for c in later["items"] if c["direction"] == "inbound") == seqs[3:]
    assert later["instance"] == b["instance"]
    log_lines = (mesh.root / "access-node-b.log").read_text().splitlines()
    entry = json.loads(log_lines[-1])
    assert entry["decision"] == "allow" and entry["dst_workload"] == "shop/server"
    assert entry["bytes_sent"] == 68 and entry["duration_ms"] > 0


async def test_service_name_and_vip(mesh: Mesh) -> None:
    async with echo_server(mesh.pods["shop/server"], 8080):
        for host in ("web.shop.svc.cluster.local", mesh.ip(201)):
            r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], host, 80)
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()
    await until(lambda: not mesh.ztunnels["node-a"].ctx.conns.live)  # type: ignore[union-attr]
    out = [c for c in (await admin(mesh, "node-a", "/connections"))["items"] if c["direction"] == "outbound"]
    assert {c["dst"] for c in out} == {f"{mesh.pods['shop/server']}:8080"}
    assert {c["dst_service"] for c in out} == {"web.shop.svc.cluster.local"}
    assert {c["original_dst"] for c in out} == {f"{mesh.ip(201)}:80"}


async def test_unknown_names_and_sources_refused(mesh: Mesh) -> None:
    with pytest.raises(ConnectionRefusedError, match="reply 4"):
        await mesh.socks5_connect("node-a", mesh.pods["shop/client"], "nope.shop.svc.cluster.local", 80, 0)
    with pytest.raises(ConnectionRefusedError, match="reply 2"):
        await mesh.socks5_connect("node-a", mesh.ip(150), mesh.pods["shop/server"], 8080)
    # a direct connection to the capture port has no original destination: refused, counted
    r, w = await asyncio.open_connection(*mesh.ztunnels["node-a"].addresses["outbound"])
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
    _, body = await http_get(mesh.ztunnels["node-a"].addresses["metrics"], "/metrics")
    refused = {s.labels["reason"]: s.value for f in text_string_to_metric_families(body.decode())
               for s in f.samples if s.name == "ambit_connections_refused_total"}
    assert refused["unknown_source"] == 1 and refused["unknown_name"] == 1 and refused["no_original_dst"] == 1


async def test_remote_destination_port_zero_refused_before_tunnelling(mesh: Mesh) -> None:
    """A CONNECT to port 0 of a pod on another node has no valid HBONE authority: refused locally."""
    with pytest.raises(ConnectionRefusedError, match="reply 4"):
        await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 0)
    _, body = await http_get(mesh.ztunnels["node-a"].addresses["metrics"], "/metrics")
    refused = {s.labels["reason"]: s.value for f in text_string_to_metric_families(body.decode())
               for s in f.samples if s.name == "ambit_connections_refused_total"}
    assert refused == {"bad_destination": 1}
    assert mesh.ztunnels["node-a"].pool is not None and len(mesh.ztunnels["node-a"].pool) == 0


async def test_same_node_and_passthrough(mesh: Mesh) -> None:
    async with echo_server(mesh.pods["shop/local"], 7000), echo_server(mesh.pods["legacy/plain"], 7001):
        for ip, port in ((mesh.pods["shop/local"], 7000), (mesh.pods["legacy/plain"], 7001)):
            r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], ip, port)
            w.write(b"abc")
            assert await r.readexactly(3) == b"abc"
            w.write_eof()
            assert await r.read() == b""
            w.close()
    await until(lambda: not mesh.ztunnels["node-a"].ctx.conns.live)  # type: ignore[union-attr]
    items = (await admin(mesh, "node-a", "/connections"))["items"]
    routes = sorted((c["direction"], c["route"], c["mtls"]) for c in items)
    assert routes == [("inbound", "same-node", True), ("outbound", "passthrough", False),
                      ("outbound", "same-node", True)]
    assert all(c["bytes_received"] == 3 and c["bytes_sent"] == 3 for c in items)


async def test_policy_deny_then_invalid_update_keeps_last_good(mesh: Mesh) -> None:
    async with echo_server(mesh.pods["shop/server"], 8080):
        mesh.write("policy", DENY_CLIENT)
        await until(lambda: mesh.ztunnels["node-b"].store.current.policies.authz != ())
        with pytest.raises(ConnectionRefusedError, match="reply 2"):
            await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        # an invalid edit of the same policy: rejected with the field named, the DENY stays
        mesh.write("policy", DENY_CLIENT.replace("action: DENY", "action: DENY\n  rulez: []"))
        await until(lambda: bool(mesh.ztunnels["node-b"].store.current.errors))
        dump = await admin(mesh, "node-b", "/config_dump")
        assert any("shop/deny-client" in e and "rulez" in e for e in dump["errors"]), dump["errors"]
        assert [p["name"] for p in dump["policies"]] == ["deny-client"]
        with pytest.raises(ConnectionRefusedError, match="reply 2"):
            await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        mesh.remove("policy")
        await until(lambda: mesh.ztunnels["node-b"].store.current.policies.authz == ())
        _r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        w.close()
    denied = [json.loads(x) for x in (mesh.root / "access-node-b.log").read_text().splitlines()]
    denied = [d for d in denied if d["decision"] == "deny"]
    assert len(denied) == 2 and denied[0]["policy"] == "shop/deny-client"
    _, body = await http_get(mesh.ztunnels["node-b"].addresses["metrics"], "/metrics")
    fam = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
           if s.name == "ambit_policy_denials_total"}
    assert fam["ambit_policy_denials_total"] == 2


async def test_metrics_count_tunnelled_connections_and_bytes(mesh: Mesh) -> None:
    async with echo_server(mesh.pods["shop/server"], 8080):
        for _ in range(3):
            r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
            w.write(b"x" * 1000)
            await r.readexactly(1000)
            w.write_eof()
            await r.read()
            w.close()
    await until(lambda: not mesh.ztunnels["node-b"].ctx.conns.live)  # type: ignore[union-attr]
    await until(lambda: not mesh.ztunnels["node-a"].ctx.conns.live)  # type: ignore[union-attr]
    for node, reporter in (("node-a", "source"), ("node-b", "destination")):
        status, body = await http_get(mesh.ztunnels[node].addresses["metrics"], "/metrics")
        assert status == 200
        samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]
        by = {(s.name, s.labels.get("reporter")): s for s in samples if s.name.startswith("istio_tcp")}
        opened = by[("istio_tcp_connections_opened_total", reporter)]
        assert opened.value == 3
        assert opened.labels["source_workload"] == "client"
        assert opened.labels["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/server"
        assert opened.labels["connection_security_policy"] == "mutual_tls"
        assert by[("istio_tcp_connections_closed_total", reporter)].value == 3
        assert by[("istio_tcp_received_bytes_total", reporter)].value == 3000
        assert by[("istio_tcp_sent_bytes_total", reporter)].value == 3000
        certs = [s for s in samples if s.name == "ambit_cert_expiry_seconds"]
        assert certs and all(s.value > 3600 for s in certs)
    pool = [s for f in text_string_to_metric_families(
        (await http_get(mesh.ztunnels["node-a"].addresses["metrics"], "/metrics"))[1].decode())
        for s in f.samples if s.name == "ambit_hbone_pool_connections"]
    assert pool[0].value == 1


async def test_admin_endpoints(mesh: Mesh) -> None:
    dump = await admin(mesh, "node-a", "/config_dump")
    assert dump["node"] == "node-a" and dump["version"] >= 1 and dump["errors"] == []
    assert {w["uid"] for w in dump["workloads"]} == set(mesh.pods)
    assert dump["services"][0]["ports"] == {"80": 8080}
    wl = {w["uid"]: w for w in (await admin(mesh, "node-a", "/workloads"))["items"]}
    assert wl["shop/client"]["local"] and not wl["shop/server"]["local"]
    assert not wl["legacy/plain"]["enrolled"]
    certs = (await admin(mesh, "node-a", "/certs"))["items"]
    assert {c["identity"] for c in certs} == {"spiffe://cluster.local/ns/shop/sa/client",
                                             "spiffe://cluster.local/ns/shop/sa/local"}
    assert all(c["state"] and c["serial"] and c["not_after"] for c in certs)
    dec = await admin(mesh, "node-b", "/debug/authorize?from=shop/client&to=shop/server&port=8080")
    assert dec["allowed"] and dec["mtls_mode"] == "PERMISSIVE"
    ready_status, _ = await http_get(mesh.ztunnels["node-a"].addresses["readiness"], "/healthz/ready")
    assert ready_status == 200
    assert (await http_get(mesh.ztunnels["node-a"].addresses["admin"], "/nope"))[0] == 404
    assert (await http_get(mesh.ztunnels["node-a"].addresses["admin"], "/quitquitquit"))[0] == 405


async def test_readiness_waits_for_certificates(tmp_path: Path) -> None:
    async with loopback_mesh(tmp_path, start=()) as mesh:
        from ztunnel.identity.caclient import CaClient

        gate = asyncio.Event()
        real = CaClient(f"127.0.0.1:{mesh.ca.port}", mesh.credential_dir("node-a"))

        class GatedCa:
            async def create_certificate(self, csr_pem: str, ttl_seconds: int) -> list[str]:
                await gate.wait()
                return await real.create_certificate(csr_pem, ttl_seconds)

        from ztunnel.server import Ztunnel

        zt = Ztunnel(mesh.config("node-a"), ca=GatedCa())
        await zt.start()
        mesh.ztunnels["node-a"] = zt
        try:
            status, body = await http_get(zt.addresses["readiness"], "/healthz/ready")
            assert status == 503 and b"waiting for certificates" in body
            gate.set()
            await mesh.wait_ready("node-a")
            assert (await http_get(zt.addresses["readiness"], "/healthz/ready"))[0] == 200
        finally:
            await real.close()


async def test_graceful_shutdown_drains(mesh: Mesh) -> None:
    zb = mesh.ztunnels["node-b"]
    async with echo_server(mesh.pods["shop/server"], 8080):
        r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        w.write(b"before")
        assert await r.readexactly(6) == b"before"
        status, _ = await http_get(zb.addresses["admin"], "/quitquitquit", "POST")
        assert status == 200
        await asyncio.sleep(0.2)
        # the live tunnel keeps working while draining; new connections are refused
        w.write(b"during")
        assert await r.readexactly(6) == b"during"
        with pytest.raises(OSError):
            await asyncio.open_connection(*zb.addresses["hbone"])
        w.write_eof()
        assert await r.read() == b""
        w.close()
        await asyncio.wait_for(zb.wait_stopped(), 5)
    assert len(zb.tasks) == 0 and len(zb.ctx.tasks) == 0  # type: ignore[union-attr]
    assert not zb.ctx.conns.live  # type: ignore[union-attr]
    # node-a's pool noticed: the next request dials anew and fails cleanly (503-like reply 5)
    with pytest.raises(ConnectionRefusedError, match="reply 5"):
        await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
    # and a restarted node-b serves again
    await mesh.start_ztunnel("node-b")
    await mesh.wait_ready("node-b")
    async with echo_server(mesh.pods["shop/server"], 8080):
        r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        w.write(b"again")
        assert await r.readexactly(5) == b"again"
        w.close()


async def test_peer_death_resets_streams(mesh: Mesh) -> None:
    async with echo_server(mesh.pods["shop/server"], 8080):
        r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        w.write(b"x")
        await r.readexactly(1)
        await mesh.ztunnels["node-b"].stop(graceful=False)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
    pool = mesh.ztunnels["node-a"].pool
    assert pool is not None
    await until(lambda: len(pool) == 0)


async def test_thousand_concurrent_connections(mesh: Mesh) -> None:
    n = 1000
    all_open = asyncio.Event()
    opened = 0
    async with echo_server(mesh.pods["shop/server"], 8080):
        async def one(i: int) -> bytes:
            nonlocal opened
            r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
            msg = f"conn-{i:04d}".encode() * 10
            w.write(msg)
            got = await r.readexactly(len(msg))
            opened += 1
            if opened == n:
                all_open.set()
            await all_open.wait()  # every tunnel is open at the same time
            w.write(msg)
            got += await r.readexactly(len(msg))
            w.close()
            return got if got == msg * 2 else b"MISMATCH"

        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 45)
    assert all(r != b"MISMATCH" for r in results)
    stats = (await admin(mesh, "node-a", "/connections"))["pool"]
    assert stats["streams"] == 1000
    # 100 streams per connection: at least 10 connections, one dial in flight per key at a time
    assert 10 <= stats["dials"] <= 20, stats


async def test_hundred_megabytes(mesh: Mesh) -> None:
    size = 100 * 1024 * 1024
    server_ip = mesh.pods["shop/server"]

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h, n = hashlib.sha256(), 0
        while chunk := await r.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        w.write(f"{n} {h.hexdigest()}".encode())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(sink, server_ip, 9100)
    try:
        r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], server_ip, 9100)
        block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB
        h = hashlib.sha256()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(size // len(block)):
            w.write(block)
            h.update(block)
            await w.drain()
        w.write_eof()
        answer = await asyncio.wait_for(r.read(), 30)
        elapsed = loop.time() - t0
        w.close()
    finally:
        srv.close()
    assert answer.decode() == f"{size} {h.hexdigest()}"
    print(f"100 MiB through two in-process ztunnels (one core): {size / elapsed / 1e6:.0f} MB/s")


async def test_cli_process_serves_and_quits(tmp_path: Path) -> None:
    """`ambit ztunnel run` as a process (uvloop): ready, tunnels to an in-process peer, /quitquitquit exits 0."""
    import sys

    async with loopback_mesh(tmp_path, start=("node-b",)) as mesh:
        await mesh.wait_ready("node-b")
        a = mesh.nodes["node-a"]
        with (tmp_path / "ztunnel-a.err").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", "ztunnel", "run", "--node", "node-a",
                "--cluster", f"local:{mesh.cluster_dir}", "--ca", f"127.0.0.1:{mesh.ca.port}",
                "--credential-dir", str(mesh.credential_dir("node-a")), "--admin", f"{a}:15000",
                "--socks5", f"{a}:15080", "--outbound", f"{a}:0", "--inbound-plaintext", f"{a}:0",
                "--metrics", f"{a}:0", "--readiness", f"{a}:15021", "--access-log", str(tmp_path / "a.log"),
                stdout=asyncio.subprocess.DEVNULL, stderr=err,
            )
            try:
                end = asyncio.get_running_loop().time() + 20
                while True:
                    try:
                        if (await http_get((a, 15021), "/healthz/ready"))[0] == 200:
                            break
                    except OSError:
                        pass
                    assert asyncio.get_running_loop().time() < end, "the ztunnel process never became ready"
                    await asyncio.sleep(0.1)
                async with echo_server(mesh.pods["shop/server"], 8080):
                    r, w = await asyncio.open_connection(a, 15080, local_addr=(mesh.pods["shop/client"], 0))
                    w.write(b"\x05\x01\x00\x05\x01\x00\x03\x1aweb.shop.svc.cluster.local\x00\x50")
                    assert await r.readexactly(12) == b"\x05\x00\x05\x00\x00\x01" + b"\0" * 6
                    w.write(b"through a process")
                    assert await r.readexactly(17) == b"through a process"
                    w.close()
                assert (await http_get((a, 15000), "/quitquitquit", "POST"))[0] == 200
                assert await asyncio.wait_for(proc.wait(), 15) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
