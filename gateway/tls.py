"""TLS for HTTPS listeners: one context per listener, from its Secret, chosen by SNI.

The certificate and key come from the cluster state (a `kubernetes.io/tls` Secret) and
never touch a disk: `ssl` loads a chain only from a path, so it is written to an
anonymous memory file (memfd) and read back through /proc/self/fd. A context is built
once per Secret version and reused.

A listening socket keeps one server context for its port; its SNI callback hands each
handshake the context of the listener whose hostname fits the name the client asked
for (exact, then the longest wildcard, then a listener without a hostname). A client
that sends no SNI gets the listener without a hostname; no fitting listener: the
handshake is refused (`unrecognized_name`). ALPN offers only `http/1.1`: the engine
does not translate protocols, and the backends behind it speak what the client spoke.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from gateway import GatewayError
from gateway.listeners import CompiledGateway, ListenerConfig, PortConfig
from ztunnel.identity.tls import load_cert_chain_in_memory

log = logging.getLogger("ambit.gateway.tls")

ALPN = ["http/1.1"]


class TlsError(GatewayError):
    """A listener's certificate cannot be used; says which Secret and why."""


def listener_context(lst: ListenerConfig) -> ssl.SSLContext:
    """A server context with the listener's certificate chain and key."""
    assert lst.certificate is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    try:
        load_cert_chain_in_memory(ctx, lst.certificate.cert_pem + b"\n" + lst.certificate.key_pem,
                                  "ambit-gateway-tls")
    except (ssl.SSLError, OSError) as e:
        # never the PEM itself in a message
        raise TlsError(f"listener {lst.name}: Secret {lst.certificate.key}: the certificate and key "
                       f"cannot be used ({getattr(e, 'reason', None) or e})") from None
    return ctx


@dataclass
class _PortTls:
    contexts: dict[str | None, ssl.SSLContext]  # by listener hostname
    names: dict[int, str]  # id(context) -> listener name


class TlsListeners:
    """The TLS contexts of every HTTPS port, kept current as the Gateway changes."""

    def __init__(self) -> None:
        self._ports: dict[int, _PortTls] = {}
        # (listener, secret, digest) -> context: one per listener, so a finished handshake tells
        # which listener it chose even when listeners share a Secret
        self._built: dict[tuple[str, str, str], ssl.SSLContext] = {}
        self._hosts: dict[int, list[ListenerConfig]] = {}

    def update(self, gw: CompiledGateway | None) -> list[str]:
        """Rebuild from the Gateway; the errors (a listener whose certificate fails is left out)."""
        errors: list[str] = []
        ports: dict[int, _PortTls] = {}
        hosts: dict[int, list[ListenerConfig]] = {}
        built: dict[tuple[str, str, str], ssl.SSLContext] = {}
        for port in (gw.ports.values() if gw is not None else ()):
            if port.protocol != "HTTPS":
                continue
            pt = _PortTls({}, {})
            for lst in port.listeners:
                assert lst.certificate is not None
                key = (lst.name, lst.certificate.key, hashlib.sha256(lst.certificate.cert_pem + lst.certificate.key_pem)
                       .hexdigest())
                ctx = built.get(key) or self._built.get(key)
                if ctx is None:
                    try:
                        ctx = listener_context(lst)
                    except TlsError as e:
                        errors.append(str(e))
                        continue
                built[key] = ctx
                pt.contexts[lst.hostname] = ctx
                pt.names[id(ctx)] = lst.name
                hosts.setdefault(port.port, []).append(lst)
            ports[port.port] = pt
        self._ports, self._built, self._hosts = ports, built, hosts
        return errors

    def server_context(self, port: int) -> ssl.SSLContext:
        """The context of a listening socket on `port`: it holds no certificate of its own and
        picks the listener's by SNI at every handshake, from the current configuration."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(ALPN)
        ctx.sni_callback = self._sni(port)
        return ctx

    def _sni(self, port: int) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
        def callback(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            ctx = self.context_for(port, name)
            if ctx is None:
                log.info("TLS on port %d: no listener for SNI %r: handshake refused", port, name)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            obj.context = ctx
            return None
        return callback

    def context_for(self, port: int, name: str | None) -> ssl.SSLContext | None:
        pt = self._ports.get(port)
        if pt is None:
            return None
        cfg = PortConfig(port, "HTTPS", tuple(self._hosts.get(port, ())))
        lst = cfg.listener_for(name.lower().rstrip(".") if name else None)
        return pt.contexts.get(lst.hostname) if lst is not None else None

    def listener_of(self, port: int, ssl_object: ssl.SSLObject | None) -> str | None:
        """The listener a finished handshake picked (by its context)."""
        pt = self._ports.get(port)
        if pt is None or ssl_object is None:
            return None
        return pt.names.get(id(ssl_object.context))
