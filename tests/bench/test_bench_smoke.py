"""`make bench QUICK=1` runs to the end and writes the JSON with every variant and metric (no thresholds).

Root: the benchmark builds network namespaces, cgroups and eBPF programs, and
apt-installs HAProxy and iptables when they are missing. It writes to a
temporary directory, not to bench/results/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.variants import ALL_METRICS, VARIANTS
from tests.conftest import require_root
from tests.tools import run_group

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_quick_bench_writes_every_variant_and_metric(tmp_path: Path) -> None:
    require_root()
    r = run_group(["make", "-s", "bench", "QUICK=1", f"BENCH_ARGS=--out {tmp_path}"], cwd=ROOT, timeout=480)
    assert (tmp_path / "latest.json").is_file(), f"no JSON written:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    results = json.loads((tmp_path / "latest.json").read_text())
    variants = results["variants"]
    assert set(variants) == set(VARIANTS)
    for name, row in variants.items():
        assert row["error"] is None, f"{name}: {row['error']}"
        missing = [m for m in ALL_METRICS if m not in row]
        assert not missing, f"{name} lacks {missing}"
        for key in ("vs_direct", "vs_haproxy", "min", "max"):
            assert key in row, f"{name} lacks {key}"
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "latest.md").read_text().count("\n|") >= len(VARIANTS)
    for png in ("throughput.png", "latency.png", "memory.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert "left behind" not in r.stderr
