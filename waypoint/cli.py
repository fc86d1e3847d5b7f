"""`ambit waypoint run`: the waypoint's command line."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ambit.args import CliError
from waypoint import WaypointError
from waypoint.process import add_proxy_arguments, proxy_config_args
from ztunnel.config import ConfigError as ZtunnelConfigError
from ztunnel.config import parse_listen

EXAMPLE = """example:
  ambit waypoint run --gateway pay/waypoint --node node-a --cluster local:/run/ambit/local/cluster \\
      --ca 10.200.1.2:15012 --credential-dir /run/ambit/local/nodes/node-a/credential
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a waypoint (L7 policy for the workloads that use it)", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_proxy_arguments(p, "waypoint", "ambit-waypoint", "pay/waypoint")
    p.add_argument("--listen", default="0.0.0.0:15008", help="HBONE listener (default 0.0.0.0:15008)")
    p.add_argument("--extension-provider", action="append", default=[], metavar="NAME=URL",
                   help="an external authorizer CUSTOM policies may name: NAME=http://HOST:PORT/PATH_PREFIX or "
                        "NAME=grpc://HOST:PORT (repeatable)")
    p.add_argument("--mesh-config", type=Path, default=None, metavar="FILE",
                   help="Istio's mesh config (or the istio ConfigMap holding it): its extensionProviders "
                        "(envoyExtAuthzHttp, envoyExtAuthzGrpc) are the external authorizers")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ambit.tasks import use_uvloop
    from waypoint.server import ConfigError, WaypointConfig, run

    common = proxy_config_args(args)
    from waypoint.extauthz import ProviderError, parse_mesh_config, parse_provider_flag

    try:
        providers = parse_mesh_config(args.mesh_config.read_text()) if args.mesh_config else []
        providers += [parse_provider_flag(v) for v in args.extension_provider]
    except OSError as e:
        raise CliError(f"--mesh-config {args.mesh_config}: {e.strerror}") from e
    except ProviderError as e:
        raise CliError(str(e)) from e

    try:
        cfg = WaypointConfig(**common, hbone=parse_listen(args.listen, "--listen", 15008),
                             extension_providers=tuple(providers))
    except ZtunnelConfigError as e:
        raise CliError(str(e)) from e
    if not args.no_uvloop:
        use_uvloop()
    try:
        return asyncio.run(run(cfg))
    except (ConfigError, WaypointError) as e:
        raise CliError(str(e)) from e
