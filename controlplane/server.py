"""The CA server: `IstioCertificateService/CreateCertificate` over gRPC/TLS, and who the caller's node is.

Per request: authenticate the caller, in one of two modes (`node_auth`):
`credential` (mutual TLS with a node credential this CA issued) or
`tokenreview` (TLS without a client certificate; the `authorization: Bearer`
metadata carries a pod's ServiceAccount token, which a `TokenAuthenticator`
maps to a node, for a ztunnel, or to the workload itself, e.g. a waypoint).
Then read what the CSR asks for (`authz.inspect_csr`), decide against the
current cluster state (`authz.authorize_caller`), sign, and write one JSON
audit line for every issuance and refusal, naming the auth mode and the node
(and the workload, for a workload's token). Usable in-process
(`CaServer.start()/stop()`, `.port`) by tests and the local cluster, and by
`ambit ca run`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol, TextIO

import grpc
import grpc.aio
from cryptography import x509

from ambit.sources import ClusterSource
from ambit.svid import SvidError, verify_svid
from ambit.wire import ca as caproto
from controlplane import ControlPlaneError, authz
from controlplane.pki import (
    NODE_NAMESPACE,
    NODE_SERVICE_ACCOUNT,
    CaMaterial,
    cert_pem,
    key_pem,
    node_of,
)

log = logging.getLogger("ambit.ca")

DEFAULT_PORT = 15012
DEFAULT_MAX_TTL = 86400
NODE_AUTH_CREDENTIAL = "credential"
NODE_AUTH_TOKENREVIEW = "tokenreview"
NODE_AUTH_MODES = (NODE_AUTH_CREDENTIAL, NODE_AUTH_TOKENREVIEW)


class CaServerError(ControlPlaneError):
    """The CA server could not start (address in use, bad listen address)."""


class AuditLog:
    """One JSON object per line, to a stream; thread-safe (gRPC handlers may run concurrently)."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        record = {"ts": self.clock().isoformat(), "component": "ambit-ca", **fields}
        line = json.dumps(record, sort_keys=False, default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class TokenAuthenticator(Protocol):
    """Maps a bearer token to whom it speaks for (`controlplane.tokenreview.TokenReviewAuthenticator`).

    `identify` returns a node (`authz.NodeCaller`) or a workload
    (`authz.WorkloadCaller`), or None for a token that speaks for no one
    (invalid, expired, wrong audience, not pod-bound, its pod gone); it raises
    `ControlPlaneError` when it cannot answer at all (API server down). It
    blocks (HTTP), so the server calls it off the event loop.
    """

    def identify(self, token: str) -> authz.Caller | None: ...


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, node: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.node = code, reason, node


_CODES = {
    authz.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    authz.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    authz.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}


class CaServer:
    """The CA as an object: `await start()`, `.port`, `await stop()`."""

    def __init__(
        self,
        material: CaMaterial,
        source: ClusterSource,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        max_ttl: int = DEFAULT_MAX_TTL,
        audit: AuditLog | None = None,
        token_auth: TokenAuthenticator | None = None,
    ) -> None:
        """`token_auth` given: node auth by bearer token (`tokenreview`); else by node credential."""
        self.material = material
        self.token_auth = token_auth
        self.node_auth = NODE_AUTH_TOKENREVIEW if token_auth is not None else NODE_AUTH_CREDENTIAL
        self.source = source
        self.host = host
        self.max_ttl = max_ttl
        self.audit = audit or AuditLog()
        self._requested_port = port
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        # The serving certificate names ambit-ca.ambit-system.svc (the in-cluster
        # Service, which clients check whatever address they dial), localhost,
        # 127.0.0.1 and the listen host; made at start, kept in memory.
        key, chain = self.material.server_credential([self.host])
        pairs = [(key_pem(key), b"".join(cert_pem(c) for c in chain if c != self.material.root))]
        if self.token_auth is not None:
            # The token is the caller's credential; no client certificate is asked for.
            creds = grpc.ssl_server_credentials(pairs, require_client_auth=False)
        else:
            creds = grpc.ssl_server_credentials(
                pairs,
                root_certificates=cert_pem(self.material.root),
                # grpcio (checked with 1.85) can only either not ask for a client
                # certificate (require_client_auth=False: the TLS stack then never
                # requests one, so auth_context() has no x509_pem_cert even when
                # the client holds a credential) or require and verify one; it
                # cannot "request and verify if sent". So a caller with no or a
                # foreign certificate is refused in the TLS handshake (it sees
                # UNAVAILABLE); one whose certificate chains to our root but is
                # no node credential gets UNAUTHENTICATED from authenticate().
                require_client_auth=True,
            )
        # No SO_REUSEPORT: a second CA on the same port must fail, not share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_unary_rpc_method_handler(
            self._create_certificate,
            request_deserializer=None,  # raw bytes: decoded by caproto so decode errors map to INVALID_ARGUMENT
            response_serializer=caproto.encode_response,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(caproto.SERVICE, {"CreateCertificate": handler}),)
        )
        target = f"[{self.host}]:{self._requested_port}" if ":" in self.host else f"{self.host}:{self._requested_port}"
        try:
            port = server.add_secure_port(target, creds)
        except RuntimeError as e:
            raise CaServerError(f"cannot listen on {target}: {e} (address in use or not local?)") from e
        if port == 0:
            raise CaServerError(f"cannot listen on {target} (address in use or not local?)")
        await server.start()
        self._server, self.port = server, port
        log.info("CA for trust domain %s serving on %s:%d (node auth: %s)",
                 self.material.trust_domain, self.host, port, self.node_auth)
        return port

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- the RPC ----------------------------------------------------------------

    async def authenticate_call(self, context: grpc.aio.ServicerContext[Any, Any]) -> authz.Caller:
        """Who calls, by the configured mode, else _Refused (UNAUTHENTICATED / UNAVAILABLE)."""
        if self.token_auth is None:
            return authz.NodeCaller(self.authenticate(context))
        token = bearer_token(context.invocation_metadata() or ())
        try:
            # TokenReview is a blocking HTTP call (and maybe a pod read): off the loop.
            caller = await asyncio.to_thread(self.token_auth.identify, token)
        except ControlPlaneError as e:
            raise _Refused(
                grpc.StatusCode.UNAVAILABLE, f"cannot check the node token now: {e}; retry later"
            ) from e
        if caller is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, self._token_rejected())
        return caller

    def _token_rejected(self) -> str:
        sas = sorted(getattr(self.token_auth, "service_accounts", ()) or ())
        auds = list(getattr(self.token_auth, "audiences", ()) or ())
        want = "a projected ServiceAccount token bound to a pod"
        if auds:
            want += f", with audience {' or '.join(auds)},"
        if sas:
            want += f" of {' or '.join(sas)} (a node's ztunnel)"
        if getattr(self.token_auth, "workloads", False):
            want += " or of a Running pod's own ServiceAccount (its own identity only)"
        return (f"bearer token rejected: the CA accepts only {want} "
                "(expired, wrong audience, not bound to a pod, or its pod gone?)")

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The node name of the caller's verified node credential, else _Refused(UNAUTHENTICATED)."""
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or [])
        if not pems:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate: call with a node credential (ambit ca node-credential)",
            )
        try:
            leaf = x509.load_pem_x509_certificate(pems[0])
            # gRPC verified the chain to our root; re-check it as an SVID of our
            # trust domain, so a credential from another CA or an expired one never passes.
            ident = verify_svid([leaf, *self.material.intermediates], self.material.bundle)
        except (ValueError, SvidError) as e:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, f"client certificate rejected: {e}") from e
        node = node_of(leaf)
        if ident.namespace != NODE_NAMESPACE or ident.service_account != NODE_SERVICE_ACCOUNT or node is None:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"client certificate of {ident} is not a node credential (O=ambit:nodes, CN=ambit:node:<node>)",
            )
        return node

    async def _create_certificate(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
        node: str | None = None
        caller: authz.Caller | None = None
        ident = None
        peer = context.peer()
        try:
            caller = await self.authenticate_call(context)
            node = caller.node
            try:
                csr, ttl, meta = caproto.decode_request(request)
            except Exception as e:  # protobuf raises DecodeError and friends
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"request is not an IstioCertificateRequest: {e}", node) from e
            facts = authz.inspect_csr(csr, self.material.trust_domain)
            if isinstance(facts, authz.Verdict):
                raise _Refused(_CODES[facts.code], facts.reason, node)
            ident = facts.identity
            verdict = authz.authorize_caller(caller, ident, self.source.current())
            if not verdict.allowed:
                raise _Refused(_CODES[verdict.code], verdict.reason, node)
            granted = min(ttl, self.max_ttl) if ttl > 0 else self.max_ttl
            chain = self.material.sign_leaf(facts.public_key, ident, dt.timedelta(seconds=granted))
        except _Refused as r:
            self.audit.write(
                event="refused", auth=self.node_auth, node=r.node or node, **_workload_fields(caller),
                identity=str(ident) if ident else None, code=r.code.name, reason=r.reason, peer=peer,
            )
            await context.abort(r.code, r.reason)
            raise AssertionError("unreachable") from None  # abort() raises
        leaf = chain[0]
        self.audit.write(
            event="issued", auth=self.node_auth, node=node, **_workload_fields(caller), identity=str(ident), serial=f"{leaf.serial_number:x}",
            not_before=leaf.not_valid_before_utc.isoformat(), not_after=leaf.not_valid_after_utc.isoformat(),
            requested_ttl=ttl, granted_ttl=granted, peer=peer, metadata=meta or None,
        )
        return [cert_pem(c).decode() for c in chain]


def _workload_fields(caller: authz.Caller | None) -> dict[str, str]:
    """The audit line's `workload` and `pod` for a workload's own token (none for a node)."""
    if isinstance(caller, authz.WorkloadCaller):
        return {"workload": f"{caller.namespace}/{caller.service_account}", "pod": f"{caller.namespace}/{caller.pod}"}
    return {}


def bearer_token(metadata: Any) -> str:
    """The token of the `authorization: Bearer <token>` metadata, else _Refused(UNAUTHENTICATED)."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise _Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "no bearer token: this CA authenticates nodes by ServiceAccount token (--node-auth tokenreview); "
            "send 'authorization: Bearer <token>' (ambit ztunnel run --ca-token-file)",
        )
    value = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "authorization metadata is not 'Bearer <token>'")
    return token.strip()
