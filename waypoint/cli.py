"""`ambit waypoint run`: the waypoint's command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path

from ambit.args import CliError, duration
from waypoint import WaypointError
from ztunnel.config import ConfigError as ZtunnelConfigError
from ztunnel.config import Listen, Timeouts, parse_listen

EXAMPLE = """example:
  ambit waypoint run --gateway pay/waypoint --node node-a --cluster local:/run/ambit/local/cluster \\
      --ca 10.200.1.2:15012 --credential-dir /run/ambit/local/nodes/node-a/credential
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a waypoint (L7 policy for the workloads that use it)", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway", required=True, metavar="NS/NAME",
                   help="the Gateway (class ambit-waypoint) this waypoint serves")
    p.add_argument("--node", required=True, help="the node it runs on (its identity is asked of the CA from there)")
    p.add_argument("--cluster", required=True, help="cluster state source: local:PATH or kubernetes")
    p.add_argument("--ca", required=True, metavar="HOST:PORT", help="the CA's gRPC address")
    p.add_argument("--credential-dir", required=True, type=Path,
                   help="ca.crt, and the node credential (tls.crt, tls.key) unless --ca-token-file")
    p.add_argument("--ca-token-file", type=Path, default=None, metavar="PATH",
                   help="authenticate to the CA with this ServiceAccount token instead of a node credential")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--root-namespace", default="istio-system", help="namespace of mesh-wide policies")
    p.add_argument("--listen", default="0.0.0.0:15008", help="HBONE listener (default 0.0.0.0:15008)")
    p.add_argument("--metrics", default="0.0.0.0:15020", help="Prometheus listener ('off' to disable)")
    p.add_argument("--readiness", default="0.0.0.0:15021", help="readiness listener ('off' to disable)")
    p.add_argument("--admin", default="127.0.0.1:15000", help="admin listener ('off' to disable)")
    p.add_argument("--access-log", default="-", help="access log file (one JSON line per request), '-' for stdout")
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help="where the last good policies are kept across restarts")
    p.add_argument("--otlp-endpoint", default=None, metavar="HOST:PORT",
                   help="export a span per request over OTLP/gRPC to this collector")
    p.add_argument("--cert-ttl", type=duration, default=dt.timedelta(days=1), metavar="DURATION",
                   help="validity asked of the CA for the waypoint's certificate (default 24h)")
    p.add_argument("--extension-provider", action="append", default=[], metavar="NAME=URL",
                   help="an external authorizer CUSTOM policies may name: NAME=http://HOST:PORT/PATH_PREFIX or "
                        "NAME=grpc://HOST:PORT (repeatable)")
    p.add_argument("--mesh-config", type=Path, default=None, metavar="FILE",
                   help="Istio's mesh config (or the istio ConfigMap holding it): its extensionProviders "
                        "(envoyExtAuthzHttp, envoyExtAuthzGrpc) are the external authorizers")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ambit.tasks import use_uvloop
    from waypoint.server import ConfigError, WaypointConfig, run

    ns, sep, name = args.gateway.partition("/")
    if not sep or not ns or not name:
        raise CliError(f"--gateway {args.gateway!r}: expected NAMESPACE/NAME, e.g. pay/waypoint")

    def listen(value: str, flag: str, port: int) -> Listen | None:
        return None if value == "off" else parse_listen(value, flag, port)

    from waypoint.extauthz import ProviderError, parse_mesh_config, parse_provider_flag

    try:
        providers = parse_mesh_config(args.mesh_config.read_text()) if args.mesh_config else []
        providers += [parse_provider_flag(v) for v in args.extension_provider]
    except OSError as e:
        raise CliError(f"--mesh-config {args.mesh_config}: {e.strerror}") from e
    except ProviderError as e:
        raise CliError(str(e)) from e

    try:
        cfg = WaypointConfig(
            namespace=ns, gateway=name, node=args.node, cluster=args.cluster, ca_address=args.ca,
            credential_dir=args.credential_dir, ca_token_file=args.ca_token_file, trust_domain=args.trust_domain,
            root_namespace=args.root_namespace, hbone=parse_listen(args.listen, "--listen", 15008),
            metrics=listen(args.metrics, "--metrics", 15020), readiness=listen(args.readiness, "--readiness", 15021),
            admin=listen(args.admin, "--admin", 15000), access_log=args.access_log, state_dir=args.state_dir,
            otlp_endpoint=args.otlp_endpoint, timeouts=Timeouts(),
            cert_ttl_seconds=int(args.cert_ttl.total_seconds()), extension_providers=tuple(providers),
        )
    except ZtunnelConfigError as e:
        raise CliError(str(e)) from e
    if not args.no_uvloop:
        use_uvloop()
    try:
        return asyncio.run(run(cfg))
    except (ConfigError, WaypointError) as e:
        raise CliError(str(e)) from e
