"""The `ambit` command line: one entry point, subcommands registered by the package that owns them.

Each owning module exposes `register(subparsers)`, which adds its subcommands
and sets `func` (taking the parsed args, returning an exit status). A module is
imported only when its group is named, so `ambit ca ...` does not load BCC.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ambit.args import CliError

# group name -> (module that registers it, one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "ca": ("controlplane.cli", "the cluster CA: init, node-credential, run"),
    "ztunnel": ("ztunnel.cli", "the per-node ztunnel"),
    "waypoint": ("waypoint.cli", "a waypoint: L7 policy for the workloads that use it"),
    "gateway": ("gateway.cli", "an ingress gateway: HTTP/HTTPS from outside into the mesh"),
    "agent": ("agent.agentcli", "the node agent"),
    "local": ("agent.local.cli", "a local cluster of network namespaces and cgroups"),
}
# top-level inspection commands (flows, workloads, certs, policies, policy, status, version)
INSPECT_MODULE = "agent.inspect"

EPILOG = """examples:
  ambit ca init --dir /tmp/ca
  ambit local up --nodes 2
  ambit local apply -f examples/
  ambit flows --node node-a
  ambit policy check --from shop/frontend --to shop/backend-0:8080
"""


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambit",
        description="ambit: an ambient-style service mesh for Linux nodes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the group named on the command line (fast, and no
    # BCC import for commands that do not need it); `--help` lists them all.
    named = next((a for a in argv if not a.startswith("-")), None)
    for group, (module, help_text) in GROUPS.items():
        if named == group:
            gp = sub.add_parser(group, help=help_text)
            _register(module, gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True))
        else:
            sub.add_parser(group, help=help_text)
    if named not in GROUPS:
        _register(INSPECT_MODULE, sub)
    return parser


def _register(module: str, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    importlib.import_module(module).register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        status = func(args)
    except CliError as e:
        print(f"ambit: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
