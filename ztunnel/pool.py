"""The HBONE client connection pool, keyed by (source identity, destination identity, node address).

One dial in flight per key (concurrent requests await it); a connection takes
streams until the client's concurrent-stream limit, then a second one is
dialed; a connection with no streams is closed after an idle timeout; a dead
or GOAWAY'd connection leaves the pool at once, its streams fail (their
clients see a reset) and the next request dials anew. When the source's
certificate is renewed, connections made with the old one take no new streams
(new ones are dialed with the new certificate) and close once their last
stream ends: rotation never resets an established connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from ambit.spiffe import SpiffeId
from ambit.svid import SvidError
from ztunnel.context import ProxyContext
from ztunnel.hbone import HboneClient, HboneError, TunnelResponse
from ztunnel.identity.manager import WorkloadCert
from ztunnel.identity.tls import client_context, sni_for, verify_peer
from ztunnel.refusal import Refusal
from ztunnel.tunnel import HboneProtocol, StreamLeg

log = logging.getLogger("ambit.ztunnel.pool")

PoolKey = tuple[SpiffeId, SpiffeId, str, int]


class PoolError(Exception):
    """Opening a tunnel failed; `status` is the HBONE status when the peer answered one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refusal(self) -> Refusal:
        """What the source records: the peer's answer read back, or an upstream failure."""
        return Refusal.from_peer_status(self.status)


