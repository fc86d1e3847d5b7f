"""The benchmark's report: the Markdown table (latest.md, quoted by the README) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (metric, column heading, format)
COLUMNS = (
    ("throughput_1conn_MBps", "MB/s 1 conn", "{:.0f}"),
    ("throughput_8conn_MBps", "MB/s 8 conns", "{:.0f}"),
    ("latency_p50_us_64B", "RTT p50 64 B (µs)", "{:.0f}"),
    ("latency_p99_us_64B", "p99 64 B", "{:.0f}"),
    ("latency_p50_us_1KiB", "p50 1 KiB", "{:.0f}"),
    ("latency_p99_us_1KiB", "p99 1 KiB", "{:.0f}"),
    ("latency_p50_us_64B_fixed", "p50 64 B @1k/s", "{:.0f}"),
    ("connect_us", "connect+1st byte (µs)", "{:.0f}"),
    ("conns_per_s", "new conns/s", "{:.0f}"),
    ("connect_growth", "connect, 2000 open / 10 open", "{:.2f}"),
    ("cpu_s_per_GB", "CPU s/GB", "{:.2f}"),
    ("pss_idle_MiB", "PSS idle (MiB)", "{:.1f}"),
    ("pss_KiB_per_conn", "KiB/idle conn", "{:.1f}"),
)
HTTP_COLUMNS = (
    ("requests_per_s", "requests/s (8 conns)", "{:.0f}"),
    ("request_p50_us", "request p50 (µs)", "{:.0f}"),
    ("request_p99_us", "request p99 (µs)", "{:.0f}"),
)
# the targets, for ambit against its HAProxy row
TARGETS = (
    ("pss_KiB_per_conn", "memory per idle connection ≤ 64 KiB (both ztunnels)", "abs", 64.0),
    ("latency_p50_us_64B", "added p50 latency ≤ 1.5x HAProxy's", "added", 1.5),
    ("latency_p99_us_64B", "added p99 latency ≤ 1.5x HAProxy's", "added", 1.5),
    ("cpu_s_per_GB", "CPU per GB ≤ 0.8x HAProxy's", "ratio_max", 0.8),
    ("throughput_1conn_MBps", "throughput, 1 connection ≥ HAProxy's", "ratio_min", 1.0),
    ("throughput_8conn_MBps", "throughput, 8 connections ≥ HAProxy's", "ratio_min", 1.0),
    ("connect_growth", "connection setup flat: with 2000 open ≤ 1.2x with 10 open", "abs", 1.2),
    ("pss_idle_MiB", "idle footprint ≤ 40 MiB PSS per ztunnel (both together ≤ 80)", "abs", 80.0),
)


def _cell(row: dict[str, Any], metric: str, fmt: str) -> str:
    v = row.get(metric)
    if v is None:
        return "-"
    lo, hi = row["min"].get(metric), row["max"].get(metric)
    if lo is None or hi is None or lo == hi:
        return fmt.format(v)
    return f"{fmt.format(v)} <sub>{fmt.format(lo)}-{fmt.format(hi)}</sub>"


def markdown(results: dict[str, Any]) -> str:
    meta, variants = results["meta"], results["variants"]
    plan = meta["plan"]
    lines = [
        f"Measured {meta['date']} with `make bench{' QUICK=1' if meta['quick'] else ''}`: "
        f"{meta['cpus']} cores, Linux {meta['kernel']}, Python {meta['python']}, {meta['haproxy']}. "
        f"Medians of {plan['rounds']} interleaved rounds after {plan['warmup']} warm-up "
        f"(memory: {plan['mem_rounds']} round(s) at {', '.join(str(n) for n in plan['mem_points'])} idle "
        f"connections), min-max in small print. Load average before/after: {meta['load_before']} / "
        f"{meta['load_after']}; other processes used {meta['other_load_cores']} cores during the rounds.",
        "",
        "| path | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row in variants.values():
        if "tcp" not in row["kinds"]:
            continue
        lines.append(f"| {row['title']} | " + " | ".join(_cell(row, m, f) for m, _, f in COLUMNS) + " |")
    lines += ["", "| HTTP/1.1 path | " + " | ".join(h for _, h, _ in HTTP_COLUMNS) + " |",
              "|---|" + "---:|" * len(HTTP_COLUMNS)]
    for row in variants.values():
        if "http" not in row["kinds"]:
            continue
        lines.append(f"| {row['title']} | " + " | ".join(_cell(row, m, f) for m, _, f in HTTP_COLUMNS) + " |")
    errors = [(n, r["error"]) for n, r in variants.items() if r.get("error")]
    if errors:
        lines += ["", "Failed: " + "; ".join(f"{n}: {e}" for n, e in errors)]
    lines += ["", "Targets (ambit against HAProxy nbthread 1, from this run):", ""]
    lines += [f"- {t}" for t in targets(variants)]
    for name, label in (("ambit-waypoint", "waypoint"), ("ambit-gateway", "ingress gateway")):
        row = variants.get(name, {})
        if row.get("added_vs_haproxy"):
            lines.append(f"- {label}: added request p50 {_times(row['added_vs_haproxy'], 'request_p50_us')}, "
                         f"p99 {_times(row['added_vs_haproxy'], 'request_p99_us')} HAProxy mode http's "
                         f"({row['baseline']}), requests/s {_times(row['vs_haproxy'], 'requests_per_s')}")
    return "\n".join(lines) + "\n"


def _times(ratios: dict[str, float], metric: str) -> str:
    """A ratio as "1.23x"; "-" when the run had none (p99: direct's above the baseline's)."""
    v = ratios.get(metric)
    return "-" if v is None else f"{v:.2f}x"


def targets(variants: dict[str, Any]) -> list[str]:
    out: list[str] = []
    a = variants.get("ambit")
    if not a:
        return out
    for metric, text, how, bound in TARGETS:
        if a.get(metric) is None:
            out.append(f"{text}: not measured")
            continue
        if how == "abs":
            v, ok = a[metric], a[metric] <= bound
            out.append(f"{text}: {v:.2f} — {'met' if ok else 'not met'}")
        elif how == "added":
            v = a["added_vs_haproxy"].get(metric)
            if v is None:
                out.append(f"{text}: no HAProxy/direct numbers")
                continue
            out.append(f"{text}: {v:.2f}x — {'met' if v <= bound else 'not met'}")
        else:
            v = a["vs_haproxy"].get(metric)
            if v is None:
                out.append(f"{text}: no HAProxy numbers")
                continue
            ok = v <= bound if how == "ratio_max" else v >= bound
            out.append(f"{text}: {v:.2f}x — {'met' if ok else 'not met'}")
    return out


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    made = []

    def bars(ax: Any, metrics: list[tuple[str, str]], title: str, ylabel: str) -> None:
        names = [n for n, r in variants.items() if any(r.get(m) is not None for m, _ in metrics)]
        width = 0.8 / max(1, len(metrics))
        for i, (m, label) in enumerate(metrics):
            xs = [j + i * width for j in range(len(names))]
            vals = [variants[n].get(m) or 0 for n in names]
            lo = [max(0.0, v - variants[n]["min"].get(m, v)) for n, v in zip(names, vals, strict=True)]
            hi = [max(0.0, variants[n]["max"].get(m, v) - v) for n, v in zip(names, vals, strict=True)]
            ax.bar(xs, vals, width, label=label, yerr=[lo, hi], capsize=2)
        ax.set_xticks([j + width * (len(metrics) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bars(axes[0], [("throughput_1conn_MBps", "1 connection"), ("throughput_8conn_MBps", "8 connections")],
         "Throughput (median, min-max)", "MB/s")
    bars(axes[1], [("cpu_s_per_GB", "1 connection"), ("cpu_s_per_GB_8conn", "8 connections")],
         "Proxy CPU per GB moved", "CPU seconds / GB")
    fig.tight_layout()
    made.append(_save(fig, out / "throughput.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    bars(axes[0], [("latency_p50_us_64B", "p50 64 B"), ("latency_p99_us_64B", "p99 64 B"),
                   ("latency_p50_us_1KiB", "p50 1 KiB"), ("latency_p99_us_1KiB", "p99 1 KiB")],
         "Round trip on one connection, back to back", "µs")
    bars(axes[1], [("connect_us", "connect + first byte"), ("request_p50_us", "HTTP request p50"),
                   ("request_p99_us", "HTTP request p99")],
         "Connection setup and HTTP requests", "µs")
    fig.tight_layout()
    made.append(_save(fig, out / "latency.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    points = results["meta"]["plan"]["mem_points"]
    for name, r in variants.items():
        ys = [r.get("pss_idle_MiB"), r.get("pss_MiB_1k"), r.get("pss_MiB_5k")]
        if None in ys:
            continue
        ax.plot(points, ys, marker="o", label=f"{name} ({r['pss_KiB_per_conn']:.0f} KiB/conn)")
    ax.set_xlabel("idle tunnelled connections")
    ax.set_ylabel("PSS of the path's proxies (MiB)")
    ax.set_title("Proxy memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    made.append(_save(fig, out / "memory.png"))
    plt.close(fig)
    return made


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


def write_report(results: dict[str, Any], out: Path, *, with_plots: bool = True) -> str:
    """Write latest.md (and the plots); returns the Markdown."""
    md = markdown(results)
    if with_plots:
        try:
            made = plots(results, out)
            md += "\n" + "\n".join(f"![{p.stem}](bench/results/{p.name})" for p in made) + "\n"
        except ImportError:
            md += "\n(no plots: matplotlib is not installed; `pip install -e '.[dev]'`)\n"
    (out / "latest.md").write_text(md)
    return md
