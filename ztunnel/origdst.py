"""The original destination of a redirected TCP connection (`SO_ORIGINAL_DST`).

The agent's `cgroup/getsockopt` program (or iptables REDIRECT) answers the
plain `getsockopt(SOL_IP, SO_ORIGINAL_DST)` with the address the client
connected to before the redirect. Parsing the returned sockaddr is pure.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ztunnel import ZtunnelError

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h; not exported by `socket`.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = 41
_SOCKADDR_IN6_LEN = 28


class OrigDstError(ZtunnelError):
    """The original destination could not be read."""


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decode a `struct sockaddr_in` or `sockaddr_in6` (as returned by getsockopt) to (ip, port)."""
    if len(raw) < 8:
        raise OrigDstError(f"sockaddr too short ({len(raw)} bytes)")
    family = struct.unpack_from("=H", raw, 0)[0]
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[4:8])), port
    if family == socket.AF_INET6:
        if len(raw) < 24:
            raise OrigDstError(f"sockaddr_in6 too short ({len(raw)} bytes)")
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raise OrigDstError(f"unexpected address family {family} in original destination")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """(ip, port) the client originally connected to; raises OrigDstError with the likely cause."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        else:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        raise OrigDstError(
            f"getsockopt(SO_ORIGINAL_DST) failed: {e.strerror or e}: was this connection "
            "redirected by the agent's eBPF program (or iptables)? a direct connection to "
            "the outbound port has no original destination"
        ) from e
    return parse_sockaddr(raw)
