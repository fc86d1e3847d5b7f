"""`ambit gateway run`: the ingress gateway's command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
from pathlib import Path

from ambit.args import CliError, duration
from gateway import GatewayError
from ztunnel.config import ConfigError as ZtunnelConfigError
from ztunnel.config import Listen, Timeouts, parse_listen

EXAMPLE = """example:
  ambit gateway run --gateway edge/ingress --node node-a --cluster local:/run/ambit/local/cluster \\
      --ca 10.200.1.2:15012 --credential-dir /run/ambit/local/nodes/node-a/credential

The Gateway (class ambit-ingress) names the ports: every listener's port is opened on
--bind. Its HTTPRoutes, RateLimitPolicies, and Istio's RequestAuthentication and
AuthorizationPolicy (targetRefs: the Gateway) decide each request.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run an ingress gateway (HTTP/HTTPS into the mesh)", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", required=True, metavar="NS/NAME",
                   help="the Gateway (class ambit-ingress) this gateway serves")
    p.add_argument("--node", required=True, help="the node it runs on (its identity is asked of the CA from there)")
    p.add_argument("--cluster", required=True, help="cluster state source: local:PATH or kubernetes")
    p.add_argument("--ca", required=True, metavar="HOST:PORT", help="the CA's gRPC address")
    p.add_argument("--credential-dir", required=True, type=Path,
                   help="ca.crt, and the node credential (tls.crt, tls.key) unless --ca-token-file")
    p.add_argument("--ca-token-file", type=Path, default=None, metavar="PATH",
                   help="authenticate to the CA with this ServiceAccount token instead of a node credential")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system", help="namespace of mesh-wide policies")
    p.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS", help="address of the listeners (default 0.0.0.0)")
    p.add_argument("--metrics", default="0.0.0.0:15020", help="Prometheus listener ('off' to disable)")
    p.add_argument("--readiness", default="0.0.0.0:15021", help="readiness listener ('off' to disable)")
    p.add_argument("--admin", default="127.0.0.1:15000", help="admin listener ('off' to disable)")
    p.add_argument("--access-log", default="-", help="access log file (one JSON line per request), '-' for stdout")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="where the last good policies are kept across restarts")
    p.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                   help="export a span per request over OTLP/gRPC to this collector")
    p.add_argument("--idle-timeout", type=duration, default=dt.timedelta(seconds=60), metavar="DURATION",
                   help="close a client connection whose next request head does not come within this "
                        "(408 for a head sent too slowly; default 60s)")
    p.add_argument("--cert-ttl", type=duration, default=dt.timedelta(days=1), metavar="DURATION",
                   help="validity asked of the CA for the gateway's certificate (default 24h)")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ambit.tasks import use_uvloop
    from gateway.server import ConfigError, GatewayConfig, run

    ns, sep, name = args.gateway.partition("/")
    if not sep or not ns or not name:
        raise CliError(f"--gateway {args.gateway!r}: expected NAMESPACE/NAME, e.g. edge/ingress")
    try:
        ipaddress.ip_address(args.bind)
    except ValueError:
        raise CliError(f"--bind {args.bind!r}: not an IP address") from None

    def listen(value: str, flag: str, port: int) -> Listen | None:
        return None if value == "off" else parse_listen(value, flag, port)

    try:
        cfg = GatewayConfig(
            namespace=ns, gateway=name, node=args.node, cluster=args.cluster, ca_address=args.ca,
            credential_dir=args.credential_dir, ca_token_file=args.ca_token_file, trust_domain=args.trust_domain,
            root_namespace=args.root_namespace, bind=args.bind,
            metrics=listen(args.metrics, "--metrics", 15020), readiness=listen(args.readiness, "--readiness", 15021),
            admin=listen(args.admin, "--admin", 15000), access_log=args.access_log, state_dir=args.state_dir,
            otlp_endpoint=args.otlp_endpoint, timeouts=Timeouts(), cert_ttl_seconds=int(args.cert_ttl.total_seconds()),
            idle_timeout=args.idle_timeout.total_seconds(),
        )
    except ZtunnelConfigError as e:
        raise CliError(str(e)) from e
    if not args.no_uvloop:
        use_uvloop()
    try:
        return asyncio.run(run(cfg))
    except (ConfigError, GatewayError) as e:
        raise CliError(str(e)) from e
