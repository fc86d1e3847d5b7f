"""The ingress Gateway (`gatewayClassName: ambit-ingress`): its ports, listeners and certificates,
and the gateway-wide settings in its annotations. Pure.

Listeners speak `HTTP` or `HTTPS` (TLS terminated here, `tls.mode: Terminate`, with the
first of `tls.certificateRefs`: a `kubernetes.io/tls` Secret of the Gateway's namespace).
Listeners may share a port when they have different hostnames and the same protocol; a
request is served by the listener of its port whose hostname fits best (exact, then the
longest wildcard, then a listener without one). An HTTPS connection picks its listener
(and so its certificate) by SNI; a request on it whose Host belongs to another listener
gets 421 Misdirected Request. A listener the gateway cannot serve is left out and named
in the errors.

Annotations on the Gateway:
- `ambit.dev/num-trusted-proxies: "N"`: the client address is the N-th address from the
  right of `X-Forwarded-For` (the hop the trusted proxies in front saw), as Istio's
  `gatewayTopology.numTrustedProxies`; 0 (the default): the TCP peer.
- `ambit.dev/max-header-count`, `ambit.dev/max-header-bytes`: the request head limits of
  every listener (431; default 100 fields, 64 KiB).
- `ambit.dev/max-request-body`: the body limit of routes that set none (413; default 10Mi).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ambit.cluster import Gateway, TlsSecret
from gateway.routes import host_matches, host_precedence
from gateway.spec import SpecError, Where

NUM_TRUSTED_PROXIES = "ambit.dev/num-trusted-proxies"
MAX_HEADER_COUNT = "ambit.dev/max-header-count"
MAX_HEADER_BYTES = "ambit.dev/max-header-bytes"
MAX_REQUEST_BODY = "ambit.dev/max-request-body"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
PROTOCOLS = ("HTTP", "HTTPS")


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    port: int
    protocol: str  # HTTP | HTTPS
    hostname: str | None = None
    certificate: TlsSecret | None = field(default=None, repr=False)  # HTTPS


@dataclass(frozen=True)
class PortConfig:
    port: int
    protocol: str
    listeners: tuple[ListenerConfig, ...]

    def listener_for(self, host: str | None) -> ListenerConfig | None:
        """The listener a host name (SNI or Host, lower-case, no port) belongs to on this port."""
        best: tuple[tuple[int, int], ListenerConfig] | None = None
        for lst in self.listeners:
            if lst.hostname is not None and (host is None or not host_matches(lst.hostname, host)):
                continue
            p = host_precedence(lst.hostname)
            if best is None or p > best[0]:
                best = (p, lst)
        return best[1] if best else None


@dataclass(frozen=True)
class CompiledGateway:
    namespace: str
    name: str
    ports: Mapping[int, PortConfig]
    num_trusted_proxies: int = 0
    max_header_count: int = 100
    max_header_bytes: int = 64 * 1024
    max_request_body: int = DEFAULT_MAX_BODY
    errors: tuple[str, ...] = ()

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"


def compile_gateway(gw: Gateway, secrets: Mapping[tuple[str, str], TlsSecret]) -> CompiledGateway:
    """The ports and listeners the gateway serves; SpecError when the annotations are invalid
    (listeners it cannot serve are left out and named in `errors`)."""
    ns, name = gw.meta.namespace, gw.meta.name
    w = Where("Gateway", ns, name)
    ann = gw.meta.annotations
    where = "metadata.annotations"
    trusted = w.integer(f"{where}[{NUM_TRUSTED_PROXIES}]", ann.get(NUM_TRUSTED_PROXIES), lo=0, hi=16, default=0)
    count = w.integer(f"{where}[{MAX_HEADER_COUNT}]", ann.get(MAX_HEADER_COUNT), lo=1, hi=10_000, default=100)
    size = w.size(f"{where}[{MAX_HEADER_BYTES}]", ann[MAX_HEADER_BYTES]) if MAX_HEADER_BYTES in ann else 64 * 1024
    body = w.size(f"{where}[{MAX_REQUEST_BODY}]", ann[MAX_REQUEST_BODY]) if MAX_REQUEST_BODY in ann else DEFAULT_MAX_BODY
    if size < 1024:
        raise w.error(f"{where}[{MAX_HEADER_BYTES}]", "must be at least 1Ki")
    errors: list[str] = []
    by_port: dict[int, list[ListenerConfig]] = {}
    for i, lst in enumerate(gw.listeners):
        path = f"spec.listeners[{i}] ({lst.name or 'unnamed'})"
        try:
            cfg = _listener(w, path, lst.name, lst.port, lst.protocol, lst.hostname, lst.certificate_refs, ns, secrets)
        except SpecError as e:
            errors.append(str(e))
            continue
        same = by_port.setdefault(cfg.port, [])
        if same and same[0].protocol != cfg.protocol:
            errors.append(f"Gateway {ns}/{name}: {path}: port {cfg.port} is already {same[0].protocol}: left out")
            continue
        if any(x.hostname == cfg.hostname for x in same):
            errors.append(f"Gateway {ns}/{name}: {path}: another listener on port {cfg.port} has hostname "
                          f"{cfg.hostname or '(none)'}: left out")
            continue
        same.append(cfg)
    ports = {p: PortConfig(p, ls[0].protocol, tuple(ls)) for p, ls in sorted(by_port.items()) if ls}
    return CompiledGateway(ns, name, ports, trusted, count, size, body, tuple(errors))


def _listener(w: Where, path: str, name: str, port: int, protocol: str, hostname: str | None,
              refs: tuple[tuple[str, str], ...], ns: str,
              secrets: Mapping[tuple[str, str], TlsSecret]) -> ListenerConfig:
    if protocol not in PROTOCOLS:
        raise w.error(f"{path}.protocol", f"{protocol!r}: an ambit-ingress Gateway serves HTTP and HTTPS")
    host = hostname.lower() if hostname else None
    if protocol == "HTTP":
        return ListenerConfig(name, port, protocol, host)
    if not refs:
        raise w.error(f"{path}.tls.certificateRefs", "an HTTPS listener needs a kubernetes.io/tls Secret")
    ref_ns, ref_name = refs[0]
    if ref_ns != ns:
        raise w.error(f"{path}.tls.certificateRefs[0]", f"Secret {ref_ns}/{ref_name} is in another namespace "
                      "(that needs a ReferenceGrant, which ambit does not support)")
    secret = secrets.get((ref_ns, ref_name))
    if secret is None:
        raise w.error(f"{path}.tls.certificateRefs[0]", f"no kubernetes.io/tls Secret {ref_ns}/{ref_name}")
    return ListenerConfig(name, port, protocol, host, secret)


def client_address(peer: str, xff: str | None, trusted: int) -> tuple[str, str]:
    """The client's address, and how it was found: the TCP peer, or with `trusted` proxies in
    front the address the outermost of them saw (the `trusted`-th from the right of
    X-Forwarded-For); a header too short for that means the request did not come through
    them, and the peer is taken."""
    if trusted <= 0 or not xff:
        return peer, "the TCP peer"
    hops = [h.strip() for h in xff.split(",") if h.strip()]
    if len(hops) < trusted:
        return peer, f"the TCP peer (X-Forwarded-For has fewer than {trusted} hops)"
    hop = hops[-trusted]
    if hop.startswith("[") and "]" in hop:
        hop = hop[1:hop.index("]")]
    return hop, f"X-Forwarded-For hop {trusted} from the right ({trusted} trusted proxies)"
