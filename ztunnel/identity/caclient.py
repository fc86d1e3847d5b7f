"""The ztunnel's client of the CA: `IstioCertificateService/CreateCertificate` over gRPC with mTLS.

Speaks the same wire as istiod (and Cilium's CA), so the ztunnel can use any
of them. The channel authenticates with the node credential (`tls.crt`,
`tls.key`) and trusts only `ca.crt`; the files are read once, into memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import grpc.aio

from ztunnel.identity import IdentityError, caproto

log = logging.getLogger("ambit.identity.ca")

# The CA's certificate names this host; the ztunnel dials the CA by IP, so
# the TLS check is made against this fixed name (override for istiod:
# "istiod.istio-system.svc").
DEFAULT_SERVER_NAME = "ambit-ca.ambit-system.svc"
CREDENTIAL_FILES = ("tls.crt", "tls.key", "ca.crt")

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        "is the CA running and reachable at {addr}? Is the node credential in {creds} issued by "
        "this CA? (the CA refuses a missing or foreign client certificate in the TLS handshake; "
        "its certificate must name {name})"
    ),
    grpc.StatusCode.UNAUTHENTICATED: "the node credential in {creds} was not accepted by the CA (issued by another CA?)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the CA at {addr} did not answer in time",
}


class CaError(IdentityError):
    """The CA refused or could not be reached; `.code` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


def read_credentials(credential_dir: Path) -> tuple[bytes, bytes, bytes]:
    """(tls.crt, tls.key, ca.crt) bytes; CaError(FAILED_PRECONDITION) naming a missing file."""
    out = []
    for name in CREDENTIAL_FILES:
        p = credential_dir / name
        try:
            data = p.read_bytes()
        except OSError as e:
            raise CaError(
                f"node credential {p}: {e.strerror}; create it with `ambit ca node-credential`",
                grpc.StatusCode.FAILED_PRECONDITION,
            ) from e
        if not data.strip():
            raise CaError(f"node credential {p} is empty", grpc.StatusCode.FAILED_PRECONDITION)
        out.append(data)
    return out[0], out[1], out[2]


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
    ) -> None:
        self.address = address
        self.credential_dir = Path(credential_dir)
        self.server_name = server_name
        self.timeout = timeout
        self.metadata = dict(metadata or {})
        cert, key, ca = read_credentials(self.credential_dir)
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        self._channel = grpc.aio.secure_channel(
            address, creds, options=[("grpc.ssl_target_name_override", server_name)]
        )
        self._call = self._channel.unary_unary(
            caproto.METHOD,
            request_serializer=None,  # requests are encoded by caproto
            response_deserializer=caproto.decode_response,
        )

    async def create_certificate(self, csr_pem: str, ttl_seconds: int) -> list[str]:
        """Ask for an SVID for the CSR; returns PEM certificates, leaf first. Raises CaError."""
        request = caproto.encode_request(csr_pem, ttl_seconds, self.metadata)
        try:
            chain: list[str] = await self._call(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            hint = _HINTS.get(code, "").format(addr=self.address, name=self.server_name, creds=self.credential_dir)
            msg = f"CA {self.address}: {code.name}: {e.details()}"
            raise CaError(f"{msg} ({hint})" if hint else msg, code) from e
        if not chain:
            raise CaError(f"CA {self.address} returned an empty certificate chain", grpc.StatusCode.INTERNAL)
        return chain

    async def close(self) -> None:
        await self._channel.close(None)
