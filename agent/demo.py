"""`make demo` (`python -m agent.demo`): ambit end to end on a two-node local cluster.

It runs the commands a user would run and prints them with their output:
brings up a local cluster (CA, two nodes with an agent and a ztunnel each),
applies `examples/` (the enrolled `shop` namespace with three services across
both nodes, the unenrolled `legacy` namespace, an ALLOW-by-principal policy and
STRICT mTLS, the `payments` namespace behind a waypoint with an HTTP
policy, and the `orders` service behind an ingress gateway), sends allowed and
denied traffic and requests, shows `ambit flows` and `ambit policy check`
explaining denials, calls the gateway from outside the mesh (JWT scopes, a rate
limit, an IP allowlist), and tears everything down. It
checks what it claims (exit status 1 if the mesh did not behave) and always
cleans up, also when interrupted.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
AMBIT = [sys.executable, "-m", "agent.cli"]

CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    with socket.create_connection((host, port), timeout=3) as c:
        reply = c.recv(200).decode().strip()
except OSError as e:
    print(f"{host}:{port} -> failed: {e}"); sys.exit(1)
if not reply:
    print(f"{host}:{port} -> connection closed without a reply (refused by the mesh)"); sys.exit(1)
print(f"{host}:{port} -> {reply}")
"""


# HTTP requests on one keep-alive connection from inside a pod: prints one line per request
REQUESTS = """
import http.client, sys
host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, port, timeout=5)
for spec in sys.argv[3:]:
    method, path = spec.split(" ", 1)
    try:
        c.request(method, path, body=b"{}" if method == "POST" else None)
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        print(f"{method} {path} -> {r.status} {body if r.status != 200 else ''}".rstrip())
    except OSError as e:
        print(f"{method} {path} -> failed: {e!r}")
"""


# HTTP requests to the ingress gateway from a client outside the mesh, on one keep-alive
# connection; each argument is "METHOD PATH [TOKEN]"
EDGE_REQUESTS = """
import http.client, sys
host, port = sys.argv[1], int(sys.argv[2])
c = http.client.HTTPConnection(host, port, timeout=5)
for spec in sys.argv[3:]:
    method, path, token = (spec.split(" ", 2) + [""])[:3]
    headers = {"Host": "shop.example.com", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    try:
        c.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
        r = c.getresponse()
        body = r.read().decode(errors="replace").strip().removeprefix(str(r.status)).strip()
        more = f" (retry-after {r.headers['retry-after']}s)" if r.status == 429 else ""
        print(f"{r.status} {body if r.status != 200 else ''}{more}".rstrip())
    except OSError as e:
        print(f"0 failed: {e!r}")
        c = http.client.HTTPConnection(host, port, timeout=5)
"""
ISSUER = "https://issuer.demo.ambit.dev"


def demo_token(sub: str, scope: str) -> str:
    """A JWT of the demo issuer (examples/demo-issuer-key.pem), as an OAuth2 server would issue it."""
    from joserfc import jwt
    from joserfc.jwk import ECKey

    key = ECKey.import_key((EXAMPLES / "demo-issuer-key.pem").read_bytes())
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": sub, "aud": "orders", "scope": scope, "iat": now, "exp": now + 600}
    return str(jwt.encode({"alg": "ES256", "kid": "demo-1"}, claims, key))


