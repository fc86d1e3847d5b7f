"""Safe policy rollout from the command line: `ambit flows --since` (the node's flow history),
`ambit flows --denied --by-source` (denial spikes), `ambit policy simulate` and
`ambit policy suggest`.

The CLI side only: it asks the agents' admin endpoints (`/flows/history`,
`/flows/denials`, `/objects`), and hands their answers to the pure parts
(`agent.history.rank_denials`, `agent.simulate`, `agent.suggest`). Simulate and suggest
read every node of the local cluster (or, with `--node`, one); on a real node, this
node's agent, or the agents named with `--agent HOST:PORT` (e.g. other nodes' admin
ports forwarded with `kubectl port-forward`, which reaches a hostNetwork pod's loopback).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.history import Filter, SourceDenials, rank_denials
from agent.inspect import (
    AGENT_ADMIN_PORT,
    NodeAdmin,
    console,
    human_age,
    human_bytes,
    make_table,
    node_admin,
    with_dry_run,
)
from ambit.args import CliError, duration

DEFAULT_WINDOW = 300.0  # --by-source: the recent window
DEFAULT_BASELINE = 86400.0  # --by-source: how far back its earlier rate looks


def parse_when(text: str, now: float, flag: str) -> float:
    """`1h` (that long ago) or an RFC 3339 time (`2025-01-31T12:00:00Z`), as epoch seconds."""
    try:
        return now - duration(text).total_seconds()
    except argparse.ArgumentTypeError:
        pass
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected a duration ago (30m, 24h, 7d) or a time "
                       "(2025-01-31T12:00:00Z)") from None
    if t.tzinfo is None:
        t = t.astimezone()  # a time without a zone is this machine's local time
    return t.timestamp()


def _stamp(t: Any) -> str:
    if not isinstance(t, int | float) or not t:
        return "-"
    local = dt.datetime.fromtimestamp(t).astimezone()
    fmt = "%H:%M:%S" if time.time() - t < 86400 else "%Y-%m-%d %H:%M"
    return local.strftime(fmt)


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# flags


def add_flow_history_args(p: argparse.ArgumentParser) -> None:
    """`ambit flows`'s history flags (the live view stays the default)."""
    g = p.add_argument_group("history (the flows the node recorded; without these: the live view)")
    g.add_argument("--since", metavar="WHEN", help="recorded flows since WHEN: a duration ago (1h, 7d) or a time")
    g.add_argument("--until", metavar="WHEN", help="recorded flows until WHEN (default: now)")
    g.add_argument("--source", metavar="WHO", help="from a workload (NS/NAME), identity or address; * matches any")
    g.add_argument("--destination", metavar="WHO", help="to a workload, identity or address; * matches any")
    g.add_argument("--verdict", action="append", choices=("allow", "deny", "dropped", "pending"),
                   help="only this verdict (repeatable)")
    g.add_argument("--policy", metavar="NS/NAME", help="decided by this policy; * matches any")
    g.add_argument("--limit", type=int, default=1000, help="at most this many (the newest; default 1000)")
    g.add_argument("--by-source", action="store_true",
                   help="denials per source in the recent --window against its own earlier rate (since --since, "
                        "default 24h): a source probing its neighbours stands out")
    g.add_argument("--window", type=duration, default=dt.timedelta(seconds=DEFAULT_WINDOW), metavar="DURATION",
                   help="--by-source: the recent window (default 5m)")


def history_mode(args: argparse.Namespace) -> bool:
    """Does this `ambit flows` ask the history? Filters that only the history has need --since."""
    asked = bool(args.since or args.until or args.by_source)
    only_history = [f"--{n.replace('_', '-')}" for n in ("source", "destination", "verdict", "policy")
                    if getattr(args, n)]
    if only_history and not asked:
        raise CliError(f"{', '.join(only_history)} filter the recorded history: add --since (e.g. --since 1h); "
                       "the live view filters with --pod and --denied")
    if asked and args.watch:
        raise CliError("--watch is the live view; --since/--until/--by-source read the history")
    return asked


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", action="append", type=Path, required=True, metavar="FILE",
                   help="the proposed AuthorizationPolicy/PeerAuthentication/RequestAuthentication objects "
                        "(a file or a directory; repeatable)")
    p.add_argument("--delete", action="store_true", help="simulate deleting these objects instead")
    p.add_argument("--since", default="24h", metavar="WHEN", help="replay the flows recorded since WHEN (default 24h)")
    _agents_arg(p)
    p.add_argument("--show-allowed", action="store_true", help="list every newly allowed group (default: 20)")


