"""The HBONE pool when the connection that started a dial goes away mid-dial."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from ambit.spiffe import SpiffeId
from tests.integration.ztunnel_harness import loopback_mesh
from ztunnel.pool import PoolError


async def test_a_cancelled_dial_does_not_cancel_the_others_waiting_on_it(tmp_path: Path) -> None:
    async with loopback_mesh(tmp_path, start=("node-a",)) as mesh:
        zt = mesh.ztunnels["node-a"]
        await mesh.wait_ready("node-a")
        assert zt.pool is not None and zt.certs is not None
        cert = await zt.certs.get(SpiffeId("cluster.local", "shop", "client"))
        server_id = SpiffeId("cluster.local", "shop", "server")
        # A peer that completes TCP but never answers TLS: the dial hangs until its timeout.
        silent = socket.socket()
        silent.bind((mesh.ip(250), 0))
        silent.listen(8)
        host, port = silent.getsockname()
        try:
            first = asyncio.create_task(zt.pool.open_stream(cert, server_id, host, port, "x:1", None))
            await asyncio.sleep(0.2)
            second = asyncio.create_task(zt.pool.open_stream(cert, server_id, host, port, "x:1", None))
            await asyncio.sleep(0.2)
            first.cancel()  # the client of the first connection went away
            with pytest.raises(asyncio.CancelledError):
                await first
            # the second connection is not cancelled with it: it dials on its own and gets a clean error
            with pytest.raises(PoolError, match="timed out"):
                await second
        finally:
            silent.close()
