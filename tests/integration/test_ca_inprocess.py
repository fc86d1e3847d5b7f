"""The CA started in-process (as the local cluster and the demo do), and the demo's identity part."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.sources import LocalDirSource
from ambit.spiffe import SpiffeId
from controlplane.pki import CaMaterial, write_node_credential
from controlplane.server import AuditLog, CaServer, CaServerError
from ztunnel.identity.caclient import CaClient
from ztunnel.identity.manager import make_csr

POD = "kind: Pod\nmetadata: {name: p, namespace: ns1}\nspec: {nodeName: n1, serviceAccountName: sa1}\n"


async def test_start_issue_stop(tmp_path: Path) -> None:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "p.yaml").write_text(POD)
    m = CaMaterial.generate()
    write_node_credential(m, "n1", tmp_path / "n1")
    audit = io.StringIO()
    server = CaServer(m, LocalDirSource(tmp_path / "cluster"), port=0, max_ttl=600, audit=AuditLog(audit))
    port = await server.start()
    try:
        assert server.port == port > 0
        client = CaClient(f"127.0.0.1:{port}", tmp_path / "n1")
        try:
            pems = await client.create_certificate(make_csr(SpiffeId("cluster.local", "ns1", "sa1"),
                                                            ec.generate_private_key(ec.SECP256R1())), 0)
        finally:
            await client.close()
        assert len(pems) == 3
        line = json.loads(audit.getvalue().splitlines()[0])
        assert line["event"] == "issued" and line["granted_ttl"] == 600  # 0 means the maximum
        # A second server on the same port fails with a clear error.
        with pytest.raises(CaServerError, match="cannot listen"):
            await CaServer(m, LocalDirSource(tmp_path / "cluster"), port=port).start()
    finally:
        await server.stop()
    # The port is released.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
