"""The observability component works on ambit's own metrics, checked with Prometheus' promtool.

- A live ztunnel (two on loopback, tests/integration/ztunnel_harness.py): a
  connection addressed to a Service is labelled with it on both reporters; a
  denial and a refusal carry the source workload; `promtool check metrics`
  finds nothing to lint in its /metrics.
- The agent's /metrics (bypass drops per pod, redirected pods, the ztunnel's
  readiness) lints clean too.
- The PrometheusRule: `promtool check rules`, and `promtool test rules` with,
  for every alert, series that fire it and series that do not.
- Every metric and label the rules and the dashboard use is one these
  processes export.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentMetrics, NodeView, PodDrops
from tests.integration.test_ztunnel import http_get
from tests.integration.ztunnel_harness import Mesh, echo_server, loopback_mesh
from tests.tools import promtool
from waypoint.telemetry import RequestFacts, WaypointMetrics

OBS = Path(__file__).resolve().parents[2] / "daemonset" / "components" / "observability"

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]
"""


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with loopback_mesh(tmp_path) as m:
        await m.wait_ready("node-a")
        await m.wait_ready("node-b")
        yield m


async def scrape(mesh: Mesh, node: str) -> str:
    status, body = await http_get(mesh.ztunnels[node].addresses["metrics"], "/metrics")
    assert status == 200
    return body.decode()


