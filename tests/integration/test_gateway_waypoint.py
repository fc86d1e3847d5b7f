"""Through the gateway to a backend that uses a waypoint: the gateway dials the waypoint (as a source
ztunnel would), which decides with the gateway's identity as the client and goes on to the pod."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.integration.gateway_rig import gateway_mesh, store_app
from tests.integration.http_apps import H1Client
from tests.integration.ztunnel_harness import pod_yaml, service_yaml
from waypoint.server import Waypoint, WaypointConfig
from ztunnel.config import Listen, Timeouts


def pay_yaml(prefix: str) -> str:
    return """
---
apiVersion: v1
kind: Namespace
metadata: {name: pay, labels: {ambit.dev/dataplane-mode: ambient, ambit.dev/use-waypoint: wp}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: pay}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: charges, namespace: pay}
spec:
  selector: {matchLabels: {app: charges}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/edge/sa/ingress]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pay, namespace: pay}
spec:
  parentRefs: [{name: ingress, namespace: edge}]
  rules:
  - matches: [{path: {value: /public/pay}}]
    backendRefs: [{name: charges, port: 80}]
""" + pod_yaml("pay", "wp-waypoint", "node-a", "wp", f"{prefix}.50",
               {"gateway.networking.k8s.io/gateway-name": "wp", "ambit.dev/dataplane-mode": "none"}) \
        + pod_yaml("pay", "charges", "node-b", "charges", f"{prefix}.62", {"app": "charges"}) \
        + service_yaml("pay", "charges", f"{prefix}.212", {"app": "charges"}, 80, 8080)


async def test_a_backend_behind_a_waypoint_is_reached_through_it(tmp_path: Path) -> None:
    async with gateway_mesh(tmp_path) as rig:
        prefix = rig.mesh.prefix
        rig.write(extra=pay_yaml(prefix))
        await rig.wait(lambda: rig.gw.store.current.waypoint("pay", "wp") is not None)
        for node in ("node-a", "node-b"):
            zt = rig.mesh.ztunnels[node]
            await rig.wait(lambda zt=zt: zt.store.current.waypoint("pay", "wp") is not None)  # type: ignore[misc]
        wp_addr = f"{prefix}.50"
        wp = Waypoint(WaypointConfig(
            namespace="pay", gateway="wp", node="node-a", cluster=f"local:{rig.mesh.cluster_dir}",
            ca_address=f"127.0.0.1:{rig.mesh.ca.port}", credential_dir=rig.mesh.credential_dir("node-a"),
            hbone=Listen(wp_addr, 15008), metrics=None, readiness=None, admin=None,
            access_log=str(tmp_path / "waypoint.log"), timeouts=Timeouts(connect=2.0, cert=5.0),
            peer_hbone_ports={rig.mesh.nodes["node-b"]: 15008}))
        await wp.start()
        try:
            await rig.wait(lambda: wp.readiness()[0])
            async with store_app(f"{prefix}.62", "charges"):
                src = rig.client_ip()
                r, w = await asyncio.open_connection(*rig.http, local_addr=(src, 0))
                c = H1Client(r, w, "shop.example.com")
                try:
                    ok = await c.request("GET", "/public/pay")
                    assert ok.status == 200, ok
                    seen = ok.json()
                    assert seen["server"] == "charges"
                    # the client's address, then the gateway's (the waypoint's hop)
                    assert seen["headers"]["x-forwarded-for"].startswith(src), seen["headers"]
                    denied = await c.request("POST", "/public/pay", b"{}")
                    assert (denied.status, denied.body) == (403, b"RBAC: access denied")
                finally:
                    c.close()
            hop = next(e for e in rig.access_log() if e["path"] == "/public/pay" and e["status"] == 200)
            assert hop["hop"].startswith("pay/charges through waypoint pay/wp")
            assert hop["dst_identity"] == "spiffe://cluster.local/ns/pay/sa/wp"
            lines = [json.loads(x) for x in (tmp_path / "waypoint.log").read_text().splitlines()
                     if x.startswith("{")]
            judged = [e for e in lines if e.get("path") == "/public/pay"]
            assert [e["status"] for e in judged] == [200, 403]
            assert all(e["src_identity"] == "spiffe://cluster.local/ns/edge/sa/ingress" for e in judged)
        finally:
            await wp.stop()
