"""`make bench`: ambit's data path on the real path (namespaces, eBPF, two ztunnel processes)
against HAProxy, every variant interleaved in one run.

Each round runs every measurement for every chosen variant back to back (the
variants' order rotates by one each round), after one warm-up round that is
not counted; the JSON keeps every round's value and reports the median with
its min and max. Memory is measured first, once, on fresh processes: the
proxies' PSS with 0, 1000 and 5000 idle tunnelled connections, and the slope
between the last two (rows that share another row's processes have none). See bench/README.md for what each number means and how to
profile; bench/variants.py for the rows.

Output: bench/results/latest.json, latest.md (the table the README shows),
and PNG plots beside them. Needs root (namespaces, cgroups, eBPF); installs
nothing itself (`make bench` apt-installs haproxy and iptables first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import write_report
from bench.rig import Rig
from bench.topology import Topology, cgroup_cpu_s, cgroup_pids, pss_kib, sweep_stale
from bench.variants import ALL_METRICS, HIGHER_IS_BETTER, VARIANTS, Variant

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a round does."""

    rounds: int = 5
    warmup: int = 1
    seconds: float = 1.0  # each throughput and rate run
    rtt_count: int = 2000  # back-to-back round trips
    fixed_count: int = 1000  # round trips at fixed_rate per second
    fixed_rate: float = 1000.0
    connect_count: int = 200
    http_count: int = 1000
    concurrency: int = 8
    mem_points: tuple[int, ...] = (0, 1000, 5000)
    setup_points: tuple[int, ...] = (10, 2000)  # connect+first byte with this many already open
    mem_rounds: int = 1  # more rounds would measure warm pools, not fresh processes
    settle: float = 1.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(rounds=3, warmup=1, seconds=0.25, rtt_count=300, fixed_count=100, fixed_rate=1000.0,
                   connect_count=30, http_count=200, mem_points=(0, 100, 500), setup_points=(10, 200),
                   mem_rounds=1, settle=0.5)


# ---------------------------------------------------------------------------
# the machine's load


