"""In-memory throughput of an HBONE client/server pair, for the benchmark harness."""

from __future__ import annotations

import time

from ztunnel.hbone.config import HboneConfig, HboneError
from ztunnel.hbone.connection import HboneClient, HboneServer
from ztunnel.hbone.events import StreamData, TunnelResponse

_CHUNK = 256 * 1024  # what an I/O layer reads from a TCP socket at a time


def throughput(mb: int, config: HboneConfig | None = None) -> float:
    """Push `mb` MiB through one tunnel (client -> server, no TLS); return MiB/s.

    Measures the protocol layer alone: framing, flow control and h2, with the
    receiver acknowledging every chunk as an I/O layer would.
    """
    if mb <= 0:
        raise HboneError(f"throughput: mb={mb} must be positive")
    cfg = config or HboneConfig()
    now = 0.0
    client, server = HboneClient(cfg, now), HboneServer(cfg, now)
    client.initiate()
    server.initiate()
    sid = client.open_stream("10.0.0.1:8080", forwarded_for="10.0.0.2")
    for ev in server.receive_data(client.data_to_send(), now):
        server.respond(getattr(ev, "stream_id", sid), 200)
    opened = any(
        isinstance(ev, TunnelResponse) and ev.status == 200
        for ev in client.receive_data(server.data_to_send(), now)
    )
    if not opened:
        raise HboneError("throughput: the tunnel did not open")
    total = mb * 1024 * 1024
    block = memoryview(bytes(range(256)) * (_CHUNK // 256))
    sent = received = 0
    start = time.perf_counter()
    while received < total:
        while sent < total:
            n = client.send_data(sid, block[: min(_CHUNK, total - sent)])
            if n == 0:
                break
            sent += n
        wire = client.data_to_send()
        for off in range(0, len(wire), _CHUNK):
            for ev in server.receive_data(wire[off : off + _CHUNK], now):
                if isinstance(ev, StreamData):
                    received += len(ev.data)
                    server.acknowledge_received(sid, len(ev.data))
        back = server.data_to_send()
        if back:
            client.receive_data(back, now)
    elapsed = time.perf_counter() - start
    return mb / elapsed if elapsed > 0 else float("inf")


if __name__ == "__main__":
    print(f"{throughput(256):.0f} MiB/s")
