"""The operator's view of a node: `ambit flows|workloads|certs|policies|policy check|status|version`.

Every command reads the node's own admin endpoints (the agent's on
127.0.0.1:15010, the ztunnel's on 127.0.0.1:15000), on this machine or, with
`--node NAME`, inside a node of the local cluster. Tables by default,
`-o json` for scripts; an unreachable agent or ztunnel is a clear error and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.flowjoin import dry_run_words
from ambit.args import CliError
from ambit.http import request_on

if TYPE_CHECKING:
    from ambit.policy import Verdict

AGENT_ADMIN_PORT = 15010
ZTUNNEL_ADMIN_PORT = 15000
WAYPOINT_ADMIN_PORT = 15000  # on the waypoint pod's own 127.0.0.1
DEFAULT_STATE_DIR = "/run/ambit/local"

Connector = Callable[[str, int, float], socket.socket]


def _plain_connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


@dataclass
class NodeAdmin:
    """HTTP GETs to a node's admin endpoints (127.0.0.1 of the node's network namespace)."""

    label: str
    connect: Connector = _plain_connect
    host: str = "127.0.0.1"
    timeout: float = 3.0

    def get(self, port: int, path: str, what: str) -> Any:
        try:
            sock = self.connect(self.host, port, self.timeout)
        except OSError as e:
            raise CliError(
                f"cannot reach the {what} admin endpoint on {self.label} "
                f"({self.host}:{port}): {e.strerror or e}. Is the {what} running on this node?"
            ) from e
        try:
            status, body = request_on(sock, self.host, "GET", path)
        except (OSError, ValueError) as e:
            raise CliError(f"the {what} on {self.label} did not answer {path}: {e}") from e
        if status >= 400:
            detail = (body if isinstance(body, str) else json.dumps(body)).strip()[:300]
            raise CliError(f"the {what} on {self.label} answered {path} with {status}: {detail}")
        if isinstance(body, str):
            raise CliError(f"the {what} on {self.label} sent invalid JSON for {path}: {body[:100]!r}")
        return body

    def waypoint(self, path: str) -> Any:
        return self.get(WAYPOINT_ADMIN_PORT, path, "waypoint")

    def agent(self, path: str) -> Any:
        return self.get(AGENT_ADMIN_PORT, path, "agent")

    def ztunnel(self, path: str) -> Any:
        return self.get(ZTUNNEL_ADMIN_PORT, path, "ztunnel")


def node_admin(args: argparse.Namespace) -> NodeAdmin:
    """This machine's node, or a local-cluster node's namespace with `--node`."""
    if not getattr(args, "node", None):
        return NodeAdmin(label="this node")
    from agent.local.runtime import node_connector

    try:
        connect = node_connector(Path(args.state_dir), args.node)
    except Exception as e:  # a missing cluster or node: say which
        raise CliError(f"local cluster node {args.node!r} in {args.state_dir}: {e}") from e
    return NodeAdmin(label=f"node {args.node}", connect=connect)


def waypoint_admins(args: argparse.Namespace, admin: NodeAdmin, waypoint: str | None = None,
                    node: str | None = None) -> list[NodeAdmin]:
    """The admin endpoints of ready waypoint pods (all, or of `waypoint` "ns/name"; on `node` only),
    reachable from here: inside their pods' network namespaces in the local cluster."""
    if not getattr(args, "node", None):
        return []  # on a real node the waypoints' admin ports are their pods' own loopback
    from agent.local.runtime import pod_connector

    dump = admin.ztunnel("/config_dump")
    by_ip = {w["ip"]: w for w in dump.get("workloads", [])}
    out = []
    for wp in dump.get("waypoints", []):
        if waypoint is not None and wp.get("uid") != waypoint:
            continue
        for ip in wp.get("addresses") or []:
            w = by_ip.get(ip)
            if w is None or (node is not None and w.get("node") != node):
                continue
            try:
                connect = pod_connector(Path(args.state_dir), w["namespace"], w["name"])
            except Exception:  # a pod that is going away: skip it
                continue
            out.append(NodeAdmin(label=f"waypoint {wp['uid']} ({w['uid']})", connect=connect))
    return out