def add_suggest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", "-n", required=True, help="write policies for the workloads of this namespace")
    p.add_argument("--since", default="24h", metavar="WHEN", help="from the flows recorded since WHEN (default 24h)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the YAML here (default: standard output)")
    _agents_arg(p)


def _agents_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", action="append", metavar="HOST:PORT",
                   help="read the flow history of the agent at HOST:PORT (repeatable; default: every node of the "
                        "local cluster, else this node's agent)")


# ---------------------------------------------------------------------------
# which agents


@dataclass
class AgentRef:
    admin: NodeAdmin
    port: int = AGENT_ADMIN_PORT

    def get(self, path: str) -> Any:
        return self.admin.get(self.port, path, "agent")


def agents(args: argparse.Namespace) -> list[AgentRef]:
    """The agents whose histories to read: --agent, else --node, else every node of the local
    cluster in --state-dir, else this node's."""
    if args.agent:
        refs = []
        for hp in args.agent:
            host, sep, port = hp.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise CliError(f"--agent {hp!r}: expected HOST:PORT, e.g. 127.0.0.1:15010")
            refs.append(AgentRef(NodeAdmin(label=f"agent at {hp}", host=host), int(port)))
        return refs
    if args.node or not (Path(args.state_dir) / "cluster.json").exists():
        return [AgentRef(node_admin(args))]
    from agent.local.layout import Layout
    from agent.local.runtime import node_connector

    layout = Layout.load(Path(args.state_dir))
    refs = []
    for n in layout.nodes:
        try:
            connect = node_connector(Path(args.state_dir), n.name)
        except Exception as e:  # a node whose namespace is gone: say which
            raise CliError(f"local cluster node {n.name!r} in {args.state_dir}: {e}") from e
        refs.append(AgentRef(NodeAdmin(label=f"node {n.name}", connect=connect)))
    return refs


def _history(ref: AgentRef, flt: Filter, **extra: str) -> dict[str, Any]:
    data = ref.get("/flows/history?" + urllib.parse.urlencode({**flt.to_query(), **extra}))
    if not isinstance(data, dict):
        raise CliError(f"the agent on {ref.admin.label} sent an unexpected /flows/history answer")
    return data


def _lost_note(data: Mapping[str, Any], label: str) -> str | None:
    lost = data.get("lost") or {}
    n = int(lost.get("ztunnel") or 0) + int(lost.get("waypoints") or 0)
    hist = data.get("history") or {}
    dropped = int(hist.get("dropped") or 0)
    if not n and not dropped:
        return None
    return (f"note: {label}'s history missed {n + dropped} records since its agent started (they closed "
            "faster than the agent collected them)")


# ---------------------------------------------------------------------------
# ambit flows --since ...


HISTORY_COLUMNS = [
    ("time", "TIME"), ("source", "SOURCE"), ("source_identity", "SOURCE IDENTITY"),
    ("destination", "DESTINATION"), ("port", "PORT"), ("request", "REQUEST"), ("via", "VIA"),
    ("verdict", "VERDICT"), ("policy", "POLICY"), ("sent", "SENT"), ("received", "RECEIVED"),
    ("duration", "DURATION"),
]


