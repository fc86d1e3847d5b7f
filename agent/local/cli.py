"""`ambit local ...`: build, inspect and tear down a local cluster of network namespaces and cgroups."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from agent import AgentError
from agent.local.layout import DEFAULT_STATE_DIR
from ambit.args import CliError, duration

EXAMPLES_UP = """examples:
  ambit local up                      # 2 nodes (node-a, node-b), CA, agents, ztunnels
  ambit local up --nodes 3 --state-dir /tmp/c2   # a second cluster beside the first
"""
EXAMPLES_APPLY = """examples:
  ambit local apply -f examples/
  ambit local apply -f pod.yaml -f policy.yaml
"""
EXAMPLES_GET = """examples:
  ambit local get pods
  ambit local get nodes -o json
"""
EXAMPLES_EXEC = """examples:
  ambit local exec shop/frontend -- python3 -c 'print(1)'
  ambit local exec legacy/client -- cat /etc/hosts
"""
UNITS_HELP = "ca, or agent/ztunnel with --node"


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
        help=f"where the cluster keeps its state (default {DEFAULT_STATE_DIR}); one cluster per dir",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("up", help="create a local cluster", epilog=EXAMPLES_UP, formatter_class=fmt)
    _state(p)
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    p.add_argument(
        "--without", action="append", default=[], choices=["ca", "agent", "ztunnel"],
        help="do not run this component (repeatable), e.g. to run it by hand under a debugger",
    )
    p.add_argument("--cert-ttl", type=duration, default=dt.timedelta(days=1), metavar="DURATION",
                   help="validity of workload certificates, e.g. 24h (default), or 60s to watch them rotate")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="remove everything the cluster made (idempotent, also after a crash)")
    _state(p)
    p.set_defaults(func=cmd_down)

    for name, fn, ex in (("apply", cmd_apply, EXAMPLES_APPLY), ("delete", cmd_delete, None)):
        p = sub.add_parser(name, help=f"{name} Kubernetes-shaped objects from files or directories",
                           epilog=ex, formatter_class=fmt)
        _state(p)
        p.add_argument("-f", "--filename", action="append", type=Path, required=True, help="file or directory (repeatable)")
        if name == "delete":
            p.add_argument("--ignore-not-found", action="store_true")
        p.set_defaults(func=fn)

    p = sub.add_parser("get", help="list nodes, pods or services", epilog=EXAMPLES_GET, formatter_class=fmt)
    _state(p)
    p.add_argument("kind", choices=["nodes", "pods", "services", "namespaces", "policies", "gateways"])
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("exec", help="run a command inside a pod (its netns and cgroup)",
                       epilog=EXAMPLES_EXEC, formatter_class=fmt)
    _state(p)
    p.add_argument("pod", help="NAMESPACE/POD")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("status", help="the supervisor's units: CA, agents, ztunnels, pod commands")
    _state(p)
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)

    for op in ("start", "stop", "restart"):
        p = sub.add_parser(op, help=f"{op} a node process (e.g. `ambit local {op} ztunnel --node node-a`)")
        _state(p)
        p.add_argument("unit", choices=["ca", "agent", "ztunnel"], help=UNITS_HELP)
        p.add_argument("--node", help="the node (for agent and ztunnel)")
        p.set_defaults(func=cmd_control, op=op)


def _guard(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except AgentError as e:
        raise CliError(str(e)) from e


def cmd_up(args: argparse.Namespace) -> int:
    from agent.local import cluster

    components = [c for c in ("ca", "agent", "ztunnel") if c not in args.without]
    report = _guard(cluster.up, args.state_dir, args.nodes, components=components, cert_ttl=int(args.cert_ttl.total_seconds()))
    lay = report.layout
    print(f"cluster {lay.cid} up in {lay.state_dir}")
    for n in lay.nodes:
        print(f"  {n.name}: {n.address}  pods {n.pod_cidr}  netns {n.netns}")
    print(f"  CA: {lay.ca_address} (netns {lay.control_netns})")
    for u in report.units:
        extra = f" ({u['reason']})" if u.get("reason") else ""
        print(f"  {u['unit']}: {u['state']}{extra}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from agent.local import cluster

    for line in _guard(cluster.down, args.state_dir):
        print(line)
    print(f"cluster in {args.state_dir} is down")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from agent.local import cluster

    for line in _guard(cluster.apply, args.state_dir, args.filename):
        print(line)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from agent.local import cluster

    for line in _guard(cluster.delete, args.state_dir, args.filename, args.ignore_not_found):
        print(line)
    return 0


KINDS = {
    "nodes": ["Node"],
    "pods": ["Pod"],
    "services": ["Service"],
    "namespaces": ["Namespace"],
    "policies": ["AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"],
    "gateways": ["Gateway"],
}


def _row(kind: str, o: dict[str, Any]) -> list[str]:
    md, spec, st = o.get("metadata") or {}, o.get("spec") or {}, o.get("status") or {}
    labels = ",".join(f"{k}={v}" for k, v in (md.get("labels") or {}).items())
    if kind == "nodes":
        addr = ",".join(a["address"] for a in st.get("addresses") or [])
        return [md["name"], addr, str(spec.get("podCIDR", ""))]
    if kind == "pods":
        return [md.get("namespace", ""), md["name"], str(spec.get("nodeName", "")), str(st.get("podIP", "")),
                str(st.get("phase", "")), labels]
    if kind == "services":
        ports = ",".join(f"{p.get('port')}->{p.get('targetPort', p.get('port'))}" for p in spec.get("ports") or [])
        sel = ",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items())
        return [md.get("namespace", ""), md["name"], str(spec.get("clusterIP", "")), ports, sel]
    if kind == "namespaces":
        return [md["name"], labels]
    return [str(o.get("kind")), md.get("namespace", ""), md["name"]]


HEADERS = {
    "nodes": ["NAME", "ADDRESS", "POD CIDR"],
    "pods": ["NAMESPACE", "NAME", "NODE", "IP", "PHASE", "LABELS"],
    "services": ["NAMESPACE", "NAME", "CLUSTER-IP", "PORTS", "SELECTOR"],
    "namespaces": ["NAME", "LABELS"],
    "policies": ["KIND", "NAMESPACE", "NAME"],
}


def cmd_get(args: argparse.Namespace) -> int:
    from agent.local import cluster

    items: list[dict[str, Any]] = []
    for kind in KINDS[args.kind]:
        items.extend(_guard(cluster.list_objects, args.state_dir, kind))
    if args.output == "json":
        json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout, indent=2)
        print()
        return 0
    _table(HEADERS[args.kind], [_row(args.kind, o) for o in items])
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for h in headers:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    Console().print(t)


def cmd_exec(args: argparse.Namespace) -> int:
    from agent.local import cluster

    cmd = list(args.command)
    if "--" in cmd:
        # argparse hands everything after the pod to REMAINDER, options included:
        # `exec NS/POD --state-dir DIR -- CMD` is split here.
        i = cmd.index("--")
        opts, cmd = cmd[:i], cmd[i + 1 :]
        if opts:
            pre = argparse.ArgumentParser(prog="ambit local exec", add_help=False)
            _state(pre)
            pre.set_defaults(state_dir=args.state_dir)
            try:
                args.state_dir = pre.parse_args(opts).state_dir
            except SystemExit as e:
                raise CliError(f"exec: cannot parse {' '.join(opts)!r} before --") from e
    if not cmd:
        raise CliError("exec: give the command after --, e.g. ambit local exec shop/frontend -- cat /etc/hosts")
    status: int = _guard(cluster.exec_in_pod, args.state_dir, args.pod, cmd)
    return status


def cmd_status(args: argparse.Namespace) -> int:
    from agent.local import cluster

    units = _guard(cluster.unit_status, args.state_dir)
    if args.output == "json":
        print(json.dumps({"units": units}, indent=2))
        return 0
    _table(["UNIT", "STATE", "PID", "RESTARTS", "REASON"],
           [[u["unit"], u["state"], str(u.get("pid") or ""), str(u["restarts"]), u.get("reason") or ""] for u in units])
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from agent.local import cluster

    if args.unit == "ca":
        unit = "ca"
    else:
        if not args.node:
            raise CliError(f"{args.op} {args.unit}: --node is required (e.g. --node node-a)")
        unit = f"{args.node}/{args.unit}"
    info = _guard(cluster.control, args.state_dir, args.op, unit)
    extra = f" ({info['reason']})" if info.get("reason") else ""
    print(f"{info['unit']}: {info['state']}{extra}")
    return 0 if args.op == "stop" or info["state"] == "running" else 1