def samples(text: str, name: str) -> list[dict[str, str]]:
    return [{**s.labels, "_value": str(s.value)} for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


def check_metrics(text: str) -> None:
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


async def test_live_ztunnel_labels_services_and_sources_and_lints_clean(mesh: Mesh) -> None:
    async with echo_server(mesh.pods["shop/server"], 8080):
        r, w = await mesh.socks5_connect("node-a", mesh.pods["shop/client"], "web.shop.svc.cluster.local", 80)
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        w.close()
        await w.wait_closed()
        # a denial (the destination's DENY policy), and a refusal (no such Service)
        mesh.write("policy", DENY_CLIENT)
        for _ in range(200):
            if mesh.ztunnels["node-b"].store.current.policies.authz:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(ConnectionRefusedError):
            await mesh.socks5_connect("node-a", mesh.pods["shop/client"], mesh.pods["shop/server"], 8080)
        with pytest.raises(ConnectionRefusedError):
            await mesh.socks5_connect("node-a", mesh.pods["shop/client"], "nope.shop.svc.cluster.local", 80)
    for node, reporter in (("node-a", "source"), ("node-b", "destination")):
        text = await scrape(mesh, node)
        opened = [s for s in samples(text, "istio_tcp_connections_opened_total") if s["reporter"] == reporter]
        assert opened, text
        # the destination sees only the pod's address: it names the Service that targets the port
        assert {(s["destination_service"], s["destination_service_name"], s["destination_service_namespace"])
                for s in opened} == {("web.shop.svc.cluster.local", "web", "shop")}, (node, opened)
        check_metrics(text)
    denials = samples(await scrape(mesh, "node-b"), "ambit_policy_denials_total")
    assert [(d["direction"], d["source_workload"], d["source_workload_namespace"], d["source_principal"],
             d["policy"]) for d in denials] == [
        ("inbound", "client", "shop", "spiffe://cluster.local/ns/shop/sa/client", "shop/deny-client")]
    refused = samples(await scrape(mesh, "node-a"), "ambit_connections_refused_total")
    by_reason = {r["reason"]: r for r in refused}
    assert by_reason["unknown_name"]["source_workload"] == "client"
    assert by_reason["unknown_name"]["source_workload_namespace"] == "shop"


def agent_view(ready: bool = True) -> NodeView:
    return NodeView(node="node-a", drops=(PodDrops("shop", "legacy-0", egress=3), PodDrops("shop", "web-0")),
                    redirected=2, retrying=1, ztunnel_ready=ready)


def test_agent_metrics_report_drops_per_pod_and_lint_clean() -> None:
    text = AgentMetrics(agent_view).render().decode()
    drops = {(s["namespace"], s["pod"], s["direction"]): float(s["_value"])
             for s in samples(text, "ambit_bypass_drops_total")}
    assert drops[("shop", "legacy-0", "egress")] == 3 and drops[("shop", "web-0", "ingress")] == 0
    assert len(drops) == 6
    assert {s["state"]: float(s["_value"]) for s in samples(text, "ambit_agent_pods")} == {
        "redirected": 2, "retrying": 1}
    assert float(samples(text, "ambit_agent_ztunnel_ready")[0]["_value"]) == 1
    check_metrics(text)


# -- the rules


def rule_groups() -> dict[str, Any]:
    rule = yaml.safe_load((OBS / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    return {"groups": rule["spec"]["groups"]}


def alerts() -> set[str]:
    return {r["alert"] for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r}


def test_rules_check(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    r = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(alerts())} rules found" in r.stdout


# promtool unit tests: for every alert, series that fire it and series (of another
# workload, node or identity) that must not. Each `fires` entry: the alert, the
# series, and the labels of the one alert expected at `at`.
Series = list[dict[str, str]]
CASES: list[tuple[str, Series, str, list[dict[str, str]]]] = [
    # client probes: 0 denials an hour ago, then 60/min; web: steady 60/min for 2 h (no spike)
    ("AmbitDenialSpike", [
        {"series": 'ambit_policy_denials_total{direction="inbound",source_workload="client",'
                   'source_workload_namespace="shop",policy="shop/deny"}', "values": "0x60 0+60x30"},
        {"series": 'ambit_policy_denials_total{direction="inbound",source_workload="web",'
                   'source_workload_namespace="shop",policy="shop/deny"}', "values": "0+60x90"},
        # the source side's count of the same denials is not counted twice
        {"series": 'ambit_policy_denials_total{direction="outbound",source_workload="quiet",'
                   'source_workload_namespace="shop",policy="-"}', "values": "0x60 0+600x30"},
    ], "80m", [{"source_workload": "client", "source_workload_namespace": "shop"}]),
    ("AmbitWaypointDenialSpike", [
        {"series": 'ambit_waypoint_denials_total{source_workload="client",source_workload_namespace="shop",'
                   'response_code="403"}', "values": "0x60 0+60x30"},
        {"series": 'ambit_waypoint_denials_total{source_workload="web",source_workload_namespace="shop",'
                   'response_code="403"}', "values": "0+1x90"},
    ], "80m", [{"source_workload": "client", "source_workload_namespace": "shop"}]),
    ("AmbitBypassDrops", [
        {"series": 'ambit_bypass_drops_total{node="node-a",namespace="shop",pod="legacy-0",direction="egress"}',
         "values": "0x5 1+1x10"},
        {"series": 'ambit_bypass_drops_total{node="node-a",namespace="shop",pod="web-0",direction="egress"}',
         "values": "0x15"},
    ], "12m", [{"node": "node-a", "namespace": "shop", "pod": "legacy-0", "direction": "egress"}]),
    ("AmbitCertificateExpiringSoon", [
        {"series": 'ambit_cert_expiry_seconds{instance="10.0.0.1:15020",identity="spiffe://cluster.local/ns/shop/sa/web"}',
         "values": "20000-60x30"},
        {"series": 'ambit_cert_expiry_seconds{instance="10.0.0.1:15020",identity="spiffe://cluster.local/ns/shop/sa/db"}',
         "values": "80000-60x30"},
    ], "20m", [{"instance": "10.0.0.1:15020", "identity": "spiffe://cluster.local/ns/shop/sa/web"}]),
    ("AmbitCertificateExpiring", [
        {"series": 'ambit_cert_expiry_seconds{instance="10.0.0.1:15020",identity="spiffe://cluster.local/ns/shop/sa/web"}',
         "values": "4200-120x10"},
        {"series": 'ambit_cert_expiry_seconds{instance="10.0.0.1:15020",identity="spiffe://cluster.local/ns/shop/sa/db"}',
         "values": "7200-60x10"},
    ], "9m", [{"instance": "10.0.0.1:15020", "identity": "spiffe://cluster.local/ns/shop/sa/web"}]),
    ("AmbitZtunnelNotReady", [
        {"series": 'ambit_agent_ztunnel_ready{node="node-a",instance="10.0.0.1:15014"}', "values": "1x3 0x10"},
        {"series": 'ambit_agent_ztunnel_ready{node="node-b",instance="10.0.0.2:15014"}', "values": "1x13"},
    ], "10m", [{"node": "node-a"}]),
    ("AmbitZtunnelDown", [
        {"series": 'up{job="ambit-system/ambit-ztunnel",instance="10.0.0.1:15020"}', "values": "1x3 0x10"},
        {"series": 'up{job="ambit-system/ambit-ztunnel",instance="10.0.0.2:15020"}', "values": "1x13"},
        {"series": 'up{job="ambit-system/ambit-agent",instance="10.0.0.2:15014"}', "values": "0x13"},
    ], "10m", [{"job": "ambit-system/ambit-ztunnel", "instance": "10.0.0.1:15020"}]),
    ("AmbitAgentDown", [
        {"series": 'up{job="ambit-system/ambit-agent",instance="10.0.0.1:15014"}', "values": "1x3 0x10"},
        {"series": 'up{job="ambit-system/ambit-agent",instance="10.0.0.2:15014"}', "values": "1x13"},
    ], "10m", [{"job": "ambit-system/ambit-agent", "instance": "10.0.0.1:15014"}]),
    ("AmbitWaypointDown", [
        {"series": 'up{job="ambit-system/ambit-waypoint",namespace="shop",pod="waypoint-1",instance="10.1.0.9:15020"}',
         "values": "1x3 0x10"},
        {"series": 'up{job="ambit-system/ambit-waypoint",namespace="shop",pod="waypoint-2",instance="10.1.0.8:15020"}',
         "values": "1x13"},
    ], "10m", [{"job": "ambit-system/ambit-waypoint", "namespace": "shop", "pod": "waypoint-1",
                "instance": "10.1.0.9:15020"}]),
]


def test_every_alert_has_a_case() -> None:
    assert {c[0] for c in CASES} == alerts()


@pytest.mark.parametrize(("alert", "series", "at", "fired"), CASES, ids=[c[0] for c in CASES])
def test_rules_fire_and_do_not(tmp_path: Path, alert: str, series: Series, at: str,
                               fired: list[dict[str, str]]) -> None:
    groups = rule_groups()
    severity = {r["alert"]: r["labels"]["severity"] for g in groups["groups"] for r in g["rules"] if "alert" in r}
    for g in groups["groups"]:
        for rule in g["rules"]:
            # promtool compares annotations too, rendered; their templates are checked by
            # `promtool check rules` (test_rules_check), the firing here
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    quiet_at = "1m"  # before anything went wrong: nothing fires
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": quiet_at, "alertname": alert, "exp_alerts": []},
            {"eval_time": at, "alertname": alert,
             "exp_alerts": [{"exp_labels": {**labels, "severity": severity[alert]}} for labels in fired]},
        ]}]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    r = subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the rules and the dashboard name only what is exported


