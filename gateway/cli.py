"""`ambit gateway run`: the ingress gateway's command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress

from ambit.args import CliError, duration
from gateway import GatewayError
from waypoint.process import add_proxy_arguments, proxy_config_args

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
    add_proxy_arguments(p, "gateway", "ambit-ingress", "edge/ingress")
    p.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS", help="address of the listeners (default 0.0.0.0)")
    p.add_argument("--idle-timeout", type=duration, default=dt.timedelta(seconds=60), metavar="DURATION",
                   help="close a client connection whose next request head does not come within this "
                        "(408 for a head sent too slowly; default 60s)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ambit.tasks import use_uvloop
    from gateway.server import ConfigError, GatewayConfig, run

    common = proxy_config_args(args)
    try:
        ipaddress.ip_address(args.bind)
    except ValueError:
        raise CliError(f"--bind {args.bind!r}: not an IP address") from None
    cfg = GatewayConfig(**common, bind=args.bind, idle_timeout=args.idle_timeout.total_seconds())
    if not args.no_uvloop:
        use_uvloop()
    try:
        return asyncio.run(run(cfg))
    except (ConfigError, GatewayError) as e:
        raise CliError(str(e)) from e
