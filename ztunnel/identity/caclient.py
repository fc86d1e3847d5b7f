"""The ztunnel's client of the CA: `IstioCertificateService/CreateCertificate` over gRPC/TLS.

Speaks the same wire as istiod (and Cilium's CA), so the ztunnel can use any
of them. It trusts only `ca.crt` and proves its node one of two ways: with
the node credential (`tls.crt`, `tls.key`; mutual TLS; files read once, into
memory), or, given `token_file`, with the ServiceAccount token in that file,
sent as `authorization: Bearer` and re-read on every call because the kubelet
rotates a projected token in place (then no client certificate is used).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import grpc.aio

from ambit.wire import ca as caproto
from ztunnel.identity import IdentityError

log = logging.getLogger("ambit.identity.ca")

# The CA's certificate names this host; the ztunnel dials the CA by IP, so
# the TLS check is made against this fixed name (override for istiod:
# "istiod.istio-system.svc").
DEFAULT_SERVER_NAME = "ambit-ca.ambit-system.svc"
CREDENTIAL_FILES = ("tls.crt", "tls.key", "ca.crt")
BUNDLE_FILE = "ca.crt"

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        "is the CA running and reachable at {addr}? Is the node credential in {creds} issued by "
        "this CA? (the CA refuses a missing or foreign client certificate in the TLS handshake; "
        "its certificate must name {name})"
    ),
    grpc.StatusCode.UNAUTHENTICATED: "the node credential in {creds} was not accepted by the CA (issued by another CA?)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the CA at {addr} did not answer in time",
}
_TOKEN_HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        "is the CA running and reachable at {addr}, and can it reach the Kubernetes API server? "
        "Does {creds}/ca.crt hold the CA's root? (its certificate must name {name})"
    ),
    grpc.StatusCode.UNAUTHENTICATED: (
        "the CA did not accept the token in {token} (expired, wrong audience, another "
        "ServiceAccount, or not a projected token bound to this pod?)"
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: "the CA at {addr} did not answer in time",
}


class CaError(IdentityError):
    """The CA refused or could not be reached; `.code` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def _read(p: Path, what: str, hint: str) -> bytes:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CaError(f"{what} {p}: {e.strerror}; {hint}", grpc.StatusCode.FAILED_PRECONDITION) from e
    if not data.strip():
        raise CaError(f"{what} {p} is empty", grpc.StatusCode.FAILED_PRECONDITION)
    return data


def read_credentials(credential_dir: Path) -> tuple[bytes, bytes, bytes]:
    """(tls.crt, tls.key, ca.crt) bytes; CaError(FAILED_PRECONDITION) naming a missing file."""
    out = [_read(credential_dir / n, "node credential", "create it with `ambit ca node-credential`")
           for n in CREDENTIAL_FILES]
    return out[0], out[1], out[2]


def read_bundle(credential_dir: Path) -> bytes:
    """ca.crt alone (token mode); CaError(FAILED_PRECONDITION) when missing."""
    return _read(credential_dir / BUNDLE_FILE, "CA root bundle", "it holds the root of the CA (ambit-ca-root ConfigMap)")


def read_token(token_file: Path) -> str:
    """The bearer token in `token_file` (surrounding whitespace dropped); CaError(FAILED_PRECONDITION)."""
    token = _read(token_file, "CA token file", "it is the pod's projected ServiceAccount token (audience ambit-ca)")
    try:
        text = token.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CaError(f"CA token file {token_file} is not a token (not ASCII)", grpc.StatusCode.FAILED_PRECONDITION) from None
    if any(c.isspace() for c in text):
        raise CaError(f"CA token file {token_file} holds more than one word; expected one token",
                      grpc.StatusCode.FAILED_PRECONDITION)
    return text


class CaClient:
    """One gRPC channel to the CA; `create_certificate` is safe to call concurrently."""

    def __init__(
        self,
        address: str,
        credential_dir: Path,
        *,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = 10.0,
        metadata: dict[str, str] | None = None,
        token_file: Path | None = None,
    ) -> None:
        """`token_file` given: authenticate by that bearer token, `credential_dir` needs only ca.crt."""
        self.address = address
        self.credential_dir = Path(credential_dir)
        self.server_name = server_name
        self.timeout = timeout
        self.metadata = dict(metadata or {})
        self.token_file = Path(token_file) if token_file is not None else None
        if self.token_file is not None:
            read_token(self.token_file)  # fail at start on a missing file, not at the first renewal
            creds = grpc.ssl_channel_credentials(root_certificates=read_bundle(self.credential_dir))
        else:
            cert, key, ca = read_credentials(self.credential_dir)
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self._channel = grpc.aio.secure_channel(
            address, creds, options=[
                ("grpc.ssl_target_name_override", server_name),
                # gRPC's own reconnect backoff grows to 120 s by default; keep it short so a
                # CA that comes back is seen within seconds (our retries have their own backoff).
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ]
        )
        self._call = self._channel.unary_unary(
            caproto.METHOD,
            request_serializer=None,  # requests are encoded by caproto
            response_deserializer=caproto.decode_response,
        )

    async def create_certificate(self, csr_pem: str, ttl_seconds: int) -> list[str]:
        """Ask for an SVID for the CSR; returns PEM certificates, leaf first. Raises CaError."""
        request = caproto.encode_request(csr_pem, ttl_seconds, self.metadata)
        # Per-call metadata rather than grpc.metadata_call_credentials: a missing or
        # unreadable token then surfaces as this CaError naming the file, not as a
        # generic plugin failure inside gRPC.
        call_metadata = None
        if self.token_file is not None:
            call_metadata = (("authorization", f"Bearer {read_token(self.token_file)}"),)
        try:
            chain: list[str] = await self._call(request, timeout=self.timeout, metadata=call_metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            hints = _TOKEN_HINTS if self.token_file is not None else _HINTS
            hint = hints.get(code, "").format(
                addr=self.address, name=self.server_name, creds=self.credential_dir, token=self.token_file
            )
            msg = f"CA {self.address}: {code.name}: {e.details()}"
            raise CaError(f"{msg} ({hint})" if hint else msg, code) from e
        if not chain:
            raise CaError(f"CA {self.address} returned an empty certificate chain", grpc.StatusCode.INTERNAL)
        return chain

    async def reachable(self, timeout: float) -> bool:
        """Whether the channel to the CA connects (TLS included) within `timeout`."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        await self._channel.close(None)