def gateway_admins(args: argparse.Namespace, admin: NodeAdmin, node: str | None = None) -> list[NodeAdmin]:
    """The admin endpoints of ingress gateway pods (pods of a Gateway that are no waypoint's; on
    `node` only), reachable from here: inside their pods' network namespaces in the local cluster."""
    if not getattr(args, "node", None):
        return []
    from agent.local.runtime import pod_connector

    dump = admin.ztunnel("/config_dump")
    waypoint_ips = {ip for wp in dump.get("waypoints", []) for ip in wp.get("addresses") or []}
    out = []
    for w in dump.get("workloads", []):
        gw = (w.get("labels") or {}).get("gateway.networking.k8s.io/gateway-name")
        if not gw or w.get("ip") in waypoint_ips or (node is not None and w.get("node") != node):
            continue
        try:
            connect = pod_connector(Path(args.state_dir), w["namespace"], w["name"])
        except Exception:  # a pod that is going away: skip it
            continue
        out.append(NodeAdmin(label=f"gateway {w['namespace']}/{gw} ({w['uid']})", connect=connect))
    return out


# ---------------------------------------------------------------------------
# output


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, list | tuple):
        return ", ".join(_cell(x) for x in v) or "-"
    return str(v)


def render(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    title: str,
    raw: Any = None,
) -> int:
    """Print rows as a table (columns: (key, header)) or the raw JSON with -o json."""
    if args.output == "json":
        json.dump(raw if raw is not None else {"items": rows}, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
        return 0
    console().print(make_table(rows, columns, title))
    return 0


def console() -> Console:
    """Rich console; when piped (no terminal width), wide enough that identities stay on one line."""
    return Console() if sys.stdout.isatty() else Console(width=250)


def make_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for _, header in columns:
        table.add_column(header, overflow="fold")
    n = 0
    for r in rows:
        table.add_row(*(_cell(r.get(k)) for k, _ in columns))
        n += 1
    if n == 0:
        table.caption = "(none)"
    return table


def human_bytes(n: Any) -> str:
    try:
        v = float(n)
    except (TypeError, ValueError):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return f"{v:.1f}GiB"


def human_age(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return "-"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


# ---------------------------------------------------------------------------
# commands

FLOW_COLUMNS = [
    ("source", "SOURCE"),
    ("source_identity", "SOURCE IDENTITY"),
    ("destination", "DESTINATION"),
    ("destination_identity", "DESTINATION IDENTITY"),
    ("port", "PORT"),
    ("security", "SECURITY"),
    ("via", "VIA"),
    ("verdict", "VERDICT"),
    ("policy", "POLICY"),
    ("sent", "SENT"),
    ("received", "RECEIVED"),
    ("rtt", "RTT"),
    ("age", "AGE"),
]


# `ambit flows --denied`: refused by policy (the ztunnel) or dropped (the kernel)
DENIED_VERDICTS: tuple[Verdict, ...] = ("deny", "dropped")


def flow_rows(flows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Filter (--denied, --pod) and format the agent's joined flow records for the table."""
    out = []
    for f in flows:
        if not _keep_raw(f, args):
            continue
        rtt = f.get("rtt_us")
        out.append(
            {
                "source": f.get("source_pod") or f.get("source_addr"),
                "source_identity": f.get("source_identity"),
                "destination": f.get("destination_pod") or f.get("destination_addr"),
                "destination_identity": f.get("destination_identity"),
                "port": f.get("destination_port"),
                "security": f.get("security"),
                "via": f"waypoint {f['waypoint']}" if f.get("waypoint") else None,
                "verdict": f.get("verdict"),
                "policy": with_dry_run(f.get("policy"), f.get("dry_run")),
                "sent": human_bytes(f.get("bytes_sent")),
                "received": human_bytes(f.get("bytes_received")),
                "rtt": f"{rtt / 1000:.2f}ms" if isinstance(rtt, int | float) and rtt else "-",
                "age": human_age(f.get("age_seconds")),
            }
        )
    return out


def cmd_flows(args: argparse.Namespace) -> int:
    from agent import rollout  # the history (--since, --by-source); it imports this module

    if rollout.history_mode(args):
        return rollout.cmd_flow_history(args)
    admin = node_admin(args)
    title = f"flows on {admin.label}"

    def fetch() -> tuple[list[dict[str, Any]], Any]:
        data = admin.agent("/flows")
        flows = data.get("items", data) if isinstance(data, dict) else data
        return flow_rows(list(flows), args), data

    if not args.watch:
        rows, raw = fetch()
        requests = waypoint_requests(args, admin)
        if args.output == "json":
            return render(args, rows, FLOW_COLUMNS, title, raw={
                "items": [r for r in raw.get("items", []) if _keep_raw(r, args)], "requests": requests})
        render(args, rows, FLOW_COLUMNS, title)
        if requests:
            console().print(make_table(request_rows(requests), REQUEST_COLUMNS,
                                       f"requests decided by waypoints and gateways on {admin.label}"))
        return 0
    if args.output == "json":
        raise CliError("--watch shows a live table; use it without -o json (or poll with -o json)")
    with Live(make_table(fetch()[0], FLOW_COLUMNS, title), refresh_per_second=4) as live:
        deadline = time.monotonic() + args.watch_seconds if args.watch_seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(args.interval)
            live.update(make_table(fetch()[0], FLOW_COLUMNS, title))
    return 0


REQUEST_COLUMNS = [
    ("source", "SOURCE"),
    ("via", "VIA"),
    ("destination", "DESTINATION"),
    ("request", "REQUEST"),
    ("status", "STATUS"),
    ("verdict", "VERDICT"),
    ("policy", "POLICY"),
    ("age", "AGE"),
]


def waypoint_requests(args: argparse.Namespace, admin: NodeAdmin) -> list[dict[str, Any]]:
    """The recent requests of the waypoints and ingress gateways that run on this node (the L7 hop
    of its flows, and the edge hop into the mesh)."""
    out: list[dict[str, Any]] = []
    node = getattr(args, "node", None)
    for wp in [*waypoint_admins(args, admin, node=node), *gateway_admins(args, admin, node=node)]:
        try:
            items = wp.waypoint("/requests").get("items", [])
        except CliError:
            continue  # a waypoint that does not answer has nothing to show
        for r in items:
            if args.denied and r.get("decision") != "deny":
                continue
            if args.pod and args.pod not in (r.get("src_workload"), r.get("dst_workload")):
                continue
            out.append(r)
    return sorted(out, key=lambda r: r.get("time") or 0)


def request_rows(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = time.time()
    return [{
        "source": r.get("src_workload") or r.get("client_ip"),
        "via": r.get("waypoint") or (f"gateway {r['gateway']}" if r.get("gateway") else None),
        "destination": r.get("dst_service") or r.get("dst_workload"),
        "request": (f"{r.get('method')} {r.get('path')}" if r.get("protocol") != "tcp"
                    else f"TCP :{r.get('dst_port')} (not HTTP)"),
        "status": r.get("status"),
        "verdict": r.get("decision"),
        "policy": with_dry_run(f"{r['policy']} rule {r['rule']}" if r.get("policy") and r.get("rule") is not None
                               else r.get("policy") or r.get("reason"), r.get("dry_run")),
        "age": human_age(now - float(r.get("time") or now)),
    } for r in requests]


def with_dry_run(policy: str | None, dry_run: Any) -> str | None:
    """The POLICY cell, marked with what dry-run policies would have decided:
    `shop/allow rule 0 (dry-run: would deny by shop/strict rule 1)` (parentheses: a table cell
    reads square brackets as markup)."""
    words = dry_run_words(dry_run if isinstance(dry_run, list) else None)
    if words is None:
        return policy
    return f"{policy or '-'} (dry-run: {words})"


def cmd_waypoints(args: argparse.Namespace) -> int:
    admin = node_admin(args)
    dump = admin.ztunnel("/config_dump")
    users: dict[str, list[str]] = {}
    for w in dump.get("workloads", []):
        if w.get("waypoint"):
            users.setdefault(f"{w['namespace']}/{w['waypoint']}", []).append(w["uid"])
    for s in dump.get("services", []):
        if s.get("waypoint"):
            users.setdefault(f"{s['namespace']}/{s['waypoint']}", []).append(f"service {s['namespace']}/{s['name']}")
    rows = []
    for wp in dump.get("waypoints", []):
        ready = "yes" if wp.get("ready") else ("NO: no such Gateway" if not wp.get("exists") else "NO: no running pod")
        rows.append({"waypoint": wp.get("uid"), "for": wp.get("for"), "identity": wp.get("identity"),
                     "addresses": wp.get("addresses"), "ready": ready,
                     "used_by": sorted(users.get(str(wp.get("uid")), []))})
    cols = [("waypoint", "WAYPOINT"), ("for", "FOR"), ("identity", "IDENTITY"), ("addresses", "ADDRESSES"),
            ("ready", "READY"), ("used_by", "USED BY")]
    render(args, rows, cols, f"waypoints known to {admin.label}", raw={"items": rows})
    return 0 if all(r["ready"] == "yes" for r in rows) else 4


def _keep_raw(f: dict[str, Any], args: argparse.Namespace) -> bool:
    """The --denied and --pod filters, for the table and for -o json alike."""
    if args.denied and f.get("verdict") not in DENIED_VERDICTS:
        return False
    return not (args.pod and args.pod not in (f.get("source_pod"), f.get("destination_pod")))


def cmd_workloads(args: argparse.Namespace) -> int:
    admin = node_admin(args)
    data = admin.ztunnel("/workloads")
    items = data.get("items", data) if isinstance(data, dict) else data
    rows = [
        {
            "workload": w.get("uid") or f"{w.get('namespace')}/{w.get('name')}",
            "ip": w.get("ip"),
            "node": w.get("node"),
            "identity": w.get("identity"),
            "enrolled": "yes" if w.get("enrolled") else "no",
            "local": "yes" if w.get("local") else "",
            "waypoint": w.get("waypoint"),
        }
        for w in items
    ]
    cols = [("workload", "WORKLOAD"), ("ip", "IP"), ("node", "NODE"), ("identity", "IDENTITY"),
            ("enrolled", "ENROLLED"), ("local", "LOCAL"), ("waypoint", "WAYPOINT")]
    return render(args, rows, cols, f"workloads known to the ztunnel on {admin.label}", raw=data)


def cmd_certs(args: argparse.Namespace) -> int:
    admin = node_admin(args)
    data = admin.ztunnel("/certs")
    items = data.get("items", data) if isinstance(data, dict) else data
    now = time.time()
    rows = []
    for c in items:
        renewal = c.get("next_renewal")
        rows.append(
            {
                "identity": c.get("identity"),
                "state": c.get("state"),
                "serial": c.get("serial"),
                "not_after": c.get("not_after"),
                "renewal": human_age(_epoch(renewal) - now) if renewal else "-",
                "error": c.get("last_error"),
            }
        )
    cols = [("identity", "IDENTITY"), ("state", "STATE"), ("serial", "SERIAL"),
            ("not_after", "NOT AFTER"), ("renewal", "RENEWAL IN"), ("error", "LAST ERROR")]
    return render(args, rows, cols, f"workload certificates on {admin.label}", raw=data)


def _epoch(v: Any) -> float:
    if isinstance(v, int | float):
        return float(v)
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def cmd_policies(args: argparse.Namespace) -> int:
    admin = node_admin(args)
    dump = admin.ztunnel("/config_dump")
    policies = dump.get("policies", [])
    rows = [
        {
            "policy": p.get("key") or p.get("name"),
            "kind": p.get("kind"),
            "scope": p.get("scope"),
            "action": (p.get("action") or p.get("mode") or "") + (f" {p['provider']}" if p.get("provider") else ""),
            "rules": p.get("rules") if isinstance(p.get("rules"), int) else len(p.get("rules") or []),
            "status": ("dry-run, " if p.get("dry_run") else "") + str(p.get("status") or "-"),
            "enforced": p.get("status_summary"),
        }
        for p in policies
    ]
    cols = [("policy", "POLICY"), ("kind", "KIND"), ("scope", "SCOPE"), ("action", "ACTION/MODE"),
            ("rules", "RULES"), ("status", "STATUS"), ("enforced", "WHAT AMBIT ENFORCES")]
    errors = dump.get("errors") or []
    status = render(args, rows, cols, f"policies in force on {admin.label}",
                    raw={"items": policies, "errors": errors})
    notes = policy_field_notes(policies)
    if notes and args.output != "json":
        con = console()
        con.print("[bold]fields not enforced as written everywhere:[/]")
        for line in notes:
            con.print(f"  {line}", markup=False)
    if errors and args.output != "json":
        Console(stderr=True).print("[bold red]rejected (the last good version stays in force):[/]")
        for e in errors:
            Console(stderr=True).print(f"  {e}")
    return status


def policy_field_notes(policies: Iterable[dict[str, Any]]) -> list[str]:
    """One line per policy field that is not enforced as written at L4 and at waypoints alike
    (from the summary's `enforcement`, ambit.policy.status): `shop/p: spec.rules[0]... (how): detail`."""
    out = []
    for p in policies:
        for f in p.get("enforcement") or []:
            if f.get("how") == "enforced":
                continue
            how = f" ({f['how']})" if f.get("how") else ""
            out.append(f"{p.get('key') or p.get('name')}: {f.get('field')}{how}: {f.get('detail')}")
    return out


def cmd_policy_check(args: argparse.Namespace) -> int:
    admin = node_admin(args)
    try:
        to, port_s = args.to.rsplit(":", 1)
        port = int(port_s)
        ns, pod = to.split("/", 1)
        src_ns, src_sa = args.source.split("/", 1)
    except ValueError as e:
        raise CliError(
            "policy check: use --from NS/SERVICEACCOUNT --to NS/POD:PORT, e.g. "
            "--from shop/frontend --to shop/backend-0:8080"
        ) from e
    query = {"from": f"{src_ns}/{src_sa}", "to": f"{ns}/{pod}", "port": str(port)}
    if args.method:
        query["method"] = args.method
    if args.path:
        query["path"] = args.path
    if args.source_ip:
        query["source_ip"] = args.source_ip
    if args.plaintext:
        query["mtls"] = "false"
    if args.host:
        query["host"] = args.host
    if args.header:
        for h in args.header:
            if "=" not in h:
                raise CliError(f"--header {h!r}: expected NAME=VALUE, e.g. x-user=alice")
        query["headers"] = ",".join(args.header)
    if args.jwt:
        try:
            query["jwt"] = Path(args.jwt).read_text().strip()
        except OSError as e:
            raise CliError(f"--jwt {args.jwt}: {e.strerror}") from e
    data = _judge(args, admin, query)
    if args.output == "json":
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        verdict = "[bold green]ALLOWED[/]" if data.get("allowed") else "[bold red]DENIED[/]"
        con = console()
        con.print(f"{verdict}  {data.get('source')} -> {data.get('destination')}:{port}")
        default = "default deny" if data.get("action") == "DEFAULT" and not data.get("allowed") else "default allow"
        con.print(f"  decided by: {data.get('policy') or '(' + default + ')'}"
                  + (f" rule {data['rule']}" if data.get("rule") is not None else "")
                  + f"  [{data.get('action')}]")
        con.print(f"  why: {data.get('reason')}")
        for note in data.get("notes") or []:
            con.print(f"  note: {note}")
        for c in data.get("custom") or []:
            con.print(f"  and then: provider {c.get('provider')} is asked (CUSTOM policy {c.get('policy')} "
                      f"rule {c.get('rule')}); it may still deny", markup=False)
        for d in data.get("dry_run") or []:
            con.print(f"  dry-run: {dry_run_words([d])}: {d.get('reason')}", markup=False)
        if data.get("mtls_mode"):
            con.print(f"  mTLS mode of the destination port: {data['mtls_mode']}")
    return 0 if data.get("allowed") else 3


def _judge(args: argparse.Namespace, admin: NodeAdmin, query: dict[str, str]) -> Any:
    """Ask the proxy that enforces: the destination's waypoint when it has one (and it can be
    reached from here), else the destination node's ztunnel."""
    dump = admin.ztunnel("/config_dump")
    dst = next((w for w in dump.get("workloads", []) if w.get("uid") == query["to"]), None)
    if dst is not None and dst.get("waypoint"):
        for wp in waypoint_admins(args, admin, f"{dst['namespace']}/{dst['waypoint']}"):
            try:
                data = wp.waypoint("/debug/authorize?" + urllib.parse.urlencode(query))
            except CliError:
                continue
            data.setdefault("notes", []).insert(0, f"judged by {wp.label}, which enforces {query['to']}'s policies")
            return data
    return admin.ztunnel("/debug/authorize?" + urllib.parse.urlencode(query))


def cmd_status(args: argparse.Namespace) -> int:
    admin = node_admin(args)
    status = admin.agent("/status")
    pods = status.get("pods", [])
    rows = [
        {
            "pod": p.get("pod"),
            "ip": p.get("ip"),
            "mode": p.get("mode"),
            "programs": "attached" if p.get("attached") else "MISSING",
            "maps": "in sync" if p.get("maps_in_sync") else "OUT OF SYNC",
            "redirected": "yes" if p.get("redirected") else "NO",
            "bypass_drops": p.get("bypass_drops"),
            "problem": p.get("problem"),
        }
        for p in pods
    ]
    cols = [("pod", "ENROLLED POD"), ("ip", "IP"), ("mode", "MTLS"), ("programs", "PROGRAMS"),
            ("maps", "MAPS"), ("redirected", "REDIRECTED"), ("bypass_drops", "BYPASS DROPS"),
            ("problem", "PROBLEM")]
    render(args, rows, cols, f"redirection status on {admin.label}", raw=status)
    if args.output != "json":
        z = status.get("ztunnel", {})
        console().print(f"ztunnel: {'ready' if z.get('ready') else 'NOT READY'}"
                        + (f" ({z.get('reason')})" if z.get("reason") else ""))
    healthy = status.get("healthy", all(r["redirected"] == "yes" for r in rows))
    return 0 if healthy else 4


def cmd_version(args: argparse.Namespace) -> int:
    try:
        v = metadata.version("ambit")
    except metadata.PackageNotFoundError:
        v = "unknown"
    info = {"version": v, "python": sys.version.split()[0]}
    if args.output == "json":
        json.dump(info, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"ambit {v} (python {info['python']})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--node", help="a node of the local cluster (default: this machine's node)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the local cluster's state dir")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent import rollout  # the history, simulate and suggest; it imports this module

    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("flows", help="what is talking to what, as whom, and why it was allowed",
                       formatter_class=fmt, epilog="examples:\n  ambit flows\n  ambit flows --denied\n"
                       "  ambit flows --pod shop/frontend --watch\n  ambit flows --node node-a -o json\n"
                       "  ambit flows --since 1h --destination shop/backend --verdict deny\n"
                       "  ambit flows --denied --by-source --window 10m")
    _common(p)
    p.add_argument("--watch", action="store_true", help="update a live table in place")
    p.add_argument("--watch-seconds", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval for --watch")
    p.add_argument("--denied", action="store_true", help="only denied and dropped flows")
    p.add_argument("--pod", help="only flows from or to NS/NAME")
    rollout.add_flow_history_args(p)
    p.set_defaults(func=cmd_flows)

    p = sub.add_parser("workloads", help="the workloads the node's ztunnel knows", formatter_class=fmt,
                       epilog="examples:\n  ambit workloads\n  ambit workloads --node node-b -o json")
    _common(p)
    p.set_defaults(func=cmd_workloads)

    p = sub.add_parser("certs", help="workload certificates: identity, serial, expiry, renewal",
                       formatter_class=fmt, epilog="examples:\n  ambit certs\n  ambit certs --node node-a")
    _common(p)
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("policies", help="authorization and peer-authentication policies in force",
                       formatter_class=fmt, epilog="examples:\n  ambit policies\n  ambit policies -o json")
    _common(p)
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("policy", help="policy tools: check, simulate, suggest")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    c = psub.add_parser(
        "check", help="would this connection be allowed, by which rule, and why?", formatter_class=fmt,
        epilog="examples:\n  ambit policy check --from shop/frontend --to shop/backend-0:8080\n"
        "  ambit policy check --from legacy/default --to shop/backend-0:8080 --plaintext\n"
        "exit status: 0 allowed, 3 denied, 1 error")
    _common(c)
    c.add_argument("--from", dest="source", required=True, metavar="NS/SA", help="source namespace/serviceaccount")
    c.add_argument("--to", required=True, metavar="NS/POD:PORT", help="destination pod and port")
    c.add_argument("--method", help="HTTP method (L7 rules)")
    c.add_argument("--path", help="HTTP path (L7 rules)")
    c.add_argument("--source-ip", help="source IP for ipBlocks rules")
    c.add_argument("--host", help="HTTP host (L7 rules)")
    c.add_argument("--header", action="append", metavar="NAME=VALUE", help="an HTTP header (repeatable)")
    c.add_argument("--jwt", metavar="FILE", help="a JWT (the file's content) sent as Authorization: Bearer")
    c.add_argument("--plaintext", action="store_true", help="the connection is not mTLS (no principal)")
    c.set_defaults(func=cmd_policy_check)
    c = psub.add_parser(
        "simulate", help="what would a proposed policy change allow or deny, replayed over the recorded flows?",
        formatter_class=fmt,
        epilog="examples:\n  ambit policy simulate -f proposed.yaml\n  ambit policy simulate -f old.yaml --delete "
        "--since 7d\n  ambit policy simulate -f p.yaml --agent 127.0.0.1:15010 --agent 127.0.0.1:25010\n"
        "exit status: 0 no observed flow newly denied, 3 some would be, 1 error")
    c.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    c.add_argument("--node", help="a node of the local cluster (default: every node)")
    c.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the local cluster's state dir")
    rollout.add_simulate_args(c)
    c.set_defaults(func=rollout.cmd_policy_simulate)
    c = psub.add_parser(
        "suggest", help="least-privilege AuthorizationPolicies for a namespace, from its recorded traffic",
        formatter_class=fmt,
        epilog="examples:\n  ambit policy suggest --namespace shop > shop-policies.yaml\n"
        "  ambit policy suggest -n shop --since 7d --out shop.yaml && ambit policy simulate -f shop.yaml")
    c.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="output format")
    c.add_argument("--node", help="a node of the local cluster (default: every node)")
    c.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="the local cluster's state dir")
    rollout.add_suggest_args(c)
    c.set_defaults(func=rollout.cmd_policy_suggest)

    p = sub.add_parser("waypoints", help="waypoints, what uses each, and whether they are ready",
                       formatter_class=fmt, epilog="examples:\n  ambit waypoints\n  ambit waypoints --node node-a\n\n"
                       "exit status: 0 every waypoint ready, 4 one is not, 1 error")
    _common(p)
    p.set_defaults(func=cmd_waypoints)

    p = sub.add_parser("status", help="is every enrolled pod really redirected into the ztunnel?",
                       formatter_class=fmt, epilog="examples:\n  ambit status\n  ambit status --node node-a\n"
                       "exit status: 0 healthy, 4 a pod is not redirected, 1 error")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("version", help="print the ambit version")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_version)
