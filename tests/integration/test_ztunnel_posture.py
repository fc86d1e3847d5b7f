"""The ztunnel needs no capability: as a process with every capability dropped (UID 0, as in
the DaemonSet), it binds its listeners, gets its certificates, becomes ready, tunnels over
HBONE to a peer and serves its metrics (daemonset/daemonset.yaml says why for each)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import require_root
from tests.integration.test_ztunnel import http_get
from tests.integration.ztunnel_harness import echo_server, loopback_mesh
from tests.tools import tool


async def test_ztunnel_process_without_capabilities_serves(tmp_path: Path) -> None:
    require_root()  # dropping capabilities needs them to start with
    setpriv = tool("setpriv", "util-linux")
    async with loopback_mesh(tmp_path, start=("node-b",)) as mesh:
        await mesh.wait_ready("node-b")
        a = mesh.nodes["node-a"]
        with (tmp_path / "ztunnel-a.err").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                sys.executable, "-m", "agent.cli", "ztunnel", "run", "--node", "node-a",
                "--cluster", f"local:{mesh.cluster_dir}", "--ca", f"127.0.0.1:{mesh.ca.port}",
                "--credential-dir", str(mesh.credential_dir("node-a")), "--admin", f"{a}:15000",
                "--socks5", f"{a}:15080", "--outbound", f"{a}:15001", "--inbound-plaintext", f"{a}:15006",
                "--metrics", f"{a}:15020", "--readiness", f"{a}:15021", "--access-log", str(tmp_path / "a.log"),
                stdout=asyncio.subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            try:
                end = asyncio.get_running_loop().time() + 20
                while True:
                    try:
                        if (await http_get((a, 15021), "/healthz/ready"))[0] == 200:
                            break
                    except OSError:
                        pass
                    assert proc.returncode is None, (tmp_path / "ztunnel-a.err").read_text()
                    assert asyncio.get_running_loop().time() < end, "the ztunnel never became ready"
                    await asyncio.sleep(0.1)
                # the ready process (setpriv has exec'd it by now) holds no capability at all
                status = Path(f"/proc/{proc.pid}/status").read_text()
                caps = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines())
                        if k.startswith("Cap")}
                assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == "0000000000000000", caps
                async with echo_server(mesh.pods["shop/server"], 8080):
                    r, w = await asyncio.open_connection(a, 15080, local_addr=(mesh.pods["shop/client"], 0))
                    w.write(b"\x05\x01\x00\x05\x01\x00\x03\x1aweb.shop.svc.cluster.local\x00\x50")
                    assert await r.readexactly(12) == b"\x05\x00\x05\x00\x00\x01" + b"\0" * 6
                    w.write(b"no capabilities")
                    assert await r.readexactly(15) == b"no capabilities"
                    w.close()
                status_code, body = await http_get((a, 15020), "/metrics")
                assert status_code == 200 and b"istio_tcp_connections_opened_total" in body
                assert (await http_get((a, 15000), "/quitquitquit", "POST"))[0] == 200
                assert await asyncio.wait_for(proc.wait(), 15) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
