"""`ambit ca ...`: create a CA directory, issue node credentials, run the CA server (and pick its node auth)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from ambit.args import CliError, duration
from ambit.cluster import ClusterError
from ambit.sources import ClusterSource, open_source
from controlplane import ControlPlaneError
from controlplane.pki import NODE_TTL, CaMaterial, write_node_credential
from controlplane.server import (
    DEFAULT_MAX_TTL,
    DEFAULT_PORT,
    NODE_AUTH_CREDENTIAL,
    NODE_AUTH_MODES,
    NODE_AUTH_TOKENREVIEW,
    AuditLog,
    CaServer,
    TokenAuthenticator,
)

log = logging.getLogger("ambit.ca")

EXAMPLES = """examples:
  ambit ca init --dir /tmp/ca
  ambit ca node-credential --dir /tmp/ca --node node-a --out /tmp/node-a
  ambit ca run --dir /tmp/ca --cluster local:/run/ambit/local/cluster --listen 127.0.0.1:15012
  ambit ca run --dir /var/lib/ambit/ca --cluster kubernetes --listen 0.0.0.0:15012 --node-auth tokenreview
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "init", help="create a CA directory (Istio plug-in layout)", epilog=EXAMPLES, formatter_class=fmt,
        description="Write root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem: a self-signed root "
        "and an intermediate it signs, which signs every workload certificate.",
    )
    p.add_argument("--dir", required=True, type=Path, help="directory to write the CA into")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    p.add_argument("--force", action="store_true", help="replace an existing CA in --dir")
    p.add_argument("--node-credential", action="append", default=[], metavar="NODE=DIR",
                   help="also issue NODE's credential into DIR, as `ambit ca node-credential` (repeatable)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "node-credential", help="issue the credential a node's ztunnel uses to call the CA",
        epilog=EXAMPLES, formatter_class=fmt,
        description="Write tls.crt, tls.key and ca.crt into --out. The certificate is an X.509-SVID for "
        "spiffe://<td>/ns/ambit-system/sa/ztunnel whose subject O=ambit:nodes, CN=ambit:node:<node> "
        "names the node; the CA issues workload certificates to it only for pods on that node.",
    )
    p.add_argument("--dir", required=True, type=Path, help="the CA directory")
    p.add_argument("--node", required=True, help="node name (as in the Pods' spec.nodeName)")
    p.add_argument("--out", required=True, type=Path, help="directory for tls.crt, tls.key, ca.crt")
    p.add_argument("--ttl", type=duration, default=NODE_TTL, help="validity, e.g. 365d, 12h (default 365d)")
    p.add_argument("--trust-domain", default=None, help="override the trust domain read from the root")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_node_credential)

    p = sub.add_parser(
        "run", help="serve IstioCertificateService/CreateCertificate over gRPC/TLS", epilog=EXAMPLES,
        formatter_class=fmt,
        description="Issue X.509-SVIDs to ztunnels: a node gets ns/N/sa/S only while a pod with that "
        "namespace and service account is scheduled on it. The calling node is known from its node "
        "credential (--node-auth credential: mutual TLS) or from its pod's ServiceAccount token "
        "(--node-auth tokenreview: 'authorization: Bearer', checked by a Kubernetes TokenReview). "
        "With tokenreview, any other Running pod's bound token obtains exactly its own identity "
        "(waypoints). One JSON audit line per issuance/refusal.",
    )
    p.add_argument("--dir", required=True, type=Path, help="the CA directory")
    p.add_argument("--cluster", required=True, help="cluster state source: local:PATH or kubernetes")
    p.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help=f"HOST:PORT (default 127.0.0.1:{DEFAULT_PORT})")
    p.add_argument("--max-ttl", type=duration, default=dt.timedelta(seconds=DEFAULT_MAX_TTL),
                   help="cap on the requested validity (default 24h)")
    p.add_argument("--audit-log", type=Path, default=None, help="append audit JSON lines here (default stderr)")
    p.add_argument("--trust-domain", default=None, help="override the trust domain read from the root")
    p.add_argument("--node-auth", choices=NODE_AUTH_MODES, default=NODE_AUTH_CREDENTIAL,
                   help="how a caller proves its node: credential (node certificate, mutual TLS; default) or "
                   "tokenreview (ServiceAccount token reviewed by the Kubernetes API server)")
    p.add_argument("--token-review-api", default=None, metavar="SPEC",
                   help="tokenreview: the API server to ask, kubernetes or kubernetes:KUBECONFIG "
                   "(default: --cluster, which must then be kubernetes[:KUBECONFIG])")
    p.add_argument("--token-service-account", action="append", default=None, metavar="NS/NAME",
                   help="tokenreview: a ServiceAccount whose pod-bound tokens speak for their node "
                   "(repeatable; default ambit-system/ambit, the DaemonSet's)")
    p.add_argument("--token-audience", action="append", default=None, metavar="AUD",
                   help="tokenreview: audience the token must carry (repeatable; default ambit-ca)")
    p.add_argument("--no-workload-tokens", action="store_true",
                   help="tokenreview: refuse tokens of other ServiceAccounts (by default a Running pod's "
                   "bound token obtains its own identity, as waypoints on Kubernetes need)")
    p.set_defaults(func=cmd_run)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise CliError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    host = host.strip("[]")
    try:
        n = int(port)
    except ValueError:
        raise CliError(f"--listen {text!r}: port {port!r} is not a number") from None
    if not 0 <= n <= 65535:
        raise CliError(f"--listen {text!r}: port {n} is out of range")
    return host, n


