"""`make demo` (`python -m agent.demo`): the end-to-end demonstration of ambit.

For now it shows workload identity through the real path: it creates a CA in
a temporary directory, starts the CA server on loopback, gives node-a its node
credential, asks for the SVID of a pod's service account over gRPC with a
locally generated key, verifies it, prints who the workload is and until when,
shows that another node is refused, and removes everything it made.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import tempfile
from pathlib import Path

from agent.cluster.source import LocalDirSource
from controlplane.pki import CaMaterial, write_node_credential
from controlplane.server import AuditLog, CaServer
from ztunnel.identity import IdentityError
from ztunnel.identity.caclient import CaClient
from ztunnel.identity.manager import CertManager, CertNotReady
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.svid import verify_svid

CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-0, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: frontend}
"""


async def identity_demo(workdir: Path, out: io.TextIOBase | None = None) -> int:
    """Run the identity part of the demo in `workdir`; returns an exit status."""
    say = (out or sys.stdout).write
    (workdir / "cluster").mkdir()
    (workdir / "cluster" / "shop.yaml").write_text(CLUSTER)
    material = CaMaterial.generate("cluster.local")
    material.write(workdir / "ca")
    for node in ("node-a", "node-b"):
        write_node_credential(material, node, workdir / node)
    audit = io.StringIO()
    server = CaServer(material, LocalDirSource(workdir / "cluster"), port=0, audit=AuditLog(audit))
    port = await server.start()
    say(f"CA for trust domain {material.trust_domain} listening on 127.0.0.1:{port}\n")
    ident = SpiffeId.for_workload("cluster.local", "shop", "frontend")
    status = 0
    try:
        client = CaClient(f"127.0.0.1:{port}", workdir / "node-a")
        manager = CertManager(client, bundle=material.bundle)
        try:
            cert = await manager.get(ident, timeout=10)
            who = verify_svid(list(cert.chain), material.bundle)
            say(f"node-a obtained an X.509-SVID for pod shop/frontend-0:\n"
                f"  identity   {who}\n  serial     {cert.serial:x}\n"
                f"  valid      {cert.not_before.isoformat()} .. {cert.not_after.isoformat()}\n"
                f"  renews at  {manager.status()[0]['next_renewal']}\n")
        finally:
            await manager.close()
            await client.close()
        intruder = CaClient(f"127.0.0.1:{port}", workdir / "node-b")
        other = CertManager(intruder, bundle=material.bundle)
        try:
            await other.get(ident, timeout=1)
            say("ERROR: node-b was given an identity it does not host\n")
            status = 1
        except CertNotReady as e:
            say(f"node-b was refused, as it should be: {str(e).split('last CA error: ')[-1]}\n")
        finally:
            await other.close()
            await intruder.close()
    except IdentityError as e:
        say(f"demo failed: {e}\n")
        status = 1
    finally:
        await server.stop()
    say(f"CA audit log: {len(audit.getvalue().splitlines())} lines\n")
    return status


def main() -> int:
    # The CA's audit lines and the manager's retry warnings are not the demo's output.
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ambit-demo-") as tmp:
        return asyncio.run(identity_demo(Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
