"""`make demo` end to end: the demo runs on a fresh local cluster, checks its own claims, and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from agent import cgroups
from tests.e2e.mesh import leftovers

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_leaves_nothing_behind() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent.demo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    # what the demo shows: identities, an allowed mTLS flow, a denial explained, a STRICT drop
    assert "spiffe://cluster.local/ns/shop/sa/frontend" in out
    assert "mutual_tls" in out and "shop/backend-allow-frontend rule 0" in out
    assert "DENIED  spiffe://cluster.local/ns/shop/sa/catalog -> shop/backend:8080" in out
    assert "PeerAuthentication STRICT" in out and "dropped" in out
    assert "is down" in out and "ambit demo: done" in out
    # only the demo's own cluster: other clusters (a concurrent test run) may come and go meanwhile
    m = re.search(r"cluster ([0-9a-f]{8}) up in", out)
    assert m, "the demo did not show `ambit local up`'s cluster id"
    # its network namespaces, cgroup dir and pinned BPF dir are all gone
    assert leftovers(m.group(1), cgroups.find_root()) == []