def _print(args: argparse.Namespace, rows: dict[str, Any]) -> None:
    if getattr(args, "output", "table") == "json":
        import json

        print(json.dumps(rows, indent=2, default=str))
        return
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        print(f"{k.upper():<{width}}  {v}")


def cmd_init(args: argparse.Namespace) -> int:
    creds: list[tuple[str, Path]] = []
    for spec in args.node_credential:
        node, sep, out = spec.partition("=")
        if not sep or not node or not out:
            raise CliError(f"--node-credential {spec!r}: expected NODE=DIR, e.g. node-a=/tmp/node-a")
        creds.append((node, Path(out)))
    try:
        m = CaMaterial.generate(args.trust_domain)
        m.write(args.dir, force=args.force)
        for node, out in creds:
            write_node_credential(m, node, out)
    except ControlPlaneError as e:
        raise CliError(str(e)) from e
    _print(args, {
        "dir": args.dir, "trust_domain": m.trust_domain,
        "root_expires": m.root.not_valid_after_utc.isoformat(),
        "ca_cert_expires": m.ca_cert.not_valid_after_utc.isoformat(),
        "node_credentials": ", ".join(n for n, _ in creds) or "-",
    })
    return 0


def cmd_node_credential(args: argparse.Namespace) -> int:
    try:
        m = CaMaterial.load(args.dir, args.trust_domain)
        out = write_node_credential(m, args.node, args.out, args.ttl)
    except ControlPlaneError as e:
        raise CliError(str(e)) from e
    _print(args, {"node": args.node, "out": out, "files": "tls.crt tls.key ca.crt",
                  "identity": f"spiffe://{m.trust_domain}/ns/ambit-system/sa/ztunnel"})
    return 0


def token_authenticator(args: argparse.Namespace) -> TokenAuthenticator | None:
    """The TokenReview authenticator `--node-auth tokenreview` asks for (None in credential mode)."""
    token_flags = [f for f, v in (("--token-review-api", args.token_review_api),
                                  ("--token-service-account", args.token_service_account),
                                  ("--token-audience", args.token_audience),
                                  ("--no-workload-tokens", args.no_workload_tokens)) if v]
    if args.node_auth != NODE_AUTH_TOKENREVIEW:
        if token_flags:
            raise CliError(f"{', '.join(token_flags)} only apply with --node-auth tokenreview")
        return None
    spec = args.token_review_api or args.cluster
    if spec != "kubernetes" and not spec.startswith("kubernetes:"):
        raise CliError(
            f"--node-auth tokenreview needs a Kubernetes API server to review tokens: --cluster is {spec!r}; "
            "use --cluster kubernetes[:KUBECONFIG] or give --token-review-api kubernetes[:KUBECONFIG]"
        )
    # Imported here: the kubernetes client is slow to import and credential mode never needs it.
    from controlplane.tokenreview import (
        DEFAULT_AUDIENCES,
        DEFAULT_SERVICE_ACCOUNTS,
        TokenReviewAuthenticator,
    )

    try:
        return TokenReviewAuthenticator.from_spec(
            spec,
            service_accounts=args.token_service_account or DEFAULT_SERVICE_ACCOUNTS,
            audiences=args.token_audience or DEFAULT_AUDIENCES,
            workloads=not args.no_workload_tokens,
        )
    except ValueError as e:  # a bad --token-service-account
        raise CliError(f"--token-service-account: {e}") from e


# What the CA reads of the cluster: which pods (namespace, service account) run on which
# node. On Kubernetes it lists and watches pods alone, so its RBAC needs nothing else.
CA_KUBE_RESOURCES = ("pods",)


def cluster_source(spec: str) -> ClusterSource:
    return open_source(spec, resources=CA_KUBE_RESOURCES)


def cmd_run(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    try:
        material = CaMaterial.load(args.dir, args.trust_domain)
        token_auth = token_authenticator(args)
        source = cluster_source(args.cluster)
    except (ControlPlaneError, ClusterError) as e:
        raise CliError(str(e)) from e
    stream: TextIO = sys.stderr
    if args.audit_log is not None:
        try:
            stream = args.audit_log.open("a", buffering=1)
        except OSError as e:
            raise CliError(f"--audit-log {args.audit_log}: {e.strerror}") from e
    server = CaServer(material, source, host=host, port=port,
                      max_ttl=int(args.max_ttl.total_seconds()), audit=AuditLog(stream), token_auth=token_auth)
    try:
        return asyncio.run(_serve(server))
    except ControlPlaneError as e:
        raise CliError(str(e)) from e
    finally:
        source.close()
        if stream is not sys.stderr:
            stream.close()


async def _serve(server: CaServer) -> int:
    port = await server.start()
    # The readiness line tests and supervisors wait for and parse (port last): keep its shape.
    print(f"ambit-ca listening on {server.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("CA shutting down")
    await server.stop()
    return 0