def _cpu_busy_s() -> float:
    """Seconds of CPU the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------
# one measurement of one variant


class Runner:
    def __init__(self, rig: Rig, variants: list[Variant], plan: Plan) -> None:
        self.rig = rig
        self.variants = variants
        self.plan = plan
        self.addr: dict[str, tuple[str, int]] = {}
        self.samples: dict[str, dict[str, list[float]]] = {v.name: {} for v in variants}
        self.errors: dict[str, str] = {}

    def start(self) -> None:
        for v in list(self.variants):
            try:
                self.addr[v.name] = v.start(self.rig)
                self.rig.client(v.client)
            except Exception as e:  # one broken path must not hide the others' numbers
                print(f"bench: {v.name} could not start: {e}", file=sys.stderr)
                self.errors[v.name] = f"could not start: {e}"[:400]
                self.variants.remove(v)

    def _cpu(self, v: Variant) -> float:
        return sum(cgroup_cpu_s(self.rig.cgroup_of(p)) for p in v.proxies)

    def _pss_kib(self, v: Variant) -> int:
        pids = [pid for p in v.proxies for pid in cgroup_pids(self.rig.cgroup_of(p))]
        return pss_kib(pids)

    def _add(self, v: Variant, metric: str, value: float | None) -> None:
        if value is not None:
            self.samples[v.name].setdefault(metric, []).append(value)

    def _run(self, v: Variant, op: str, **args: Any) -> dict[str, Any]:
        host, port = self.addr[v.name]
        return self.rig.client(v.client).run(op, host=host, port=port, **args)

    # -- measurement groups (each: one variant, one round)

    def tput(self, v: Variant, conns: int, count: bool) -> None:
        cpu0 = self._cpu(v)
        r = self._run(v, "tput", conns=conns, seconds=self.plan.seconds)
        cpu = self._cpu(v) - cpu0
        if not count:
            return
        suffix = "1conn" if conns == 1 else "8conn"
        self._add(v, f"throughput_{suffix}_MBps", r["bytes"] / r["seconds"] / 1e6)
        if v.proxies:
            self._add(v, "cpu_s_per_GB" if conns == 1 else "cpu_s_per_GB_8conn", cpu / (r["bytes"] / 1e9))

    def rtt(self, v: Variant, size: int, fixed: bool, count: bool) -> None:
        p = self.plan
        cpu0 = self._cpu(v)
        r = self._run(v, "rtt", size=size, count=p.fixed_count if fixed else p.rtt_count,
                      rate=p.fixed_rate if fixed else 0.0)
        cpu = self._cpu(v) - cpu0
        if count:
            label = "64B" if size == 64 else "1KiB"
            tail = "_fixed" if fixed else ""
            self._add(v, f"latency_p50_us_{label}{tail}", r["p50"])
            self._add(v, f"latency_p99_us_{label}{tail}", r["p99"])
            if v.proxies and size == 64 and not fixed:
                self._add(v, "cpu_us_per_rtt_64B", cpu / (r["n"] + 20) * 1e6)

    def connect(self, v: Variant, count: bool) -> None:
        r = self._run(v, "connect", count=self.plan.connect_count)
        if count:
            self._add(v, "connect_us", r["p50"])

    def conns(self, v: Variant, count: bool) -> None:
        r = self._run(v, "conns", seconds=self.plan.seconds, concurrency=self.plan.concurrency)
        if count:
            self._add(v, "conns_per_s", r["rate"])

    def http(self, v: Variant, count: bool) -> None:
        tls: dict[str, str] | None = None
        authority = f"{self.addr[v.name][0]}:{self.addr[v.name][1]}"
        if v.https:  # the edge's hostname, by SNI and as Host (the gateway answers 421 to another)
            tls = self.rig.edge_client()
            authority = tls["server_name"]
        r = self._run(v, "http", count=self.plan.http_count, authority=authority, tls=tls)
        q = self._run(v, "http_rate", seconds=self.plan.seconds, concurrency=self.plan.concurrency,
                      authority=authority, tls=tls)
        if count:
            self._add(v, "request_p50_us", r["p50"])
            self._add(v, "request_p99_us", r["p99"])
            self._add(v, "requests_per_s", q["rate"])

    def memory(self, v: Variant) -> None:
        """PSS of the variant's proxies at each number of idle tunnelled connections, and the
        cost of opening one more (connect + first byte) with few and with many open."""
        p = self.plan
        client = self.rig.client(v.client)
        client.run("release")
        time.sleep(p.settle)
        pss: dict[int, float] = {}
        setup: dict[int, float] = {}
        held = 0
        try:
            for n in sorted(set(p.mem_points) | set(p.setup_points)):
                if n > held:
                    host, port = self.addr[v.name]
                    client.run("hold", host=host, port=port, n=n - held)
                    held = n
                if n in p.setup_points:
                    setup[n] = self._run(v, "connect", count=p.connect_count)["p50"]
                if n in p.mem_points:
                    time.sleep(p.settle)
                    pss[n] = self._pss_kib(v)
        finally:
            client.run("release")
        zero, lo, hi = (pss[n] for n in p.mem_points)
        lo_n, hi_n = p.mem_points[1], p.mem_points[2]
        few, many = (setup[n] for n in p.setup_points)
        self._add(v, "connect_us_few_open", few)
        self._add(v, "connect_us_many_open", many)
        self._add(v, "connect_growth", many / few)
        if not v.proxies:
            return
        self._add(v, "pss_idle_MiB", zero / 1024)
        self._add(v, "pss_MiB_1k", lo / 1024)
        self._add(v, "pss_MiB_5k", hi / 1024)
        self._add(v, "pss_KiB_per_conn", (hi - lo) / (hi_n - lo_n))

    # -- the schedule

    def groups(self) -> list[tuple[str, Any]]:
        return [
            ("throughput, 1 connection", lambda v, c: self.tput(v, 1, c)),
            ("throughput, 8 connections", lambda v, c: self.tput(v, self.plan.concurrency, c)),
            ("RTT 64 B", lambda v, c: self.rtt(v, 64, False, c)),
            ("RTT 1 KiB", lambda v, c: self.rtt(v, 1024, False, c)),
            ("RTT 64 B, fixed rate", lambda v, c: self.rtt(v, 64, True, c)),
            ("RTT 1 KiB, fixed rate", lambda v, c: self.rtt(v, 1024, True, c)),
            ("connect + first byte", self.connect),
            ("new connections/s", self.conns),
        ]

    def run(self) -> None:
        p = self.plan
        tcp = [v for v in self.variants if "tcp" in v.kinds]
        http = [v for v in self.variants if "http" in v.kinds]
        # on fresh processes, before any other traffic (what a proxy keeps after load is not
        # its idle cost); direct too: its connect with many open is the floor
        with_memory = [v for v in tcp if v.own_processes]
        for r in range(p.mem_rounds):
            for v in _rotated(with_memory, r):
                self._guard(v, lambda v=v: self.memory(v), f"memory, round {r + 1}")
        for r in range(p.warmup + p.rounds):
            counted = r >= p.warmup
            label = f"round {r + 1 - p.warmup}/{p.rounds}" if counted else "warm-up"
            print(f"bench: {label} (load {loadavg()})", file=sys.stderr, flush=True)
            for name, fn in self.groups():
                for v in _rotated(tcp, r):
                    self._guard(v, lambda v=v, fn=fn, counted=counted: fn(v, counted), name)
            for v in _rotated(http, r):
                self._guard(v, lambda v=v, counted=counted: self.http(v, counted), "HTTP requests")

    def _guard(self, v: Variant, fn: Any, what: str) -> None:
        if v.name in self.errors:
            return
        try:
            fn()
        except Exception as e:
            print(f"bench: {v.name}: {what} failed: {e}", file=sys.stderr)
            self.errors[v.name] = f"{what}: {e}"[:400]


def _rotated(vs: list[Variant], r: int) -> list[Variant]:
    if not vs:
        return vs
    k = r % len(vs)
    return vs[k:] + vs[:k]


# ---------------------------------------------------------------------------
# results


def summarize(runner: Runner, all_variants: list[Variant]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in all_variants:
        s = runner.samples.get(v.name, {})
        row: dict[str, Any] = {m: (statistics.median(s[m]) if s.get(m) else None) for m in ALL_METRICS}
        row["min"] = {m: min(s[m]) for m in ALL_METRICS if s.get(m)}
        row["max"] = {m: max(s[m]) for m in ALL_METRICS if s.get(m)}
        row["samples"] = {m: s[m] for m in ALL_METRICS if s.get(m)}
        row["title"] = v.title
        row["kinds"] = list(v.kinds)
        row["proxies"] = list(v.proxies)
        row["baseline"] = v.baseline
        row["error"] = runner.errors.get(v.name)
        out[v.name] = row
    direct = out.get("direct")
    for name, row in out.items():
        base = out.get(row["baseline"]) if row["baseline"] else None
        row["vs_direct"] = _ratios(row, direct)
        row["vs_haproxy"] = _ratios(row, base)
        row["added_us"] = {m: row[m] - direct[m] for m in _latency_metrics()
                           if direct and row[m] is not None and direct[m] is not None} if name != "direct" else {}
        row["added_vs_haproxy"] = {}
        if base is not None and direct is not None:
            for m in _latency_metrics():
                if row[m] is not None and base[m] is not None and direct[m] is not None and base[m] > direct[m]:
                    row["added_vs_haproxy"][m] = (row[m] - direct[m]) / (base[m] - direct[m])
    return out


def _latency_metrics() -> list[str]:
    return [m for m in ALL_METRICS if m.endswith(("_us", "_64B", "_1KiB", "_fixed"))]


def _ratios(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, float]:
    if base is None or base is row:
        return {}
    return {m: row[m] / base[m] for m in ALL_METRICS
            if row[m] is not None and base.get(m) not in (None, 0)}


def machine() -> dict[str, Any]:
    hp = shutil.which("haproxy")
    version = ""
    if hp:
        version = subprocess.run([hp, "-v"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": version,
    }


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ambit-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"bench: logs kept in {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run (a smoke check, under two minutes)")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all): "
                    + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds (default 5; quick 3)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where latest.json/.md and the plots go")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (process logs)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the idle-connection phase (quicker A/B runs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, cgroups, eBPF)", file=sys.stderr)
        return 2
    plan = Plan.quick() if args.quick else Plan()
    if args.rounds is not None:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    if args.no_memory:
        plan = Plan(**{**plan.__dict__, "mem_rounds": 0})
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if "direct" not in names:
        names.insert(0, "direct")  # every ratio is against it
    chosen = [VARIANTS[n] for n in names]
    started = time.monotonic()
    load_before = loadavg()
    # SIGTERM (a test's timeout, a Ctrl-C's cousin) ends the run through its `finally`:
    # the topology is destroyed instead of being left for the next run's sweep
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for what in sweep_stale():
        print(f"bench: removed {what}, left by a run that was killed", file=sys.stderr)
    with _workdir(args.keep) as workdir:
        topo = Topology(workdir=workdir)
        rig = Rig(topo, workdir)
        try:
            topo.create()
            runner = Runner(rig, list(chosen), plan)
            runner.start()
            busy0, ours0, t0 = _cpu_busy_s(), cgroup_cpu_s(topo.cgroup_base), time.monotonic()
            runner.run()
            busy = _cpu_busy_s() - busy0
            ours = cgroup_cpu_s(topo.cgroup_base) - ours0
            wall = time.monotonic() - t0
        finally:
            rig.close()
        left = topo.leftovers()
    if left:
        print(f"bench: left behind: {left}", file=sys.stderr)
    meta = machine() | {
        "quick": args.quick,
        "plan": plan.__dict__ | {"mem_points": list(plan.mem_points), "setup_points": list(plan.setup_points)},
        "load_before": load_before,
        "load_after": loadavg(),
        "seconds": round(time.monotonic() - started, 1),
        # CPU the rest of the machine used while the rounds ran, in cores (other engineers'
        # tests, say): the benchmark's own processes are subtracted
        "other_load_cores": round(max(0.0, busy - ours) / wall, 2) if wall else None,
        "metrics_higher_is_better": sorted(HIGHER_IS_BETTER),
    }
    results = {"meta": meta, "variants": summarize(runner, chosen)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    md = write_report(results, args.out, with_plots=not args.no_plots)
    print(md)
    failed = [n for n, r in results["variants"].items() if r["error"]]
    if failed:
        print(f"bench: failed variants: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
