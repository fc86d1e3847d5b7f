"""Safe policy rollout on a real two-node local cluster (root): the flow history, `ambit policy
suggest`, `ambit policy simulate`, and denial spikes per source.

  node-a: roll/client, roll/newcomer (never seen before the policy), plain/outsider (not in
          the mesh), payments/order-service, payments/reporting, the payments waypoint
  node-b: roll/server (echo :9000), roll/neighbour (same node), payments/payment
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.e2e.mesh import ECHO, ENROLL, SLEEP, Cluster, ambit, namespace, pod, poll
from tests.e2e.test_waypoint import EXAMPLE as PAYMENTS
from tests.e2e.test_waypoint import SERVICE as PAYMENT_SERVICE
from tests.e2e.test_waypoint import requests as http_requests

SERVER = "roll/server"

# Many short connections, one after another, from inside a pod; prints how many got an answer.
FLOOD = """
import socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for i in range(n):
    try:
        s = socket.create_connection((ip, port), timeout=5)
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        ok += s.recv(100).startswith(b"peer=")
        s.close()
    except OSError:
        pass
print(ok)
"""


def manifests() -> list[dict[str, Any]]:
    return [
        namespace("roll", {ENROLL: "ambient"}),
        namespace("plain"),
        pod("roll", "server", "node-b", ECHO, sa="server", labels={"app": "server"}),
        pod("roll", "client", "node-a", SLEEP, sa="client", labels={"app": "client"}),
        pod("roll", "neighbour", "node-b", SLEEP, sa="neighbour", labels={"app": "neighbour"}),
        pod("roll", "newcomer", "node-a", SLEEP, sa="newcomer", labels={"app": "newcomer"}),
        pod("plain", "outsider", "node-a", SLEEP),
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.conftest import require_root

    require_root()
    tmp = tmp_path_factory.mktemp("ambit-rollout")
    c = Cluster(state=tmp / "state", tmp=tmp)
    try:
        c.local("up", timeout=120)
        c.apply(manifests())
        c.local("apply", "-f", str(PAYMENTS))
        poll(lambda: all(x["status"].get("phase") == "Running" for x in c.pods().values()), 30, "every pod Running")
        server = c.ip(SERVER)
        poll(lambda: c.talk("roll/client", server, 9000, "warm").ok, 30, "client -> server", interval=0.5)
        poll(lambda: c.cli("waypoints", "--node", "node-a", check=False).returncode == 0, 30,
             "the waypoint ready", interval=0.5)
        poll(lambda: http_requests(c, "payments/order-service", PAYMENT_SERVICE, 80, "GET /api/v1/charges")[0][0]
             == 200, 30, "order-service -> payment through the waypoint", interval=0.5)
        yield c
    finally:
        ambit("local", "down", "--state-dir", str(c.state), check=False, timeout=120)


def history(c: Cluster, node: str, *flags: str) -> dict[str, Any]:
    out: dict[str, Any] = c.cli_json("flows", "--since", "1h", "--node", node, *flags)
    return out


def recorded(c: Cluster, node: str, *flags: str, n: int = 1) -> list[dict[str, Any]]:
    def got() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = history(c, node, *flags)["items"]
        return items if len(items) >= n else []

    return poll(got, 15, f"{n} records on {node} for {flags}", interval=0.5)


def test_traffic_is_recorded_with_identities_verdicts_and_requests(cluster: Cluster) -> None:
    c = cluster
    server = c.ip(SERVER)
    for i in range(3):
        assert c.talk("roll/client", server, 9000, f"c{i}").ok
    for i in range(2):
        assert c.talk("roll/neighbour", server, 9000, f"n{i}").ok
    assert c.talk("plain/outsider", server, 9000, "plain").ok  # PERMISSIVE plaintext
    got = http_requests(c, "payments/order-service", PAYMENT_SERVICE, 80, "POST /api/v1/charges",
                        "GET /api/v1/charges/7")
    assert [s for s, _ in got] == [200, 200], got
    assert http_requests(c, "payments/reporting", PAYMENT_SERVICE, 80, "GET /api/v1/charges")[0][0] == 403

    rows = recorded(c, "node-b", "--source", "roll/client", "--destination", SERVER, n=4)
    r = rows[-1]
    assert r["kind"] == "conn" and r["direction"] == "inbound" and r["verdict"] == "allow"
    assert r["src_identity"] == "spiffe://cluster.local/ns/roll/sa/client" and r["dst_port"] == 9000
    assert r["dst_identity"] == "spiffe://cluster.local/ns/roll/sa/server" and r["mtls"] is True
    assert r["bytes_sent"] > 0 and r["t_end"] >= r["t_start"] and r["dst_meta"]["labels"] == {"app": "server"}
    plain = recorded(c, "node-b", "--source", "plain/outsider")[-1]
    assert plain["direction"] == "inbound_plaintext" and plain["mtls"] is False and plain["src_identity"] is None
    # the waypoint (its pod on node-a) reported its requests to node-a's agent
    # (the connections to the waypoint match these filters too: wait for the requests themselves,
    # which the agent takes from the waypoint's /requests at its own pace)
    want = {("payments/order-service", "POST", "/api/v1/charges"), ("payments/reporting", "GET", "/api/v1/charges")}

    def requests_recorded() -> dict[tuple[str, str, str], dict[str, Any]]:
        items = history(c, "node-a", "--destination", "payments/payment", "--source", "payments/*")["items"]
        got = {(x["src_workload"], x["method"], x["path"]): x for x in items if x["kind"] == "request"}
        return got if want <= set(got) else {}

    by = poll(requests_recorded, 15, "the waypoint's requests in node-a's history", interval=0.5)
    assert by[("payments/order-service", "POST", "/api/v1/charges")]["status"] == 200
    denied = by[("payments/reporting", "GET", "/api/v1/charges")]
    assert denied["verdict"] == "deny" and denied["status"] == 403 and denied["waypoint"] == "payments/waypoint"
    # the table
    out = c.cli("flows", "--since", "1h", "--node", "node-a", "--verdict", "deny").stdout
    assert "GET /api/v1/charges -> 403" in out, out


def test_the_history_survives_an_agent_restart_without_duplicates(cluster: Cluster) -> None:
    c = cluster
    before = recorded(c, "node-b", "--source", "roll/client", "--destination", SERVER, n=4)
    c.local("restart", "agent", "--node", "node-b")
    poll(lambda: c.cli("status", "--node", "node-b", check=False).returncode == 0, 30, "node-b's agent back",
         interval=0.5)
    time.sleep(3)  # the new agent has read the ztunnel's ring of closed connections by now
    after = history(c, "node-b", "--source", "roll/client", "--destination", SERVER)["items"]
    key = ("t_start", "src_port")
    assert [tuple(r[k] for k in key) for r in after] == [tuple(r[k] for k in key) for r in before]


def test_suggest_then_simulate_then_apply(cluster: Cluster) -> None:
    c = cluster
    suggested = c.tmp / "roll-suggested.yaml"
    c.cli("policy", "suggest", "--namespace", "roll", "--since", "1h", "--out", str(suggested))
    text = suggested.read_text()
    [policy] = [d for d in yaml.safe_load_all(text) if d]
    assert policy["metadata"]["name"] == "server-allow-observed", text
    assert policy["spec"]["selector"] == {"matchLabels": {"app": "server"}}
    rules = policy["spec"]["rules"]
    principals = sorted(p for r in rules for f in r["from"] for p in f["source"].get("principals", []))
    assert principals == ["cluster.local/ns/roll/sa/client", "cluster.local/ns/roll/sa/neighbour"], text
    assert [f["source"]["ipBlocks"] for r in rules for f in r["from"] if "ipBlocks" in f["source"]] == [
        [c.ip("plain/outsider")]]
    assert all(r["to"] == [{"operation": {"ports": ["9000"]}}] for r in rules)
    assert "# roll/client (cluster.local/ns/roll/sa/client):" in text

    r = c.cli("policy", "simulate", "-f", str(suggested), "--since", "1h", check=False)
    assert r.returncode == 0 and "no observed flow would be newly denied" in r.stdout, r.stdout + r.stderr

    c.local("apply", "-f", str(suggested))
    server = c.ip(SERVER)
    poll(lambda: not c.talk("roll/newcomer", server, 9000, "new").ok, 20, "the unobserved newcomer denied",
         interval=0.5)
    assert c.talk("roll/client", server, 9000, "still").ok
    assert c.talk("roll/neighbour", server, 9000, "still").ok
    assert c.talk("plain/outsider", server, 9000, "still").ok


def test_simulating_a_too_strict_policy_lists_exactly_what_it_breaks(cluster: Cluster) -> None:
    c = cluster
    strict = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "server-allow-observed", "namespace": "roll"},
              "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                       "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/roll/sa/client"]}}]}]}}
    path = c.tmp / "too-strict.yaml"
    path.write_text(yaml.safe_dump(strict))
    r = c.cli("policy", "simulate", "-f", str(path), "--since", "1h", "-o", "json", check=False)
    assert r.returncode == 3, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert sorted((g["source"], g["destination"]) for g in out["newly_denied"]) == [
        ("plain/outsider", SERVER), ("roll/neighbour", SERVER)], out["newly_denied"]
    n = next(g for g in out["newly_denied"] if g["source"] == "roll/neighbour")
    assert n["before"] == "allow: ALLOW roll/server-allow-observed rule 0", n
    assert n["after"] == "deny: no ALLOW rule matched (default deny)" and n["what"] == ["port 9000"]
    assert out["newly_allowed"] == []
    table = c.cli("policy", "simulate", "-f", str(path), check=False)
    assert table.returncode == 3 and "NEWLY DENIED" in table.stdout and "roll/neighbour" in table.stdout
    # deleting the suggested policy opens the server again: newly allowed, nothing breaks
    r = c.cli("policy", "simulate", "-f", str(path), "--delete", "-o", "json", check=False)
    assert r.returncode == 0 and any(g["source"] == "roll/newcomer" for g in json.loads(r.stdout)["newly_allowed"])


def test_suggest_writes_methods_and_paths_from_the_waypoints_requests(cluster: Cluster) -> None:
    c = cluster
    path = c.tmp / "payments-suggested.yaml"
    c.cli("policy", "suggest", "-n", "payments", "--out", str(path))
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    [payment] = [d for d in docs if d["spec"]["selector"] == {"matchLabels": {"app": "payment"}}]
    [rule] = payment["spec"]["rules"]
    assert rule["from"] == [{"source": {"principals": ["cluster.local/ns/payments/sa/order-service"]}}]
    # GET /api/v1/charges (and POST), GET /api/v1/charges/7: the id becomes a prefix
    ops = {tuple(o["operation"]["methods"]): o["operation"]["paths"] for o in rule["to"]}
    assert ops == {("GET",): ["/api/v1/charges/*"], ("GET", "POST"): ["/api/v1/charges"]}, ops
    assert all(o["operation"]["ports"] == ["8080"] for o in rule["to"])
    r = c.cli("policy", "simulate", "-f", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    c.local("apply", "-f", str(path))
    time.sleep(2)
    got = http_requests(c, "payments/order-service", PAYMENT_SERVICE, 80, "POST /api/v1/charges")
    assert got[0][0] == 200, got
    assert http_requests(c, "payments/reporting", PAYMENT_SERVICE, 80, "GET /api/v1/charges")[0][0] == 403


def test_a_probing_source_stands_out(cluster: Cluster) -> None:
    c = cluster
    server = c.ip(SERVER)
    for i in range(6):
        assert not c.talk("roll/newcomer", server, 9000, f"probe{i}").ok
    def spiking() -> Any:
        rows = c.cli_json("flows", "--denied", "--by-source", "--node", "node-a")["items"]
        top = rows[0] if rows else None
        return top if top and top["source"] == "roll/newcomer" and top["spike"] and top["recent"] >= 6 else None

    top = poll(spiking, 15, "roll/newcomer on top of node-a's denials", interval=0.5)
    assert top["targets"] == 1 and top["identity"] == "spiffe://cluster.local/ns/roll/sa/newcomer"
    table = c.cli("flows", "--denied", "--by-source", "--node", "node-a").stdout
    assert "roll/newcomer" in table and "SPIKE" in table


def test_the_history_stays_within_its_size_bound_under_a_flood(cluster: Cluster) -> None:
    """node-b's agent, replaced by one with a 1 MiB history, under a flood of short connections."""
    from agent import cgroups
    from agent import netns as nsops
    from agent.local.layout import Layout
    from agent.local.supervisor import REPO_ROOT, system_units

    c = cluster
    spec = next(s for s in system_units(Layout.load(c.state)) if s.name == "node-b/agent")
    db = c.tmp / "flood" / "flows.db"
    argv = [*spec.argv, "--flow-history", str(db), "--flow-history-max-mb", "1"]
    c.local("stop", "agent", "--node", "node-b")
    cgroups.create(spec.cgroup)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = open(c.tmp / "flood-agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=nsops.preexec(spec.netns, spec.cgroup / "cgroup.procs"))
    try:
        poll(lambda: c.cli("status", "--node", "node-b", check=False).returncode == 0, 30,
             "the replacement agent up", interval=0.5)
        sizes = []
        sent = 0
        t0 = time.monotonic()
        for _ in range(4):
            r = c.exec("roll/client", "python3", "-c", FLOOD, c.ip(SERVER), "9000", "800", timeout=300)
            assert r.returncode == 0, r.stderr
            sent += int(r.stdout.strip().splitlines()[-1])
            sizes.append(sum(p.stat().st_size for p in db.parent.glob("flows.db*")))
        elapsed = time.monotonic() - t0
        assert sent >= 3000, sent
        def settled() -> Any:
            data = history(c, "node-b", "--limit", "1")
            return data if data["history"]["written"] + data["lost"]["ztunnel"] >= sent else None

        data = poll(settled, 30, "every connection written or counted as missed", interval=1)
        summary = data["history"]
        sizes.append(sum(p.stat().st_size for p in db.parent.glob("flows.db*")))
        print(f"\nflood: {sent} connections in {elapsed:.0f}s ({sent / elapsed:.0f}/s); history {summary}; "
              f"missed {data['lost']}; sizes on disk {sizes}")
        # Every connection is written or counted as missed (the agent reads the ztunnel's ring of
        # recently closed connections; on a loaded machine a slow read can miss some, and says so).
        assert summary["written"] >= 0.5 * sent, data
        assert max(sizes) <= 2**20 and summary["disk_bytes"] <= 2**20, (sizes, summary)
        assert summary["pruned_by_size"] > 0 and summary["dropped"] == 0
        assert 500 < summary["rows"] < sent
        # the newest are kept
        newest = history(c, "node-b", "--source", "roll/client", "--limit", "1")["items"][-1]
        assert newest["t_end"] > time.time() - 60
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        c.local("start", "agent", "--node", "node-b")
