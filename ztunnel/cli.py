"""`ambit ztunnel run`: the ztunnel process's command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path

from ambit.args import CliError, duration
from ambit.tasks import use_uvloop
from ztunnel.config import (
    ADMIN_PORT,
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    READINESS_PORT,
    SOCKS5_PORT,
    ConfigError,
    Listen,
    Timeouts,
    ZtunnelConfig,
    parse_listen,
)

EXAMPLES = """examples:
  ambit ztunnel run --node node-a --cluster local:/run/ambit/local/cluster \\
      --ca 10.200.0.2:15012 --credential-dir /run/ambit/local/nodes/node-a/credential
  ambit ztunnel run --node node-a --cluster local:./cluster --ca 127.0.0.1:15012 \\
      --credential-dir ./cred --hbone 127.0.0.11:15008 --socks5 127.0.0.11:15080 --access-log /tmp/access.json
  ambit ztunnel run --node $NODE_NAME --cluster kubernetes --ca ambit-ca.ambit-system.svc:15012 \\
      --credential-dir /var/run/secrets/ambit --ca-token-file /var/run/secrets/ambit/token
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the node's ztunnel", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--node", required=True, help="this node's name (a Node object in the cluster state)")
    p.add_argument("--cluster", default=None, help="cluster state source: local:PATH or kubernetes")
    p.add_argument("--state-feed", default=None, metavar="SOCKET",
                   help="follow the node agent's state feed on this unix socket instead of --cluster")
    p.add_argument("--ca", required=True, metavar="HOST:PORT", help="the CA's gRPC address")
    p.add_argument("--credential-dir", required=True, type=Path,
                   help="node credential: tls.crt, tls.key, ca.crt (ca.crt is the trust bundle); "
                   "with --ca-token-file only ca.crt")
    p.add_argument("--ca-token-file", type=Path, default=None, metavar="PATH",
                   help="authenticate to the CA with this ServiceAccount token (re-read on every call) "
                   "instead of the node certificate; for a CA run with --node-auth tokenreview")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system", help="namespace of mesh-wide policies")
    p.add_argument("--outbound", help=f"outbound capture listener (default NODE_IP:{OUTBOUND_PORT})")
    p.add_argument("--inbound-plaintext", help=f"plaintext inbound listener (default NODE_IP:{INBOUND_PLAINTEXT_PORT})")
    p.add_argument("--hbone", help=f"HBONE listener (default NODE_IP:{HBONE_PORT})")
    p.add_argument("--admin", default=f"127.0.0.1:{ADMIN_PORT}", help="admin listener ('off' to disable)")
    p.add_argument("--metrics", help=f"Prometheus listener (default NODE_IP:{METRICS_PORT})")
    p.add_argument("--readiness", help=f"readiness listener (default NODE_IP:{READINESS_PORT})")
    p.add_argument("--socks5", help=f"SOCKS5 listener, off by default (e.g. 127.0.0.1:{SOCKS5_PORT})")
    p.add_argument("--peer-hbone-port", type=int, default=HBONE_PORT,
                   help="HBONE port of the other nodes' ztunnels")
    p.add_argument("--access-log", default="-", help="access log file, '-' for stdout")
    p.add_argument("--drain-timeout", type=float, default=5.0, help="seconds live connections get on shutdown")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    p.add_argument("--cert-ttl", type=duration, default=dt.timedelta(days=1), metavar="DURATION",
                   help="validity asked of the CA for workload certificates, e.g. 24h, 90s (default 24h; renewed at half)")
    p.add_argument("--loopback-workloads", action="store_true",
                   help="workloads live on this host's loopback (test and benchmark rigs only): let "
                        "passthrough dial 127.0.0.0/8, which is refused on a real node")
    p.set_defaults(func=cmd_run)


def _listen(value: str | None, flag: str, port: int) -> Listen | None:
    if value is None or value == "off":
        return None
    return parse_listen(value, flag, port)


def config_from_args(args: argparse.Namespace) -> ZtunnelConfig:
    if not args.cluster and not args.state_feed:
        raise ConfigError("give --cluster local:PATH (or kubernetes), or --state-feed SOCKET")
    return ZtunnelConfig(
        node=args.node,
        cluster=args.cluster or "",
        ca_address=args.ca,
        credential_dir=args.credential_dir,
        ca_token_file=args.ca_token_file,
        trust_domain=args.trust_domain,
        root_namespace=args.root_namespace,
        outbound=_listen(args.outbound, "--outbound", OUTBOUND_PORT),
        inbound_plaintext=_listen(args.inbound_plaintext, "--inbound-plaintext", INBOUND_PLAINTEXT_PORT),
        hbone=_listen(args.hbone, "--hbone", HBONE_PORT),
        admin=_listen(args.admin, "--admin", ADMIN_PORT),
        metrics=_listen(args.metrics, "--metrics", METRICS_PORT),
        readiness=_listen(args.readiness, "--readiness", READINESS_PORT),
        socks5=_listen(args.socks5, "--socks5", SOCKS5_PORT),
        access_log=args.access_log,
        peer_hbone_port=args.peer_hbone_port,
        timeouts=Timeouts(drain=args.drain_timeout),
        loopback_workloads=args.loopback_workloads,
        cert_ttl_seconds=int(args.cert_ttl.total_seconds()),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ztunnel import server

    try:
        cfg = config_from_args(args)
        cfg.check()
    except ConfigError as e:
        raise CliError(str(e)) from e
    source = None
    if args.state_feed:
        from ztunnel.feed import AgentFeedSource

        source = AgentFeedSource(Path(args.state_feed), args.node)
    if not args.no_uvloop:
        use_uvloop()
    try:
        return asyncio.run(server.run(cfg, state_source=source))
    except ConfigError as e:
        raise CliError(str(e)) from e
