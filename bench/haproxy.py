"""HAProxy, the production proxy ambit is measured against: its certificates and configurations.

Same terms as ambit's HBONE: certificates issued by the same CA (ECDSA P-256
X.509-SVIDs, leaf + intermediate sent, the root trusted), TLS 1.3 only with
the cipher suite ambit's Python/OpenSSL contexts negotiate
(TLS_AES_256_GCM_SHA384), client certificates required and verified both
ways (except at the ingress edge, where outside clients have none: there the
certificate is bench/edge.py's, for a hostname). `nbthread 1` unless the variant
asks for HAProxy's default (one thread per CPU). HAProxy sets TCP_NODELAY on
its sockets, as the ztunnel does.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

CIPHERSUITE = "TLS_AES_256_GCM_SHA384"
Addr = tuple[str, int]


def cert_paths(d: Path) -> dict[str, Path]:
    return {"ca": d / "ca.pem", "a": d / "node-a.pem", "b": d / "node-b.pem", "w": d / "waypoint.pem",
            "g": d / "gateway.pem"}


def write_certs(material: Any, d: Path) -> None:
    """One SVID per HAProxy role, signed by the benchmark's CA like the ztunnels' certificates."""
    from ambit.spiffe import SpiffeId
    from controlplane.pki import cert_pem, key_pem, new_key

    d.mkdir(parents=True, exist_ok=True)
    paths = cert_paths(d)
    paths["ca"].write_bytes(cert_pem(material.root))
    for role, sa in (("a", "haproxy-a"), ("b", "haproxy-b"), ("w", "haproxy-w"), ("g", "haproxy-g")):
        key = new_key()
        chain = material.sign_leaf(key.public_key(), SpiffeId(material.trust_domain, "bench", sa),
                                   dt.timedelta(hours=6))
        pem = b"".join(cert_pem(c) for c in chain if c != material.root) + key_pem(key)
        paths[role].write_bytes(pem)
        paths[role].chmod(0o600)


def _global(threads: int | None) -> str:
    lines = [
        "global",
        "  maxconn 9000",
        f"  ssl-default-bind-ciphersuites {CIPHERSUITE}",
        f"  ssl-default-server-ciphersuites {CIPHERSUITE}",
        "  ssl-default-bind-options ssl-min-ver TLSv1.3",
        "  ssl-default-server-options ssl-min-ver TLSv1.3",
        "  ssl-server-verify required",
    ]
    if threads is not None:
        lines.append(f"  nbthread {threads}")
    lines += [
        "defaults",
        "  maxconn 9000",
        "  timeout connect 5s",
        "  timeout client 1h",
        "  timeout server 1h",
        "",
    ]
    return "\n".join(lines) + "\n"


def tls_out(listen: Addr, peer: Addr, certs: dict[str, Path], threads: int | None) -> str:
    """Node A's side: plain TCP in from the client, mutual TLS out to node B."""
    return _global(threads) + (
        "frontend tcp_in\n  mode tcp\n"
        f"  bind {listen[0]}:{listen[1]}\n  default_backend tls_out\n"
        "backend tls_out\n  mode tcp\n"
        f"  server peer {peer[0]}:{peer[1]} ssl crt {certs['a']} ca-file {certs['ca']} verify required\n"
    )


def tls_in(listen: Addr, server: Addr, certs: dict[str, Path], threads: int | None) -> str:
    """Node B's side: mutual TLS in, plain TCP out to the server pod."""
    return _global(threads) + (
        "frontend tls_in\n  mode tcp\n"
        f"  bind {listen[0]}:{listen[1]} ssl crt {certs['b']} ca-file {certs['ca']} verify required\n"
        "  default_backend tcp_out\n"
        "backend tcp_out\n  mode tcp\n"
        f"  server app {server[0]}:{server[1]}\n"
    )


def http_tls(listen: Addr, peer: Addr, certs: dict[str, Path], threads: int | None) -> str:
    """The waypoint's counterpart: mutual TLS in, HTTP/1.1 parsed per request (`mode http`),
    mutual TLS out (connections to the next hop reused across requests, HAProxy's default)."""
    return _global(threads) + (
        "frontend http_in\n  mode http\n  option http-keep-alive\n"
        f"  bind {listen[0]}:{listen[1]} ssl crt {certs['w']} ca-file {certs['ca']} verify required\n"
        "  default_backend http_out\n"
        "backend http_out\n  mode http\n"
        f"  server peer {peer[0]}:{peer[1]} ssl crt {certs['w']} ca-file {certs['ca']} verify required\n"
    )


def https_edge(listen: Addr, peer: Addr, edge_pem: Path, certs: dict[str, Path], threads: int | None,
               allowed_clients: str, idle_timeout_s: int = 60, max_body: int = 10 * 1024 * 1024) -> str:
    """The ingress gateway's counterpart: TLS in for a public hostname (`edge_pem`, certificate
    and key; no client certificate), HTTP/1.1 parsed per request (`mode http`) with the
    gateway's cheap checks (the IP restriction, a declared body over `max_body` refused,
    X-Forwarded-For/-Proto and Forwarded set), mutual TLS out to node B (connections reused
    across requests, HAProxy's default). The gateway's idle limit (`--idle-timeout`, 60 s:
    each request head whole within it, an idle keep-alive connection closed after it) is
    `timeout http-request` and `timeout http-keep-alive`; header size and count stay at
    HAProxy's defaults (the request head within tune.bufsize 16 KiB less 1 KiB maxrewrite,
    101 fields; the gateway: 64 KiB, 100)."""
    return _global(threads) + (
        "frontend https_in\n  mode http\n  option http-keep-alive\n"
        f"  timeout http-request {idle_timeout_s}s\n  timeout http-keep-alive {idle_timeout_s}s\n"
        f"  bind {listen[0]}:{listen[1]} ssl crt {edge_pem} alpn http/1.1\n"
        f"  http-request deny deny_status 403 unless {{ src {allowed_clients} }}\n"
        f"  http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {max_body} }}\n"
        "  option forwardfor\n"
        "  http-request set-header X-Forwarded-Proto https\n"
        "  http-request add-header Forwarded for=%[src]\n"
        "  default_backend http_out\n"
        "backend http_out\n  mode http\n"
        f"  server peer {peer[0]}:{peer[1]} ssl crt {certs['g']} ca-file {certs['ca']} verify required\n"
    )
