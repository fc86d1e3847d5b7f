"""Profile the proxies of one benchmark variant under one load, with py-spy.

    python -m bench.profile --variant ambit --load rtt64 --seconds 10 --out /tmp/prof

brings up the variant on the benchmark's topology (bench/topology.py, the same
namespaces, eBPF and processes as `make bench`), starts the load in its client
pod, and records every Python process of the variant's proxies with py-spy
(`--format raw`: collapsed stacks). It prints the functions with the most
samples on their own ("self") and including callees ("total") per process,
and leaves the raw stacks in --out (feed them to flamegraph.pl or speedscope).
Loads: tput (1 connection, bulk), tput8, rtt64 and rtt1k (back-to-back round
trips), connect (one connection after another).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.rig import Rig
from bench.topology import Topology, cgroup_pids
from bench.variants import VARIANTS

LOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "tput": ("tput", {"conns": 1}),
    "tput8": ("tput", {"conns": 8}),
    "rtt64": ("rtt", {"size": 64, "count": 10**9, "rate": 0.0}),
    "rtt1k": ("rtt", {"size": 1024, "count": 10**9, "rate": 0.0}),
    "connect": ("connect", {"count": 10**9}),
}


def summarize(raw: Path, top: int) -> str:
    """Self and total sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    out = [f"{raw.name}: {samples} samples", "  self:"]
    out += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["  total:"]
    out += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="ambit", choices=sorted(VARIANTS))
    ap.add_argument("--load", default="rtt64", choices=sorted(LOADS))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ambit-profile"))
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count system calls with `strace -c` instead of sampling stacks")
    args = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    v = VARIANTS[args.variant]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ambit-profile-") as tmp:
        topo = Topology(workdir=Path(tmp))
        rig = Rig(topo, Path(tmp))
        try:
            topo.create()
            host, port = v.start(rig)
            client = rig.client(v.client)
            op, params = LOADS[args.load]
            if op == "tput":
                params = {**params, "seconds": args.seconds + 2}
            # the load runs until the profile is done; the client is then torn down with the rig
            threading.Thread(target=lambda: _swallow(lambda: client.run(op, host=host, port=port, **params)),
                             daemon=True).start()
            spies = []
            for proxy in v.proxies:
                for pid in cgroup_pids(rig.cgroup_of(proxy)):
                    raw = args.out / f"{args.variant}-{args.load}-{proxy}-{pid}.txt"
                    if args.syscalls:
                        cmd = ["timeout", "-s", "INT", str(args.seconds), "strace", "-c", "-f", "-p", str(pid),
                               "-o", str(raw)]
                    else:
                        cmd = [spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "250",
                               "--format", "raw", "-o", str(raw), "--nonblocking"]
                    if args.native:
                        cmd.append("--native")
                    spies.append((raw, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL)))
            for raw, p in spies:
                p.wait()
                if raw.exists():
                    print(raw.read_text() if args.syscalls else summarize(raw, args.top))
        finally:
            rig.close()
    return 0


def _swallow(fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except Exception:
        pass  # the rig closing under the load ends it


if __name__ == "__main__":
    sys.exit(main())
