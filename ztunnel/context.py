"""What every proxy path shares: config, state, certificates, connection table, metrics, tasks.

A plain holder built by `ztunnel.server.Ztunnel`; the inbound and outbound
paths and the pool read it, nothing here does I/O. Its one task of its own:
closing connections start the (delayed, single) heap trim in `tasks`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ambit.svid import TrustBundle
from ambit.tasks import TaskSet
from ztunnel.accesslog import AccessLog
from ztunnel.config import ZtunnelConfig
from ztunnel.conntrack import ConnectionTable, ConnRecord
from ztunnel.copy import HeapTrimmer
from ztunnel.hbone import HboneConfig
from ztunnel.identity.manager import CertManager
from ztunnel.metrics import Metrics
from ztunnel.refusal import Refusal

if TYPE_CHECKING:
    from ambit.snapshot import Snapshot

log = logging.getLogger("ambit.ztunnel")


@dataclass
class ProxyContext:
    config: ZtunnelConfig
    snapshot: Callable[[], Snapshot]
    certs: CertManager
    bundle: TrustBundle
    hbone: HboneConfig
    metrics: Metrics
    access_log: AccessLog
    conns: ConnectionTable = field(default_factory=ConnectionTable)
    tasks: TaskSet = field(default_factory=lambda: TaskSet("conn"))
    heap: HeapTrimmer = field(default_factory=HeapTrimmer)
    draining: bool = False

    def __post_init__(self) -> None:
        self.conns.on_close.append(self._connection_closed)

    def _connection_closed(self, rec: ConnRecord) -> None:
        # what closed connections freed goes back to the OS (the allocator tuning keeps it otherwise)
        if not self.tasks.closed and self.heap.closed():
            self.tasks.spawn("heap-trim", self.heap.run())

    def refuse(self, rec: ConnRecord, refusal: Refusal, reason: str) -> None:
        """Close a refused (never proxied) connection's record: log, count, access-log.
        `reason` is the sentence for the record and the log; `refusal` gives its flag and label."""
        rec.reason = reason
        rec.response_flags = refusal.spec.flag
        self.metrics.refuse(refusal, rec)
        log.info("refused %s %s:%d -> %s:%d: %s", rec.direction, rec.src_ip, rec.src_port,
                 rec.dst_ip, rec.dst_port, reason)
        self.conns.close(rec, None if rec.decision == "deny" else reason)

    async def sleep_until_drained(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.conns.live and loop.time() < end:
            await asyncio.sleep(0.05)
