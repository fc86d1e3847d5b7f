"""The ztunnel's configuration: listener addresses, identity settings, files; validated once.

Built from the command line (`ztunnel.cli`) or directly by tests and the
benchmark. Every bad value raises `ConfigError` naming the flag and the value.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path

from ztunnel import ZtunnelError

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
ADMIN_PORT = 15000
METRICS_PORT = 15020
READINESS_PORT = 15021
SOCKS5_PORT = 15080


class ConfigError(ZtunnelError):
    """A configuration value is invalid."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str, what: str, default_port: int | None = None) -> Listen:
    """Parse `HOST:PORT`, `[V6]:PORT`, `HOST` (with default_port) or `:PORT` (no host: invalid)."""
    v = value.strip()
    host, port_s = v, ""
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            raise ConfigError(f"{what}: {value!r}: missing ']' after the IPv6 address")
        host, rest = v[1:end], v[end + 1 :]
        port_s = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, port_s = v.split(":")
    if not port_s:
        if default_port is None:
            raise ConfigError(f"{what}: {value!r} has no port; write HOST:PORT")
        port = default_port
    else:
        try:
            port = int(port_s)
        except ValueError:
            raise ConfigError(f"{what}: {value!r}: port {port_s!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{what}: {value!r}: port {port} is out of range 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: {value!r}: {host!r} is not an IP address") from None
    return Listen(host, port)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0  # dialing a workload or a peer node's 15008
    cert: float = 5.0  # waiting for a workload certificate before failing closed
    pool_idle: float = 30.0  # an HBONE connection with no streams is closed after this
    drain: float = 5.0  # graceful shutdown: how long live connections may finish
    socks5_handshake: float = 10.0


@dataclass(frozen=True)
class ZtunnelConfig:
    """Everything a ztunnel process needs; `None` listeners are not opened."""

    node: str
    cluster: str  # ClusterSource spec: local:PATH or kubernetes
    ca_address: str
    credential_dir: Path
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    outbound: Listen | None = None
    inbound_plaintext: Listen | None = None
    hbone: Listen | None = None
    admin: Listen | None = Listen("127.0.0.1", ADMIN_PORT)
    metrics: Listen | None = None
    readiness: Listen | None = None
    socks5: Listen | None = None
    access_log: str = "-"  # a path, or "-" for stdout
    # HBONE port of peer nodes; a test or benchmark pair on one host may use others
    peer_hbone_port: int = HBONE_PORT
    peer_hbone_ports: dict[str, int] = field(default_factory=dict)  # node address -> port
    timeouts: Timeouts = field(default_factory=Timeouts)
    cert_ttl_seconds: int = 86400
    # Given: the CA is called with this ServiceAccount token (bearer; the CA's
    # --node-auth tokenreview) and credential_dir needs only ca.crt.
    ca_token_file: Path | None = None
    # Workloads on the node's own loopback (the loopback test harness and the benchmark, where
    # "pods" are 127.x addresses): let passthrough dial loopback. Never on a real node, where a
    # pod's loopback destination dialed from the node's netns would reach the node's admin ports.
    loopback_workloads: bool = False

    def with_node_address(self, address: str) -> ZtunnelConfig:
        """Fill the listeners left unset with the Istio ports on the node's address."""
        def dflt(cur: Listen | None, port: int) -> Listen:
            return cur if cur is not None else Listen(address, port)

        return replace(
            self,
            outbound=dflt(self.outbound, OUTBOUND_PORT),
            inbound_plaintext=dflt(self.inbound_plaintext, INBOUND_PLAINTEXT_PORT),
            hbone=dflt(self.hbone, HBONE_PORT),
            metrics=dflt(self.metrics, METRICS_PORT),
            readiness=dflt(self.readiness, READINESS_PORT),
        )

    def hbone_port_for(self, node_address: str) -> int:
        return self.peer_hbone_ports.get(node_address, self.peer_hbone_port)

    def check(self) -> None:
        if not self.node:
            raise ConfigError("--node: the node name is required")
        if not self.trust_domain or "/" in self.trust_domain:
            raise ConfigError(f"--trust-domain: {self.trust_domain!r} is not a trust domain name")
        if self.ca_token_file is not None:
            if not (self.credential_dir / "ca.crt").is_file():
                raise ConfigError(
                    f"--credential-dir: {self.credential_dir / 'ca.crt'} is missing; with --ca-token-file "
                    "it needs only ca.crt, the CA's root (the ambit-ca-root ConfigMap in Kubernetes)"
                )
            if not self.ca_token_file.is_file():
                raise ConfigError(
                    f"--ca-token-file: {self.ca_token_file} is missing; it is the pod's projected "
                    "ServiceAccount token (audience ambit-ca)"
                )
        else:
            for name in ("tls.crt", "tls.key", "ca.crt"):
                if not (self.credential_dir / name).is_file():
                    raise ConfigError(
                        f"--credential-dir: {self.credential_dir / name} is missing; the node "
                        "credential (tls.crt, tls.key, ca.crt) comes from `ambit ca node-credential` "
                        "(or give --ca-token-file for a CA that reviews ServiceAccount tokens)"
                    )
        if self.cert_ttl_seconds < 10:
            raise ConfigError(f"--cert-ttl: {self.cert_ttl_seconds}s is too short to renew at half-life; give at least 10")
        if ":" not in self.ca_address:
            raise ConfigError(f"--ca: {self.ca_address!r} is not HOST:PORT")
