"""Why the ztunnel refuses a connection: one table from each refusal to everything that names it.

Every way a connection can fail to be proxied is a `Refusal`; `REFUSALS` gives
each one its HBONE status (what the destination answers a CONNECT refused so),
its `reason` label on `ambit_connections_refused_total`, the Envoy-style
response flag of its connection record (metrics, access log, /connections),
the SOCKS5 reply (RFC 1928) a SOCKS5 client is sent, and a short description.
The inbound path answers with `hbone_status`; the source reads the peer's answer
back with `Refusal.from_peer_status`. Pure: no other part of the ztunnel writes
a status, a flag, a label or a SOCKS5 code of a refusal.

Every value here is on the wire or in users' dashboards: change one only as a
deliberate, announced change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum, auto
from types import MappingProxyType

from ztunnel import socks5


class ResponseFlag(StrEnum):
    """The `response_flags` of a connection record and of Istio's TCP metrics (Envoy's names)."""

    NONE = "-"
    POLICY_DENIED = "DENY"  # Istio's RBAC denial
    NO_ROUTE = "NR"  # no route: the destination is unknown, unroutable or refused before dialing
    UPSTREAM_FAILURE = "UF"  # the upstream connection failed (refused, timed out, answered 503)
    UNAUTHORIZED = "UAEX"  # no authorization to go out: the source has no certificate yet
    DRAINING = "DR"  # the ztunnel is shutting down
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"  # the client broke the protocol (HBONE, TLS, SOCKS5)
    NO_HEALTHY_UPSTREAM = "UH"  # the destination's waypoint has no running pod, or does not exist


class Refusal(Enum):
    """A reason the ztunnel refused, or could not complete, a connection. See `REFUSALS`."""

    # the source side (15001, SOCKS5): where does it go?
    UNKNOWN_SOURCE = auto()
    NO_ORIGINAL_DST = auto()
    LOOP = auto()
    UNKNOWN_NAME = auto()
    NO_SERVICE_PORT = auto()
    NO_ENDPOINTS = auto()
    FORBIDDEN_DESTINATION = auto()
    UNKNOWN_NODE = auto()
    BAD_DESTINATION = auto()
    WAYPOINT_UNAVAILABLE = auto()
    CERT_NOT_READY = auto()
    PEER_BAD_REQUEST = auto()
    SOCKS5_PROTOCOL = auto()
    SOCKS5_TIMEOUT = auto()
    # either side
    DRAINING = auto()
    POLICY_DENIED = auto()
    UNKNOWN_DESTINATION = auto()
    UPSTREAM_UNREACHABLE = auto()
    # the destination side (15008, 15006)
    STRICT_MTLS = auto()
    UNTRUSTED_CLIENT_ADDRESS = auto()
    BAD_REQUEST = auto()
    PEER_CERTIFICATE = auto()

    @property
    def spec(self) -> RefusalSpec:
        return REFUSALS[self]

    @property
    def hbone_status(self) -> int:
        """The HBONE status the destination answers a CONNECT refused for this reason."""
        status = self.spec.status
        if status is None:
            raise ValueError(f"{self.name} is never answered on HBONE")
        return status

    @property
    def socks5_reply(self) -> int:
        """The SOCKS5 reply code; a general failure for one that no SOCKS5 client should see."""
        code = self.spec.socks5
        return socks5.GENERAL_FAILURE if code is None else code

    @classmethod
    def from_peer_status(cls, status: int | None) -> Refusal:
        """What the source records when the destination answered `status` to its CONNECT
        (None: no answer at all; the tunnel failed before one)."""
        if status is None:
            return Refusal.UPSTREAM_UNREACHABLE
        return _BY_PEER_STATUS.get(status, Refusal.UPSTREAM_UNREACHABLE)


@dataclass(frozen=True)
class RefusalSpec:
    """Everything that names one `Refusal`."""

    label: str  # `reason` label of ambit_connections_refused_total
    flag: ResponseFlag
    # The HBONE status of the destination's decision (what 15008 answers; `check_inbound`'s
    # status); None: not a destination's decision, or never answered on HBONE.
    status: int | None
    # The SOCKS5 reply code (RFC 1928 section 6) sent to a SOCKS5 client; None: a SOCKS5
    # client never sees it (a destination-side refusal, or one the SOCKS5 handshake answers).
    socks5: int | None
    description: str
    # The source records this refusal when its peer answers this HBONE status.
    peer_status: int | None = None


_S = RefusalSpec
_F = ResponseFlag

REFUSALS: Mapping[Refusal, RefusalSpec] = MappingProxyType({
    Refusal.UNKNOWN_SOURCE: _S(
        "unknown_source", _F.NO_ROUTE, None, socks5.NOT_ALLOWED,
        "the source is not an enrolled workload of this node: the ztunnel lends no identity to it"),
    Refusal.NO_ORIGINAL_DST: _S(
        "no_original_dst", _F.NO_ROUTE, None, None,
        "a captured connection without an original destination (it was not redirected)"),
    Refusal.LOOP: _S(
        "loop", _F.NO_ROUTE, None, None,
        "a connection addressed to the outbound listener itself"),
    Refusal.UNKNOWN_NAME: _S(
        "unknown_name", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "a SOCKS5 domain name that is no service of the mesh"),
    Refusal.NO_SERVICE_PORT: _S(
        "no_service_port", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "the service has no such port"),
    Refusal.NO_ENDPOINTS: _S(
        "no_endpoints", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "the service has no ready endpoints"),
    Refusal.FORBIDDEN_DESTINATION: _S(
        "forbidden_destination", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "a passthrough destination that means the node itself, or is no unicast address"),
    Refusal.UNKNOWN_NODE: _S(
        "unknown_node", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "the destination runs on a node whose address is unknown"),
    Refusal.BAD_DESTINATION: _S(
        "bad_destination", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "the destination makes no valid HBONE authority (e.g. port 0)"),
    Refusal.WAYPOINT_UNAVAILABLE: _S(
        "waypoint_unavailable", _F.NO_HEALTHY_UPSTREAM, None, socks5.HOST_UNREACHABLE,
        "the destination uses a waypoint that does not exist or has no running pod: refused, never "
        "sent around it (Istio would skip the waypoint)"),
    Refusal.CERT_NOT_READY: _S(
        "cert_not_ready", _F.UNAUTHORIZED, None, socks5.GENERAL_FAILURE,
        "no certificate for the source identity yet (is the CA reachable?)"),
    Refusal.PEER_BAD_REQUEST: _S(
        "peer_bad_request", _F.NO_ROUTE, None, socks5.HOST_UNREACHABLE,
        "the destination's ztunnel answered 400: not one of its workloads, or a bad CONNECT",
        peer_status=400),
    Refusal.SOCKS5_PROTOCOL: _S(
        "socks5_protocol", _F.DOWNSTREAM_PROTOCOL_ERROR, None, None,
        "the SOCKS5 client broke the protocol (the handshake answers it; no record)"),
    Refusal.SOCKS5_TIMEOUT: _S(
        "socks5_timeout", _F.DOWNSTREAM_PROTOCOL_ERROR, None, None,
        "the SOCKS5 client did not finish its handshake in time (no record)"),
    Refusal.DRAINING: _S(
        "draining", _F.DRAINING, 503, socks5.GENERAL_FAILURE,
        "the ztunnel is shutting down"),
    Refusal.POLICY_DENIED: _S(
        "policy_denied", _F.POLICY_DENIED, 401, socks5.NOT_ALLOWED,
        "denied by authorization policy (or by the destination's waypoint rule)",
        peer_status=401),
    Refusal.UNKNOWN_DESTINATION: _S(
        "unknown_destination", _F.NO_ROUTE, 400, socks5.HOST_UNREACHABLE,
        "not an enrolled workload of the destination's node, or not the one its certificate names"),
    Refusal.UPSTREAM_UNREACHABLE: _S(
        "upstream_unreachable", _F.UPSTREAM_FAILURE, 503, socks5.CONNECTION_REFUSED,
        "the workload (or the destination's ztunnel) refused, timed out or failed the tunnel",
        peer_status=503),
    Refusal.STRICT_MTLS: _S(
        "strict_mtls", _F.POLICY_DENIED, 401, None,
        "plaintext into a port whose PeerAuthentication is STRICT"),
    Refusal.UNTRUSTED_CLIENT_ADDRESS: _S(
        "untrusted_client_address", _F.NO_ROUTE, 400, None,
        "the HBONE peer claims a client address its certificate and node do not back"),
    Refusal.BAD_REQUEST: _S(
        "bad_request", _F.DOWNSTREAM_PROTOCOL_ERROR, 400, None,
        "a malformed CONNECT, answered by the HBONE layer (no record)"),
    Refusal.PEER_CERTIFICATE: _S(
        "peer_certificate", _F.DOWNSTREAM_PROTOCOL_ERROR, None, None,
        "the HBONE peer's certificate failed SVID verification: the connection is dropped (no record)"),
})

_BY_PEER_STATUS: Mapping[int, Refusal] = MappingProxyType(
    {s.peer_status: r for r, s in REFUSALS.items() if s.peer_status is not None}
)