class DemoFailed(Exception):
    """The mesh did not do what the demo says it does."""


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.step_no = 0

    def step(self, title: str) -> None:
        self.step_no += 1
        bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
        print(f"\n{bold}== {self.step_no}. {title}{plain}", flush=True)

    def ambit(self, *args: str, show: bool = True, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        sd = ["--state-dir", str(self.state_dir)]
        if args[0] == "local":  # before any `--` of `local exec`
            argv = [args[0], args[1], *sd, *args[2:]]
        else:
            argv = [*args, *sd] if "--node" in args else [*args]
        shown = "ambit " + " ".join(shlex.quote(a) for a in args)
        if show:
            print(f"$ {shown}", flush=True)
        proc = subprocess.run([*AMBIT, *argv], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "COLUMNS": "250"})
        if show:
            out = proc.stdout.rstrip()
            if out:
                print(out, flush=True)
            if proc.returncode != 0 and proc.stderr.strip():
                print(proc.stderr.rstrip(), flush=True)
        if check and proc.returncode != 0:
            raise DemoFailed(f"`{shown}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return proc

    def connect(self, pod: str, host: str, port: int) -> subprocess.CompletedProcess[str]:
        return self.ambit("local", "exec", pod, "--", "python3", "-c", CLIENT, host, str(port), check=False,
                          show=False)

    def show_connect(self, pod: str, host: str, port: int, expect_ok: bool) -> None:
        print(f"$ ambit local exec {pod} -- <connect to {host}:{port}>", flush=True)
        proc = self.connect(pod, host, port)
        print("  " + (proc.stdout.strip() or proc.stderr.strip()), flush=True)
        if (proc.returncode == 0) != expect_ok:
            raise DemoFailed(f"{pod} -> {host}:{port}: expected {'success' if expect_ok else 'refusal'}, "
                             f"got {proc.stdout.strip() or proc.stderr.strip()}")

    def show_requests(self, pod: str, host: str, port: int, expect: list[int], *specs: str) -> None:
        print(f"$ ambit local exec {pod} -- <HTTP on one connection to {host}:{port}>", flush=True)
        proc = self.ambit("local", "exec", pod, "--", "python3", "-c", REQUESTS, host, str(port), *specs,
                          check=False, show=False)
        lines = proc.stdout.strip().splitlines()
        for line in lines:
            print("  " + line, flush=True)
        got = [int(ln.split(" -> ")[1].split()[0]) if " -> failed" not in ln else 0 for ln in lines]
        if got != expect:
            raise DemoFailed(f"{pod}: expected statuses {expect}, got {got}: {proc.stderr.strip()[-300:]}")

    def edge(self, pod: str, host: str, *specs: str) -> list[str]:
        """Requests from `pod` (outside the mesh) to the gateway at `host`:80; a line per answer."""
        proc = self.ambit("local", "exec", pod, "--", "python3", "-c", EDGE_REQUESTS, host, "80", *specs,
                          check=False, show=False)
        return proc.stdout.strip().splitlines()

    def show_edge(self, pod: str, host: str, calls: list[tuple[str, str, str]], expect: list[int],
                  tokens: dict[str, str]) -> None:
        """`calls`: (method, path, token name or ""); prints each with its answer."""
        print(f"$ ambit local exec {pod} -- <HTTP to the gateway {host}:80, Host: shop.example.com>", flush=True)
        lines = self.edge(pod, host, *(f"{m} {p} {tokens.get(t, '')}".rstrip() for m, p, t in calls))
        got = []
        for (m, p, t), line in zip(calls, lines, strict=False):
            print(f"  {m} {p} ({f'token: {t}' if t else 'no token'}) -> {line}", flush=True)
            got.append(int(line.split()[0]))
        if got != expect:
            raise DemoFailed(f"{pod} -> the gateway: expected {expect}, got {got}: {lines}")

    def get_json(self, *args: str) -> Any:
        return json.loads(self.ambit(*args, "-o", "json", show=False).stdout)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (DemoFailed, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def pod_ip(demo: Demo, ns: str, name: str) -> str:
    pods = demo.get_json("local", "get", "pods")["items"]
    for p in pods:
        if p["metadata"]["namespace"] == ns and p["metadata"]["name"] == name:
            return str(p["status"]["podIP"])
    raise DemoFailed(f"pod {ns}/{name} not found")


def run(demo: Demo) -> None:
    demo.step("Bring up a local cluster: a CA and two nodes, each with its agent (eBPF) and ztunnel")
    demo.ambit("local", "up", "--nodes", "2")

    demo.step("Apply the example manifests: enrolled `shop` (3 services), unenrolled `legacy`, policies")
    demo.ambit("local", "apply", "-f", str(EXAMPLES))

    def enrolled() -> bool:
        pods = demo.get_json("local", "get", "pods")["items"]
        shop = [p for p in pods if p["metadata"]["namespace"] == "shop"]
        return len(shop) == 3 and all(
            p["status"].get("phase") == "Running"
            and (p["metadata"].get("annotations") or {}).get("ambit.dev/redirection") == "enabled"
            for p in shop
        )

    wait_for("the shop pods to run and be redirected by their node's agent", enrolled, 60)
    wait_for("both nodes' redirection to be healthy",
             lambda: all(demo.ambit("status", "--node", n, show=False, check=False).returncode == 0
                         for n in ("node-a", "node-b")), 60)
    demo.ambit("local", "get", "pods")
    demo.ambit("status", "--node", "node-a")

    demo.step("Every enrolled pod has a SPIFFE identity, issued by the CA to its node's ztunnel")
    demo.ambit("certs", "--node", "node-a")

    demo.step("Allowed: shop/frontend calls backend (node-b) and catalog (same node) by Service name")
    demo.show_connect("shop/frontend", "backend.shop.svc.cluster.local", 8080, expect_ok=True)
    demo.show_connect("shop/frontend", "catalog.shop.svc.cluster.local", 8080, expect_ok=True)

    demo.step("Denied: shop/catalog is in the mesh, but the backend's policy allows only the frontend")
    demo.show_connect("shop/catalog", "backend.shop.svc.cluster.local", 8080, expect_ok=False)

    demo.step("Denied: legacy/client is not in the mesh; its plaintext to a STRICT pod is dropped")
    demo.show_connect("legacy/client", pod_ip(demo, "shop", "backend"), 8080, expect_ok=False)

    demo.step("What is talking to what, as whom, and why it was allowed: the flows of node-b")

    def flows_seen() -> bool:
        items = demo.get_json("flows", "--node", "node-b")["items"]
        allowed = any(f.get("source_pod") == "shop/frontend" and f.get("verdict") == "allow"
                      and f.get("security") == "mutual_tls" for f in items)
        denied = any(f.get("source_pod") == "shop/catalog" and f.get("verdict") == "deny" for f in items)
        dropped = any(f.get("verdict") == "dropped" for f in items)
        return allowed and denied and dropped

    wait_for("node-b's flows to show the allowed, denied and dropped connections", flows_seen, 20)
    demo.ambit("flows", "--node", "node-b")

    demo.step("Why was shop/catalog denied? Ask the policy engine of the backend's node")
    proc = demo.ambit("policy", "check", "--from", "shop/catalog", "--to", "shop/backend:8080",
                      "--node", "node-b", check=False)
    if proc.returncode != 3:
        raise DemoFailed(f"policy check should have said DENIED (exit 3), exited {proc.returncode}")
    proc = demo.ambit("policy", "check", "--from", "shop/frontend", "--to", "shop/backend:8080",
                      "--node", "node-b", check=False)
    if proc.returncode != 0:
        raise DemoFailed(f"policy check should have said ALLOWED (exit 0), exited {proc.returncode}")

    demo.step("L7: `payments` uses a waypoint; only order-service may POST or GET /api/v1/charges")
    wait_for("the payments waypoint to be ready",
             lambda: demo.ambit("waypoints", "--node", "node-a", show=False, check=False).returncode == 0, 60)
    demo.ambit("waypoints", "--node", "node-a")
    service = "payment.payments.svc.cluster.local"
    wait_for("order-service to reach payment through the waypoint",
             lambda: "-> 200" in demo.ambit("local", "exec", "payments/order-service", "--", "python3", "-c",
                                           REQUESTS, service, "80", "GET /api/v1/charges",
                                           show=False, check=False).stdout, 60)
    demo.show_requests("payments/order-service", service, 80, [200, 200, 403],
                       "POST /api/v1/charges", "GET /api/v1/charges", "DELETE /api/v1/charges")
    demo.show_requests("payments/reporting", service, 80, [403], "GET /api/v1/charges")

    demo.step("The waypoint hop in the flows of node-a, and each request it decided")
    wait_for("node-a's flows to show reporting's connection through the waypoint",
             lambda: any(f.get("waypoint") == "payments/waypoint" and f.get("verdict") == "allow"
                         for f in demo.get_json("flows", "--node", "node-a", "--pod", "payments/reporting")["items"]),
             20)
    demo.ambit("flows", "--node", "node-a", "--pod", "payments/reporting")

    demo.step("Why was reporting's GET denied? Ask the waypoint that enforces it")
    proc = demo.ambit("policy", "check", "--from", "payments/reporting", "--to", "payments/payment:8080",
                      "--method", "GET", "--path", "/api/v1/charges", "--node", "node-b", check=False)
    if proc.returncode != 3 or "waypoint" not in proc.stdout:
        raise DemoFailed(f"the waypoint's policy check should have said DENIED (exit 3), exited {proc.returncode}")


def edge_act(demo: Demo) -> None:
    """The ingress gateway: an external client without a token, with one lacking the scope, with the
    right one, over its rate limit, and from a network the gateway does not allow."""
    demo.step("The edge: an ingress gateway (class ambit-ingress) in front of `orders`, called from outside the mesh")
    gateway = pod_ip(demo, "edge", "ingress-gateway")
    tokens = {"alice, scope profile": demo_token("alice", "profile"),
              "alice, scope read:orders": demo_token("alice", "read:orders"),
              "bob, scope read:orders": demo_token("bob", "read:orders")}
    wait_for("the gateway to answer for /api/v1/orders",
             lambda: demo.edge("internet/partner", gateway, "GET /api/v1/orders")[:1] == ["403 RBAC: access denied"], 60)
    alice = "alice, scope read:orders"
    demo.show_edge("internet/partner", gateway, [
        ("GET", "/api/v1/orders", ""),  # no token: the scopes policy needs a principal
        ("GET", "/api/v1/orders", "alice, scope profile"),  # a token without read:orders
        ("GET", "/api/v1/orders", alice),  # the right scope
        ("POST", "/api/v1/orders", alice),  # read:orders does not allow POST
        *[("GET", "/api/v1/orders/7", alice)] * 4,  # 5 per minute per user
        ("GET", "/api/v1/orders/8", alice),
    ], [403, 403, 200, 403, 200, 200, 200, 200, 429], tokens)
    demo.step("IP restriction: allow only the partner network (node-a's pods); a client elsewhere is refused")
    nodes = demo.get_json("local", "get", "nodes")["items"]
    partner_net = next(n["spec"]["podCIDR"] for n in nodes if n["metadata"]["name"] == "node-a")
    text = (EXAMPLES / "50-ingress.yaml").read_text()
    policy = next(d for d in text.split("\n---\n") if "name: edge-networks" in d)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(policy.replace('notRemoteIpBlocks: ["10.0.0.0/8"]', f'notRemoteIpBlocks: ["{partner_net}"]'))
    try:
        demo.ambit("local", "apply", "-f", f.name)
    finally:
        os.unlink(f.name)
    wait_for("the gateway to refuse the stranger's network",
             lambda: demo.edge("internet/stranger", gateway, f"GET /api/v1/orders {tokens['bob, scope read:orders']}")
             [:1] == ["403 RBAC: access denied"], 30)
    demo.show_edge("internet/partner", gateway, [("GET", "/api/v1/orders", "bob, scope read:orders")], [200], tokens)
    demo.show_edge("internet/stranger", gateway, [("GET", "/api/v1/orders", "bob, scope read:orders")], [403], tokens)
    demo.step("The edge hop in the flows of node-a: the requests its gateway (and waypoint) refused, and why")
    demo.ambit("flows", "--node", "node-a", "--denied")


def main() -> int:
    if os.geteuid() != 0:
        print("ambit demo: needs root (network namespaces, cgroups, eBPF); run `sudo make demo`",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ambit-demo-") as tmp:
        demo = Demo(Path(tmp) / "cluster")
        status = 0
        try:
            run(demo)
            edge_act(demo)
        except (DemoFailed, subprocess.TimeoutExpired) as e:
            print(f"\nambit demo: FAILED: {e}", file=sys.stderr)
            logs = demo.state_dir / "nodes"
            if logs.is_dir():
                print(f"(node logs were under {logs}; they are removed with the cluster)", file=sys.stderr)
                for log in sorted(logs.glob("*/*.log")):
                    tail = log.read_text(errors="replace").splitlines()[-5:]
                    print(f"--- {log.relative_to(demo.state_dir)}\n" + "\n".join(tail), file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            status = 130
        finally:
            demo.step("Tear down: every namespace, cgroup, pinned map and process the cluster made")
            down = demo.ambit("local", "down", check=False)
            if down.returncode != 0:
                status = status or 1
    print(f"\nambit demo: {'done' if status == 0 else 'failed'} in {time.monotonic() - started:.0f}s",
          flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
