"""bench.topology.sweep_stale: what a killed benchmark run left is removed by the next run,
and a run still going is left alone (root: namespaces, cgroups, bpffs)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.topology import cgroup2_root, sweep_stale


def _leftovers(tag: str) -> list[str]:
    out = [n for n in Path("/run/netns").iterdir() if n.name.startswith(f"abench-{tag}-")] \
        if Path("/run/netns").is_dir() else []
    out += [p for p in [cgroup2_root() / f"abench-{tag}"] if p.exists()]
    out += list(Path("/sys/fs/bpf").glob(f"abench-{tag}-*"))
    return [str(p) for p in out]


def test_a_killed_runs_leftovers_go_and_a_live_run_stays() -> None:
    from tests.conftest import require_root

    require_root()
    dead, live = "0dead0", "a11ce0"  # hex, as a run's tag is
    sleeper = None
    try:
        for tag in (dead, live):
            for who in ("na", "cli"):
                subprocess.run(["ip", "netns", "add", f"abench-{tag}-{who}"], check=True)
            (cgroup2_root() / f"abench-{tag}" / "zta").mkdir(parents=True)
            Path(f"/sys/fs/bpf/abench-{tag}-a").mkdir()
        # the live run has a process in one of its namespaces
        sleeper = subprocess.Popen(["ip", "netns", "exec", f"abench-{live}-na", "sleep", "60"])
        deadline = time.monotonic() + 5
        while not subprocess.run(["ip", "netns", "pids", f"abench-{live}-na"], capture_output=True,
                                 text=True).stdout.strip():
            assert time.monotonic() < deadline, "the sleeper never entered its namespace"
            time.sleep(0.05)
        # a run only just made has no process yet either: it is not taken for a dead one
        assert sweep_stale(tags=(dead,)) == [] and len(_leftovers(dead)) == 4
        removed = sweep_stale(tags=(dead, live), min_age=0)
        assert _leftovers(dead) == [], removed
        assert {f"netns abench-{dead}-na", f"netns abench-{dead}-cli"} <= set(removed)
        assert len(_leftovers(live)) == 4, "a live run was swept"
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        sweep_stale(tags=(dead, live), min_age=0)
        assert _leftovers(dead) == [] and _leftovers(live) == []
