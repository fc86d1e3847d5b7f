"""SOCKS5 (RFC 1928) CONNECT handshake, sans-IO: a local client names its destination.

Only "no authentication" and CONNECT are offered, like Istio ztunnel's SOCKS5
listener. `Socks5Handshake.feed` takes bytes and returns what to send back;
once `request` is set the caller resolves it and sends `reply(code, ...)`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

VERSION = 5
NO_AUTH = 0
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 1
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

SUCCEEDED = 0
GENERAL_FAILURE = 1
NOT_ALLOWED = 2
NETWORK_UNREACHABLE = 3
HOST_UNREACHABLE = 4
CONNECTION_REFUSED = 5
COMMAND_NOT_SUPPORTED = 7
ADDRESS_NOT_SUPPORTED = 8


class Socks5Error(Exception):
    """The client broke the protocol; `reply` is what to send before closing (may be empty)."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Socks5Request:
    host: str  # an IP address or a domain name
    port: int
    is_domain: bool


def reply(code: int, bind_ip: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    ip = ipaddress.ip_address(bind_ip)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([VERSION, code, 0, atyp]) + ip.packed + struct.pack("!H", bind_port)


class Socks5Handshake:
    """Parses the client's greeting and CONNECT request from the bytes not yet consumed."""

    def __init__(self) -> None:
        self._greeted = False
        self.request: Socks5Request | None = None

    def feed(self, buf: bytes) -> tuple[bytes, int]:
        """Parse from `buf` (all unconsumed bytes); returns (bytes to send, bytes consumed).

        Bytes after the CONNECT request are not consumed: they are the
        client's first payload (a client may pipeline it).
        """
        out = bytearray()
        used = 0
        if not self._greeted:
            if len(buf) < 2:
                return b"", 0
            if buf[0] != VERSION:
                raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})")
            n = buf[1]
            if len(buf) < 2 + n:
                return b"", 0
            if NO_AUTH not in buf[2 : 2 + n]:
                raise Socks5Error("client offers no 'no authentication' method",
                                  bytes([VERSION, NO_ACCEPTABLE]))
            self._greeted = True
            used = 2 + n
            out += bytes([VERSION, NO_AUTH])
        if self.request is not None:
            return bytes(out), used
        b = buf[used:]
        if len(b) < 5:
            return bytes(out), used
        if b[0] != VERSION:
            raise Socks5Error(f"bad request version {b[0]}", reply(GENERAL_FAILURE))
        if b[1] != CMD_CONNECT:
            raise Socks5Error(f"command {b[1]} not supported (only CONNECT)", reply(COMMAND_NOT_SUPPORTED))
        atyp = b[3]
        if atyp == ATYP_IPV4:
            need = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            need = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            need = 4 + 1 + b[4] + 2
        else:
            raise Socks5Error(f"address type {atyp} not supported", reply(ADDRESS_NOT_SUPPORTED))
        if len(b) < need:
            return bytes(out), used
        if atyp == ATYP_IPV4:
            host, is_domain = str(ipaddress.IPv4Address(bytes(b[4:8]))), False
        elif atyp == ATYP_IPV6:
            host, is_domain = str(ipaddress.IPv6Address(bytes(b[4:20]))), False
        else:
            try:
                host, is_domain = bytes(b[5 : 5 + b[4]]).decode("ascii"), True
            except UnicodeDecodeError:
                raise Socks5Error("domain name is not ASCII", reply(HOST_UNREACHABLE)) from None
        (port,) = struct.unpack("!H", b[need - 2 : need])
        self.request = Socks5Request(host, port, is_domain)
        return bytes(out), used + need