def exported() -> dict[str, set[str]]:
    """Every family the ztunnel, the agent and the waypoint export, with its label names
    (each fed one event of every kind through its real API)."""
    from ztunnel.conntrack import INBOUND, ConnRecord
    from ztunnel.metrics import Metrics
    from ztunnel.refusal import Refusal

    out: dict[str, set[str]] = {}

    def add(text: str) -> None:
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                out.setdefault(s.name, set()).update(s.labels)

    m = Metrics()
    allowed = ConnRecord(INBOUND, "10.0.0.1", 40000, "10.0.0.2", 8080, decision="allow")
    m.connection_opened(allowed)
    allowed.counters.received = allowed.counters.sent = 1
    m.connection_closed(allowed)
    m.connection_closed(ConnRecord(INBOUND, "10.0.0.1", 40001, "10.0.0.2", 8080, decision="deny"))
    m.refuse(Refusal.NO_ENDPOINTS)
    m.set_cert_source(lambda: [("spiffe://cluster.local/ns/shop/sa/web", 2e9)])
    add(m.render(1e9).decode())
    add(AgentMetrics(agent_view).render().decode())
    w = WaypointMetrics()
    w.record(RequestFacts(status=403, decision="deny", source_workload="shop/client"))
    add(generate_latest(w.registry).decode())
    return out


QUERY_METRIC = re.compile(r"\b((?:ambit|istio)_[a-z_]+)")
BY = re.compile(r"\bby \(([^)]*)\)")


def queries() -> list[str]:
    out = [r["expr"] for g in rule_groups()["groups"] for r in g["rules"]]
    dash = json.loads((OBS / "dashboard.json").read_text())
    out += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return out


def test_rules_and_dashboard_use_exported_metrics_and_labels() -> None:
    have = exported()
    for q in queries():
        names = set(QUERY_METRIC.findall(q))
        for name in names:
            assert name in have, f"{name} (in {q!r}) is exported by no ambit process"
        for group in BY.findall(q):
            for label in (x.strip() for x in group.split(",")):
                # labels Prometheus adds itself (instance, job) or the scraped pod's
                if label in ("instance", "job"):
                    continue
                assert any(label in have[n] for n in names), f"label {label} of {q!r} is on none of {names}"