class ClientConnection(HboneProtocol):
    """One pooled HBONE client connection."""

    def __init__(self, pool: Pool, key: PoolKey, cert_serial: int) -> None:
        super().__init__(HboneClient(pool.ctx.hbone, asyncio.get_running_loop().time()),
                         f"HBONE {key[0]} -> {key[1]} at {key[2]}:{key[3]}")
        self.pool = pool
        self.key = key
        self.cert_serial = cert_serial  # of the source certificate this connection was made with
        self.usable = True
        self.total_streams = 0
        self._idle: asyncio.TimerHandle | None = None

    def handle_other(self, ev: Any) -> None:
        if isinstance(ev, TunnelResponse):
            s = self.streams.get(ev.stream_id)
            if s is not None and not s.response.done():
                s.response.set_result(ev.status)
        else:
            super().handle_other(ev)

    def can_open(self) -> bool:
        # len(self.streams) is O(1) and settles most asks: h2's can_open_stream() counts every
        # open stream of the connection (with thousands of tunnels open, most connections are full)
        return (self.usable and not self.closed
                and len(self.streams) < self.pool.ctx.hbone.client_max_concurrent_streams
                and bool(self.proto.can_open_stream()))

    def open(self, authority: str, forwarded_for: str | None) -> StreamLeg:
        sid = int(self.proto.open_stream(authority, forwarded_for=forwarded_for))
        leg = StreamLeg(self, sid)
        self.streams[sid] = leg
        self.total_streams += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.flush()
        return leg

    def stream_forgotten(self) -> None:
        if not self.streams and not self.closed and not self.usable:
            self._idle_close()  # retired (its certificate was renewed): nothing left to carry
            return
        if not self.streams and not self.closed and self._idle is None:
            self._idle = self.loop.call_later(self.pool.ctx.config.timeouts.pool_idle, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if not self.streams:
            log.debug("%s: idle, closing", self.label)
            self.pool.remove(self)
            self.drain()
            self._fail("idle")

    def on_closed(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self.usable = False
        self.pool.remove(self)


@dataclass
class PoolStats:
    dials: int = 0
    dial_failures: int = 0
    streams: int = 0


class Pool:
    """HBONE client connections, shared by every outbound connection with the same key."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.conns: dict[PoolKey, list[ClientConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[ClientConnection]] = {}
        self._ctx_cache: dict[tuple[SpiffeId, int], ssl.SSLContext] = {}
        self.stats = PoolStats()

    def __len__(self) -> int:
        return sum(len(v) for v in self.conns.values())

    def remove(self, conn: ClientConnection) -> None:
        lst = self.conns.get(conn.key)
        if lst and conn in lst:
            lst.remove(conn)
            if not lst:
                del self.conns[conn.key]
        self.ctx.metrics.pool_connections.set(len(self))

    def _client_ctx(self, cert: WorkloadCert) -> ssl.SSLContext:
        k = (cert.identity, cert.serial)
        c = self._ctx_cache.get(k)
        if c is None:
            # one context per certificate: loading a key into OpenSSL costs ~0.1 ms
            self._ctx_cache = {kk: v for kk, v in self._ctx_cache.items() if kk[0] != cert.identity}
            c = self._ctx_cache[k] = client_context(cert, self.ctx.bundle)
        return c

    async def _get(self, cert: WorkloadCert, key: PoolKey) -> ClientConnection:
        while True:
            for c in list(self.conns.get(key, ())):
                if c.cert_serial != cert.serial:
                    self._retire(c)
                    continue
                if c.can_open():
                    return c
            fut = self._dialing.get(key)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                self._dialing[key] = fut
                try:
                    conn = await self._dial(cert, key)
                except BaseException as e:
                    if isinstance(e, PoolError):
                        fut.set_exception(e)
                        fut.exception()  # marked retrieved here; each waiter raises this same error
                    else:
                        fut.cancel()  # abandoned (its connection went away): waiters dial again
                    raise
                finally:
                    self._dialing.pop(key, None)
                self.conns.setdefault(key, []).append(conn)
                self.ctx.metrics.pool_connections.set(len(self))
                fut.set_result(conn)
                return conn
            try:
                conn = await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if fut.cancelled() and (task is None or not task.cancelling()):
                    continue  # the dial was abandoned by its task, not this one: look again
                raise
            if conn.can_open():
                return conn
            # full already (others took the slots): look again, maybe dial another

    def _retire(self, c: ClientConnection) -> None:
        """No new streams on a connection made with a certificate since renewed; its streams go on."""
        if c.usable:
            c.usable = False
            log.info("%s: certificate renewed, new streams go to a new connection", c.label)
        if not c.streams and not c.closed:
            c.stream_forgotten()

    async def _dial(self, cert: WorkloadCert, key: PoolKey) -> ClientConnection:
        _, dst_id, host, port = key
        loop = asyncio.get_running_loop()
        self.stats.dials += 1
        timeout = self.ctx.config.timeouts.connect
        hb = self.ctx.config.hbone
        # dial from the node's own address, so the peer sees (and policies see) the node
        local = (hb.host, 0) if hb is not None and hb.host not in ("0.0.0.0", "::") else None
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: ClientConnection(self, key, cert.serial), host, port,
                                       ssl=self._client_ctx(cert), server_hostname=sni_for(dst_id),
                                       ssl_handshake_timeout=timeout, local_addr=local),
                timeout,
            )
        except TimeoutError:
            self.stats.dial_failures += 1
            raise PoolError(f"connect to {host}:{port} timed out: is the destination node's ztunnel "
                            f"running, or is port {port} blocked?") from None
        except ConnectionRefusedError:
            self.stats.dial_failures += 1
            raise PoolError(f"connect to {host}:{port} refused: is the destination node's ztunnel "
                            "running and listening for HBONE?") from None
        except ssl.SSLError as e:
            self.stats.dial_failures += 1
            raise PoolError(f"TLS handshake with {host}:{port} for {dst_id} failed: {e.reason or e}: "
                            "does that node host the workload, and do both nodes trust the same CA?") from None
        except OSError as e:
            self.stats.dial_failures += 1
            raise PoolError(f"connect to {host}:{port} failed: {e.strerror or e}") from None
        try:
            verify_peer(transport.get_extra_info("ssl_object"), self.ctx.bundle, dst_id)
        except SvidError as e:
            self.stats.dial_failures += 1
            conn.abort(str(e))
            raise PoolError(f"{host}:{port}: {e}") from None
        return conn

    async def open_stream(self, cert: WorkloadCert, dst_id: SpiffeId, host: str, port: int,
                          authority: str, forwarded_for: str | None) -> StreamLeg:
        """A tunnel that the peer answered 200; PoolError otherwise (with its status)."""
        key = (cert.identity, dst_id, host, port)
        conn = await self._get(cert, key)
        try:
            leg = conn.open(authority, forwarded_for)
        except HboneError as e:
            raise PoolError(f"{conn.label}: cannot open a stream: {e}") from None
        self.stats.streams += 1
        try:
            status = await asyncio.wait_for(asyncio.shield(leg.response), self.ctx.config.timeouts.connect)
        except TimeoutError:
            leg.abort()
            raise PoolError(f"{conn.label}: no answer to CONNECT {authority} in time") from None
        except ConnectionResetError as e:
            conn.forget(leg.stream_id)
            raise PoolError(f"{conn.label}: CONNECT {authority}: {e}") from None
        if status != 200:
            leg.abort()
            raise PoolError(f"peer answered {status} to CONNECT {authority}", status=status)
        return leg

    def stats_json(self) -> dict[str, Any]:
        return {
            "connections": [
                {"source": str(k[0]), "destination": str(k[1]), "address": f"{k[2]}:{k[3]}",
                 "streams": len(c.streams), "total_streams": c.total_streams, "closed": c.closed,
                 "cert_serial": f"{c.cert_serial:x}", "usable": c.usable}
                for k, lst in self.conns.items() for c in lst
            ],
            "dials": self.stats.dials,
            "dial_failures": self.stats.dial_failures,
            "streams": self.stats.streams,
        }

    def drain(self) -> None:
        for lst in list(self.conns.values()):
            for c in list(lst):
                c.usable = False
                c.drain()

    def close(self) -> None:
        for lst in list(self.conns.values()):
            for c in list(lst):
                c.abort("ztunnel shutting down")
        self.conns.clear()
