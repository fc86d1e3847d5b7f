"""`ambit agent run`: the node agent's command line (parses flags, builds the
runtime, the datapath and the agent, runs it until interrupted)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

from agent import AgentError
from agent.runtime import parse_runtime_spec
from ambit.args import CliError, duration

EXAMPLE = """example:
  ambit agent run --node node-a --cluster local:/run/ambit/local/cluster --runtime local:/run/ambit/local \\
      --bpf-dir /sys/fs/bpf/ambit/node-a --ztunnel-outbound 10.101.0.1:15001 --ztunnel-addresses 10.101.0.1,10.200.0.11
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the node agent", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--cluster", required=True, help="cluster source, e.g. local:DIR")
    p.add_argument("--runtime", required=True, help="pod runtime, e.g. local:STATE_DIR")
    p.add_argument("--bpf-dir", type=Path, help="where maps are pinned (default /sys/fs/bpf/ambit/<node>)")
    p.add_argument("--ztunnel-outbound", help="IP:PORT of the ztunnel's outbound listener (15001)")
    p.add_argument("--ztunnel-inbound", help="IP:PORT of its inbound plaintext listener (default: outbound IP, 15006)")
    p.add_argument("--ztunnel-addresses", help="comma-separated addresses the ztunnel talks to pods from")
    p.add_argument("--ztunnel-cgroup", type=Path, help="the ztunnel's cgroup v2 dir (SO_ORIGINAL_DST answers)")
    p.add_argument("--admin", default="127.0.0.1:15010", help="admin HTTP listen address, '' to disable")
    p.add_argument("--metrics", default="", metavar="IP:PORT",
                   help="also serve /metrics alone here, for Prometheus (default off; the admin serves it too)")
    p.add_argument("--state-feed", type=Path, metavar="SOCKET",
                   help="serve the node's ztunnel its compiled snapshot on this unix socket")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="where the node's last good policies are kept across restarts "
                        "(default /var/lib/ambit/<node>; 'none' keeps them in memory only)")
    p.add_argument("--flow-history", metavar="PATH",
                   help="keep the node's flow records in this SQLite database (default <state-dir>/flows.db; "
                        "'none': no history)")
    p.add_argument("--flow-history-max-mb", type=float, default=100.0, metavar="N",
                   help="size bound of the flow history on disk, in MiB (default 100); the oldest records go first")
    p.add_argument("--flow-history-max-age", type=duration, default=dt.timedelta(days=7), metavar="DURATION",
                   help="records older than this are deleted (default 7d)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system")
    p.set_defaults(func=run)


def hostport(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"{flag} {value!r}: expected IP:PORT, e.g. 10.101.0.1:15001")
    return host, int(port)


def make_runtime(spec: str, node: str) -> Any:
    if spec == "kubernetes":
        # On a Kubernetes node: pods' cgroups from the kubelet's layout (systemd or cgroupfs driver).
        from agent.kubecgroup import KubePodRuntime

        return KubePodRuntime()
    try:
        kind, arg = parse_runtime_spec(spec)
    except ValueError as e:
        raise CliError(f"--runtime: {e}") from e
    if kind != "local":
        raise CliError(f"--runtime {spec!r}: unknown kind {kind!r} (supported: local:STATE_DIR, kubernetes)")
    from agent.local.runtime import LocalPodRuntime

    return LocalPodRuntime(Path(arg), node)


def run(args: argparse.Namespace) -> int:
    from agent.agentd import Agent, AgentConfig
    from agent.bpf import Datapath
    from ambit.sources import open_source

    try:
        runtime = make_runtime(args.runtime, args.node)
        if args.ztunnel_outbound:
            outbound = hostport(args.ztunnel_outbound, "--ztunnel-outbound")
        elif hasattr(runtime, "ztunnel_outbound"):
            outbound = runtime.ztunnel_outbound()
        else:
            raise CliError("--ztunnel-outbound is required with this runtime")
        if args.ztunnel_inbound:
            inbound = hostport(args.ztunnel_inbound, "--ztunnel-inbound")
        elif hasattr(runtime, "ztunnel_inbound_plaintext"):
            inbound = runtime.ztunnel_inbound_plaintext()
        else:
            inbound = (outbound[0], 15006)
        if args.ztunnel_addresses:
            addrs = [a.strip() for a in args.ztunnel_addresses.split(",") if a.strip()]
        else:
            addrs = list(runtime.ztunnel_addresses()) if hasattr(runtime, "ztunnel_addresses") else [outbound[0]]
        zcg = args.ztunnel_cgroup or (runtime.ztunnel_cgroup() if hasattr(runtime, "ztunnel_cgroup") else None)
        admin = hostport(args.admin, "--admin") if args.admin else None
        metrics = hostport(args.metrics, "--metrics") if args.metrics else None
        bpf_dir = args.bpf_dir or Path("/sys/fs/bpf/ambit") / args.node
        source = open_source(args.cluster)
        datapath = Datapath(bpf_dir)
    except AgentError as e:
        raise CliError(str(e)) from e
    config = AgentConfig(
        node=args.node, ztunnel_outbound=outbound, ztunnel_inbound=inbound, ztunnel_addresses=addrs,
        ztunnel_cgroup=zcg, admin=admin, metrics=metrics, trust_domain=args.trust_domain, root_namespace=args.root_namespace,
        feed_socket=args.state_feed,
        state_dir=None if str(args.state_dir) == "none" else (args.state_dir or Path("/var/lib/ambit") / args.node),
    )
    if args.flow_history != "none":
        if args.flow_history_max_mb < 1:
            raise CliError(f"--flow-history-max-mb {args.flow_history_max_mb:g}: at least 1")
        config.flow_history = (Path(args.flow_history) if args.flow_history
                               else config.state_dir / "flows.db" if config.state_dir is not None else None)
        config.flow_history_max_bytes = int(args.flow_history_max_mb * 2**20)
        config.flow_history_max_age = args.flow_history_max_age.total_seconds()
    annotator: Any = runtime if hasattr(runtime, "set_annotation") else None
    if annotator is None and args.cluster.startswith("kubernetes"):
        from agent.kubeannotate import KubePodAnnotator
        from ambit.sources.kube import api_client_from_spec

        annotator = KubePodAnnotator(api_client_from_spec(args.cluster))
    agent = Agent(source=source, runtime=runtime, annotator=annotator, datapath=datapath, config=config)
    try:
        asyncio.run(agent.run())
    except AgentError as e:
        raise CliError(str(e)) from e
    return 0
