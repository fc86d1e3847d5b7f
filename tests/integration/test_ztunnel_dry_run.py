"""Dry-run and enforcement status at a real ztunnel (loopback mesh): a dry-run DENY of everything
denies nothing; what it would have decided is in the access log, /connections (what the agent
joins into `ambit flows`) and the metrics, and a policy it cannot enforce as written is counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.integration.ztunnel_harness import echo_server, loopback_mesh

POLICIES = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: istio-system}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: external}]
  rules: [{}]
"""


async def _get(host: str, port: int, path: str) -> str:
    r, w = await asyncio.open_connection(host, port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    body = (await r.read()).decode()
    w.close()
    return body.split("\r\n\r\n", 1)[1]


async def test_dry_run_at_the_ztunnel(tmp_path: Path) -> None:
    async with loopback_mesh(tmp_path, extra_yaml=POLICIES) as mesh:
        await mesh.wait_ready("node-a")
        await mesh.wait_ready("node-b")
        async with echo_server(mesh.pods["shop/server"]):
            r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"  # not denied: the policy is a dry-run
            w.close()
            zt = mesh.ztunnels["node-b"]
            for _ in range(100):
                lines = [json.loads(ln) for ln in (tmp_path / "access-node-b.log").read_text().splitlines()
                         if ln.startswith("{")]
                if lines:
                    break
                await asyncio.sleep(0.05)
            (entry,) = [e for e in lines if e["direction"] == "inbound"]
            assert entry["decision"] == "allow"
            assert [(d["policy"], d["rule"], d["decision"]) for d in entry["dry_run"]] == [("shop/deny-all", 0, "deny")]
            admin_host, admin_port = zt.addresses["admin"]
            conns: list[dict[str, Any]] = json.loads(await _get(admin_host, admin_port, "/connections"))["items"]
            assert any(c["dry_run"] and c["dry_run"][0]["decision"] == "deny" for c in conns)
            host, port = zt.addresses["metrics"]
            text = await _get(host, port, "/metrics")
            assert 'ambit_policy_dry_run_decisions_total{decision="deny",policy="shop/deny-all"} 1.0' in text
            assert 'ambit_policies_not_fully_enforced{kind="AuthorizationPolicy",status="no-effect"} 1.0' in text
            dump = json.loads(await _get(admin_host, admin_port, "/config_dump"))
            rows = {p["key"]: p for p in dump["policies"]}
            assert rows["shop/deny-all"]["dry_run"] and rows["shop/deny-all"]["status"] == "enforced"
            assert rows["istio-system/ext"]["status"] == "no-effect"