def history_rows(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in items:
        extra = r.get("extra") or {}
        if r.get("kind") == "request" and r.get("route") == "waypoint_tcp":
            request = "TCP (not HTTP)"
        elif r.get("kind") == "request":
            request = f"{r.get('method')} {r.get('path')} -> {r.get('status')}"
        elif r.get("kind") == "drop":
            request = "(dropped by the kernel)"
        else:
            request = None
        policy = r.get("policy")
        if policy and r.get("rule") is not None:
            policy = f"{policy} rule {r['rule']}"
        elif not policy and r.get("verdict") in ("deny", "dropped"):
            policy = r.get("reason")
        dur = (r.get("t_end") or 0) - (r.get("t_start") or 0)
        out.append({
            "time": _stamp(r.get("t_end")),
            "source": r.get("src_workload") or r.get("src_ip"),
            "source_identity": r.get("src_identity"),
            "destination": r.get("dst_workload") or r.get("dst_ip"),
            "port": r.get("dst_port"), "request": request,
            "via": (f"waypoint {r['waypoint']}" if r.get("waypoint")
                    else f"gateway {extra.get('gateway')}" if r.get("route") == "gateway" else None),
            "verdict": r.get("verdict"), "policy": with_dry_run(policy, extra.get("dry_run")),
            "sent": human_bytes(r.get("bytes_sent")), "received": human_bytes(r.get("bytes_received")),
            "duration": f"{dur * 1000:.0f}ms" if 0 < dur < 1 else (human_age(dur) if dur else "-"),
        })
    return out


def cmd_flow_history(args: argparse.Namespace) -> int:
    if args.by_source:
        return cmd_denials(args)
    now = time.time()
    verdicts = tuple(args.verdict or ()) or (("deny", "dropped") if args.denied else ())
    flt = Filter(since=parse_when(args.since, now, "--since") if args.since else None,
                 until=parse_when(args.until, now, "--until") if args.until else None,
                 source=args.source, destination=args.destination, verdicts=verdicts, policy=args.policy,
                 pod=args.pod)
    if args.limit < 1:
        raise CliError(f"--limit {args.limit}: at least 1")
    ref = AgentRef(node_admin(args))
    data = _history(ref, flt, limit=str(args.limit))
    items = data.get("items") or []
    if args.output == "json":
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
        return 0
    span = f"since {_stamp(flt.since)}" if flt.since else "recorded"
    con = console()
    con.print(make_table(history_rows(items), HISTORY_COLUMNS, f"flows {span} on {ref.admin.label}"))
    if data.get("truncated"):
        con.print(f"(the newest {len(items)}; more matched: narrow the filters or raise --limit)")
    note = _lost_note(data, ref.admin.label)
    if note:
        con.print(note)
    return 0


DENIAL_COLUMNS = [
    ("source", "SOURCE"), ("identity", "IDENTITY"), ("recent", "DENIED"), ("rate", "PER MIN"),
    ("earlier", "EARLIER PER MIN"), ("ratio", "RATIO"), ("targets", "TARGETS"), ("policy", "TOP POLICY"),
    ("last", "LAST"), ("spike", "SPIKE"),
]


def cmd_denials(args: argparse.Namespace) -> int:
    now = time.time()
    since = now - parse_when(args.since, now, "--since") if args.since else DEFAULT_BASELINE
    window = args.window.total_seconds()
    if window >= since:
        raise CliError(f"--window ({human_age(window)}) must be shorter than --since ({human_age(since)})")
    ref = AgentRef(node_admin(args))
    data = ref.get("/flows/denials?" + urllib.parse.urlencode({"window": repr(window), "since": repr(since)}))
    counts = [SourceDenials(**c) for c in data.get("items") or []]
    ranked = rank_denials(counts, window, float(data.get("baseline_seconds") or 0.0))
    rows = [{
        "source": r.source.source, "identity": r.source.identity, "recent": r.source.recent,
        "rate": round(r.recent_per_min, 2),
        "earlier": round(r.earlier_per_min, 3) if r.earlier_per_min is not None else None,
        "ratio": round(r.ratio, 1) if r.ratio is not None else None, "targets": r.source.targets,
        "policy": r.source.top_policy, "last": r.source.last, "spike": r.spike,
    } for r in ranked if r.source.recent or args.output == "json"]
    if args.output == "json":
        json.dump({"node": data.get("node"), "window_seconds": window, "baseline_seconds": data.get("baseline_seconds"),
                   "items": rows}, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    for r in rows:
        r["last"] = _stamp(r["last"])
        r["spike"] = "SPIKE" if r["spike"] else ""
        r["earlier"] = "-" if r["earlier"] is None else f"{r['earlier']:g}"
        r["ratio"] = "new" if r["ratio"] is None else f"{r['ratio']:g}"
    baseline = float(data.get("baseline_seconds") or 0.0)
    title = (f"denials per source on {ref.admin.label}: the last {human_age(window)}, against the "
             f"{human_age(baseline) if baseline else 'no'} before it")
    console().print(make_table(rows, DENIAL_COLUMNS, title))
    return 0


# ---------------------------------------------------------------------------
# ambit policy simulate


def load_proposal(paths: Sequence[Path]) -> list[dict[str, Any]]:
    from ambit.cluster import ClusterError, load_documents

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml", ".json") and f.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise CliError(f"-f {p}: no such file or directory")
    out: list[dict[str, Any]] = []
    for f in files:
        try:
            out += load_documents(f.read_text(), str(f))
        except (OSError, ClusterError) as e:
            raise CliError(f"-f {f}: {e}") from e
    if not out:
        raise CliError(f"-f {', '.join(str(p) for p in paths)}: no objects")
    return out


CHANGE_COLUMNS = [
    ("source", "SOURCE"), ("destination", "DESTINATION"), ("what", "PORTS / REQUESTS"), ("flows", "FLOWS"),
    ("last", "LAST SEEN"), ("before", "TODAY"), ("after", "WITH THE PROPOSAL"),
]


def _change_rows(groups: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"source": g.source, "destination": g.destination,
             "what": ", ".join(g.what[:4]) + (f" (+{len(g.what) - 4})" if len(g.what) > 4 else ""),
             "flows": g.flows, "last": _stamp(g.last), "before": g.before, "after": g.after} for g in groups]


def cmd_policy_simulate(args: argparse.Namespace) -> int:
    from agent.simulate import (
        Observed,
        SimulateError,
        SnapshotPair,
        group_changes,
        simulate,
        snapshot_pair,
    )

    proposed = load_proposal(args.filename)
    now = time.time()
    since = parse_when(args.since, now, "--since")
    pairs: dict[str, SnapshotPair] = {}
    observed: list[Observed] = []
    notes: list[str] = []
    for ref in agents(args):
        objects = ref.get("/objects")
        try:
            pair = snapshot_pair(objects, proposed, args.delete)
        except SimulateError as e:
            raise CliError(str(e)) from e
        node = pair[0].node
        pairs[node] = pair
        data = _history(ref, Filter(since=since), aggregate="1")
        observed += [Observed.from_row(r, node) for r in data.get("items") or []]
        note = _lost_note(data, ref.admin.label)
        if note:
            notes.append(note)
    default = next(iter(pairs.values()))
    sim = simulate(observed, pairs, default)
    denied, allowed = group_changes(sim.newly_denied), group_changes(sim.newly_allowed)
    n_denied = sum(g.flows for g in denied)
    keys = [f"{o.get('kind')} {(o.get('metadata') or {}).get('namespace') or 'default'}/"
            f"{(o.get('metadata') or {}).get('name')}" for o in proposed]
    if args.output == "json":
        json.dump({
            "proposal": keys, "delete": args.delete, "since": since, "nodes": sorted(pairs),
            "flows": sim.flows, "unchanged": sim.unchanged, "skipped": dict(sim.skipped), "drifted": sim.drifted,
            "newly_denied": [g.to_json() for g in denied], "newly_allowed": [g.to_json() for g in allowed],
        }, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 3 if sim.breaks else 0
    con = console()
    verb = "deleting" if args.delete else "applying"
    con.print(f"{verb} {', '.join(keys)}: {sim.flows} flows recorded on {', '.join(sorted(pairs))} "
              f"since {_stamp(since)} replayed")
    if denied:
        con.print(make_table(_change_rows(denied), CHANGE_COLUMNS,
                             f"NEWLY DENIED: {n_denied} observed flows would break"))
    if allowed:
        shown = allowed if args.show_allowed else allowed[:20]
        con.print(make_table(_change_rows(shown), CHANGE_COLUMNS,
                             f"newly allowed: {sum(g.flows for g in allowed)} observed flows"
                             + ("" if len(shown) == len(allowed) else f" (first {len(shown)} groups)")))
    if denied:
        con.print(f"[bold red]{n_denied} observed flows ({len(denied)} source/destination pairs) would be "
                  "newly denied[/]")
    else:
        con.print("[bold green]no observed flow would be newly denied[/]")
    con.print(f"unchanged: {sim.unchanged}")
    for why, n in sorted(sim.skipped.items()):
        con.print(f"not replayed: {n} {why}")
    if sim.drifted:
        con.print(f"note: {sim.drifted} flows are judged differently today than when recorded (the policies "
                  "changed since, or a rule reads a header or JWT claim, which is not recorded)")
    for note in notes:
        con.print(note)
    return 3 if sim.breaks else 0


# ---------------------------------------------------------------------------
# ambit policy suggest


def cmd_policy_suggest(args: argparse.Namespace) -> int:
    from agent.simulate import Observed, SimulateError, snapshot_in_force
    from agent.suggest import render, suggest

    now = time.time()
    since = parse_when(args.since, now, "--since")
    refs = agents(args)
    observed: list[Observed] = []
    snap = None
    for ref in refs:
        data = _history(ref, Filter(since=since, namespace=args.namespace), aggregate="1")
        node = str(data.get("node") or ref.admin.label)
        observed += [Observed.from_row(r, node) for r in data.get("items") or []]
        if snap is None:
            try:
                snap = snapshot_in_force(ref.get("/objects"))
            except SimulateError as e:
                raise CliError(str(e)) from e
    assert snap is not None
    result = suggest(observed, snap, args.namespace)
    command = f"ambit policy suggest --namespace {args.namespace} --since {args.since}"
    if args.output == "json":
        text = json.dumps({"items": [p.to_object() for p in result.policies], "flows": result.flows,
                           "nodes": result.nodes, "unselectable": result.unselectable, "quiet": result.quiet},
                          indent=2, sort_keys=True) + "\n"
    else:
        text = render(result, command)
    if args.out:
        try:
            args.out.write_text(text)
        except OSError as e:
            raise CliError(f"--out {args.out}: {e.strerror or e}") from e
        print(f"wrote {len(result.policies)} AuthorizationPolicies for namespace {args.namespace} to {args.out} "
              f"(from {result.flows} flows)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
