"""A waypoint on a real two-node local cluster (root): examples/40-payments.yaml, where only
order-service may POST or GET /api/v1/charges on the payment service.

  node-a: payments/order-service, payments/reporting, the waypoint's pod
  node-b: payments/payment (an HTTP/1.1 app)
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.mesh import Cluster, ambit, poll

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "40-payments.yaml"
SERVICE = "payment.payments.svc.cluster.local"

# Requests one after another on one keep-alive connection; prints [[status, body], ...].
REQUESTS = r"""
import http.client, json, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
try:
    c = http.client.HTTPConnection(host, port, timeout=5)
    for spec in sys.argv[3:]:
        method, path = spec.split(" ", 1)
        c.request(method, path, body=b"{}" if method in ("POST", "PUT") else None)
        r = c.getresponse()
        out.append([r.status, r.read().decode(errors="replace")])
except Exception as e:
    out.append([0, repr(e)])
print(json.dumps(out))
"""


def requests(c: Cluster, pod: str, host: str, port: int, *specs: str) -> list[tuple[int, str]]:
    r = c.exec(pod, "python3", "-c", REQUESTS, host, str(port), *specs, timeout=60)
    assert r.returncode == 0, r.stderr
    return [(int(s), b) for s, b in json.loads(r.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import require_root

    require_root()
    tmp = tmp_path_factory.mktemp("ambit-waypoint")
    c = Cluster(state=tmp / "state", tmp=tmp)
    try:
        c.local("up", timeout=120)
        c.local("apply", "-f", str(EXAMPLE))
        poll(lambda: all(x["status"].get("phase") == "Running" for x in c.pods().values()), 30, "every pod Running")
        poll(lambda: c.cli("waypoints", "--node", "node-a", check=False).returncode == 0, 30,
             "the waypoint ready", interval=0.5)
        poll(lambda: requests(c, "payments/order-service", SERVICE, 80, "GET /api/v1/charges")[0][0] == 200, 30,
             "order-service -> payment through the waypoint", interval=0.5)
        yield c
    finally:
        ambit("local", "down", "--state-dir", str(c.state), check=False, timeout=120)


def test_requests_are_decided_one_by_one(cluster: Cluster) -> None:
    c = cluster
    got = requests(c, "payments/order-service", SERVICE, 80,
                   "POST /api/v1/charges", "DELETE /api/v1/charges", "GET /api/v1/charges/7", "GET /admin")
    assert [s for s, _ in got] == [200, 403, 200, 403], got
    assert got[1][1] == "RBAC: access denied"
    seen = json.loads(got[0][1])
    # the app sees the original client's address (a known gap in Istio ambient)
    assert seen["x-forwarded-for"] == c.ip("payments/order-service"), seen
    # another principal: denied per request
    assert [s for s, _ in requests(c, "payments/reporting", SERVICE, 80, "GET /api/v1/charges")] == [403]


def test_the_pod_cannot_be_reached_around_its_waypoint(cluster: Cluster) -> None:
    c = cluster
    got = requests(c, "payments/order-service", c.ip("payments/payment"), 8080, "GET /api/v1/charges")
    assert got[0][0] == 0, f"the pod answered around its waypoint: {got}"
    recs = poll(lambda: [r for r in c.access_log("node-b") if r.get("dst_workload") == "payments/payment"
                         and r.get("decision") == "deny"], 5, "node-b's denial")
    assert "must come through it" in recs[-1]["reason"], recs[-1]


def test_the_cli_shows_the_waypoint_hop_and_explains_a_denial(cluster: Cluster) -> None:
    c = cluster
    requests(c, "payments/reporting", SERVICE, 80, "GET /api/v1/charges")
    flows = c.cli_json("flows", "--node", "node-a")
    assert any(f.get("waypoint") == "payments/waypoint" and f.get("source_pod") == "payments/reporting"
               for f in flows["items"]), flows["items"]
    denied = [r for r in flows["requests"] if r["src_workload"] == "payments/reporting" and r["status"] == 403]
    assert denied and denied[-1]["path"] == "/api/v1/charges", flows["requests"]
    r = c.cli("policy", "check", "--from", "payments/reporting", "--to", "payments/payment:8080", "--method", "GET",
              "--path", "/api/v1/charges", "--node", "node-b", check=False)
    assert r.returncode == 3 and "judged by waypoint payments/waypoint" in r.stdout, r.stdout
    r = c.cli("policy", "check", "--from", "payments/order-service", "--to", "payments/payment:8080", "--method",
              "POST", "--path", "/api/v1/charges", "--node", "node-b", check=False)
    assert r.returncode == 0, r.stdout
    wps = c.cli_json("waypoints", "--node", "node-a")["items"]
    assert wps[0]["waypoint"] == "payments/waypoint" and wps[0]["ready"] == "yes"
    assert "service payments/payment" in wps[0]["used_by"], wps


def test_another_pod_cannot_read_who_called_what(cluster: Cluster) -> None:
    # the waypoint's request records (methods, paths, identities, verdicts) are for its node's
    # agent only: asked from another pod, by its own means, over the network (through the node's
    # ztunnel, as its traffic goes), neither the metrics port nor the admin port gives them
    c = cluster
    assert requests(c, "payments/order-service", SERVICE, 80, "GET /api/v1/charges")[0][0] == 200  # there is one
    wp = c.ip("payments/waypoint-waypoint")
    (metrics,) = requests(c, "payments/reporting", wp, 15020, "GET /requests?after=0")
    assert metrics[0] == 404 and "/api/v1/charges" not in metrics[1], metrics
    (admin,) = requests(c, "payments/reporting", wp, 15000, "GET /requests?after=0")
    assert admin[0] == 0, f"the waypoint's admin answered another pod: {admin}"
    # while its node's agent has them (it takes them about once a second)
    def collected() -> bool:
        rows = c.cli_json("flows", "--since", "1h", "--node", "node-a", "--source", "payments/order-service")["items"]
        return any(r["kind"] == "request" and r["path"] == "/api/v1/charges" for r in rows)

    poll(collected, 15, "the request in node-a's history", interval=0.5)


def test_with_the_waypoint_stopped_traffic_is_refused(cluster: Cluster) -> None:
    c = cluster
    pid = c.pid("pod.payments.waypoint-waypoint.pid")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    def refused() -> Any:
        got = requests(c, "payments/order-service", SERVICE, 80, "GET /api/v1/charges")
        return got[0][0] == 0 and got

    poll(refused, 20, "requests refused with the waypoint down", interval=0.5)
    recs = poll(lambda: [r for r in c.access_log("node-a") if r.get("src_workload") == "payments/order-service"
                         and r.get("response_flags") == "UH"], 10, "node-a's refusal naming the waypoint")
    assert "waypoint payments/waypoint" in recs[-1]["reason"], recs[-1]
    r = c.cli("waypoints", "--node", "node-a", check=False)
    assert r.returncode == 4 and "no running pod" in r.stdout, r.stdout
