"""A/B of a change on the bench topology: two source trees alternate, each measured against HAProxy.

    python -m bench.ab --base HEAD                      # the committed code against the working tree
    python -m bench.ab --base HEAD~1 --new HEAD --pairs 3 --loads t1,t8,r64

Each tree (a `git archive` of a revision, or the working tree) runs `python -m
bench.ab --measure` from its own copy: one topology, ambit and HAProxy (nbthread 1)
measured interleaved for --rounds rounds; the trees alternate --pairs times
(base, new, base, new...), so the machine's load drifts over both alike. What
is compared is each run's ratio to the HAProxy measured in the same run (on a
shared machine the absolute numbers move by tens of percent). Loads: tN (N
connections, bulk, --seconds each: MB/s and the proxies' CPU s per GB) and
rN (back-to-back round trips of N bytes: p50 µs and the proxies' CPU µs per
round trip). Needs root, like `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROWS = ("ambit", "haproxy")


def measure(rounds: int, loads: list[str], seconds: float) -> dict[str, dict[str, list[float]]]:
    """One topology, ambit and HAProxy interleaved: {row: {load metric: [per round]}}."""
    from bench.rig import Rig
    from bench.topology import Topology, cgroup_cpu_s
    from bench.variants import VARIANTS

    out: dict[str, dict[str, list[float]]] = {r: {} for r in ROWS}
    with tempfile.TemporaryDirectory(prefix="ambit-ab-") as tmp:
        topo = Topology(workdir=Path(tmp))
        rig = Rig(topo, Path(tmp))
        try:
            topo.create()
            addr = {r: VARIANTS[r].start(rig) for r in ROWS}

            def cpu(row: str) -> float:
                return sum(cgroup_cpu_s(rig.cgroup_of(p)) for p in VARIANTS[row].proxies)

            for n in range(rounds + 1):  # the first round warms up
                for row in (ROWS if n % 2 else ROWS[::-1]):
                    client = rig.client(VARIANTS[row].client)
                    host, port = addr[row]
                    for load in loads:
                        c0 = cpu(row)
                        if load.startswith("t"):
                            r = client.run("tput", host=host, port=port, conns=int(load[1:]), seconds=seconds)
                            value = r["bytes"] / r["seconds"] / 1e6
                            cost = (cpu(row) - c0) / (r["bytes"] / 1e9)
                        else:
                            r = client.run("rtt", host=host, port=port, size=int(load[1:]), count=2000, rate=0.0)
                            value = r["p50"]
                            cost = (cpu(row) - c0) / (r["n"] + 20) * 1e6
                        if n:
                            out[row].setdefault(load, []).append(value)
                            out[row].setdefault(f"{load}_cpu", []).append(cost)
        finally:
            rig.close()
    return out


def _tree(rev: str | None, into: Path) -> Path:
    """A copy of revision `rev` (None: the working tree as it is) to run from."""
    if rev is None:
        return REPO
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.copy(Path(__file__), into / "bench" / "ab.py")  # the same measurement on both sides
    return into


def _run_tree(tree: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "bench.ab", "--measure", "--rounds", str(args.rounds),
           "--loads", args.loads, "--seconds", str(args.seconds)]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"bench.ab: run in {tree} failed:\n{p.stderr[-2000:]}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def _ratio(run: dict[str, dict[str, list[float]]], metric: str) -> float:
    a, h = statistics.median(run["ambit"][metric]), statistics.median(run["haproxy"][metric])
    return a / h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="revision A (default HEAD)")
    ap.add_argument("--new", default=None, help="revision B (default: the working tree)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loads", default="t1,t8,r64")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    loads = args.loads.split(",")
    if args.measure:
        print(json.dumps(measure(args.rounds, loads, args.seconds)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="ambit-ab-trees-"))
    try:
        trees = {"A": _tree(args.base, work / "a"), "B": _tree(args.new, work / "b")}
        runs: dict[str, list[dict[str, dict[str, list[float]]]]] = {"A": [], "B": []}
        for i in range(args.pairs):
            for side in ("A", "B"):
                runs[side].append(_run_tree(trees[side], args))
                print(f"bench.ab: {side} run {i + 1}/{args.pairs} done", file=sys.stderr, flush=True)
        report: dict[str, Any] = {}
        print(f"A = {args.base}, B = {args.new or 'working tree'}; ambit / HAProxy in the same run, "
              "median over runs [each run]")
        for load in loads:
            for metric, what in ((load, "MB/s" if load.startswith("t") else "p50 µs"),
                                 (f"{load}_cpu", "CPU s/GB" if load.startswith("t") else "CPU µs/rtt")):
                row = []
                for side in ("A", "B"):
                    ratios = [_ratio(r, metric) for r in runs[side]]
                    report[f"{side}.{metric}"] = ratios
                    row.append(f"{side} {statistics.median(ratios):.2f} {[round(x, 2) for x in ratios]}")
                print(f"  {load:4s} {what:10s} " + "   ".join(row))
        (work / "report.json").write_text(json.dumps({"runs": runs, "ratios": report}))
        print(f"raw numbers: {work / 'report.json'}")
    finally:
        for side in ("a", "b"):
            shutil.rmtree(work / side, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
