"""Reports of load-test runs: JSON, a Markdown summary, PNG plots, and the SLO verdict.

:func:`result_to_dict` is the one JSON shape of a run; the Markdown and the plots are
rendered from that dict, so a saved ``result.json`` can be re-rendered later.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashionserve.loadtest.generator import RunResult

SCHEMA = "fashionserve-loadtest/1"

GENERATOR_BUSY = 0.8
"""A generator process using this fraction of a core or more may be the bottleneck."""


def result_to_dict(result: RunResult) -> dict[str, Any]:
    """The JSON form of a run.

    Keys: ``schema``, ``label``, ``target``, ``load``, ``started_at``, ``wall_seconds``,
    ``requests`` (measured, ok, errors), ``error_rate``, ``errors_by_code``,
    ``throughput_rps`` (successful requests per second over the measured window),
    ``offered_rps`` (open loop only), ``garments_per_request``, ``latency_ms`` (p50, p90,
    p99, p99_9, max, min, mean; from scheduled send time), ``generator`` (processes, CPU),
    ``timeseries`` (one row per second), ``memory`` (soak: per watched process tree),
    ``histogram`` (the merged HdrHistogram, base64, microseconds) and ``extra``.
    """
    rec = result.recorder
    measured = rec.total
    errors = measured - rec.ok
    return {
        "schema": SCHEMA,
        "label": result.label,
        "target": result.target.describe(),
        "load": result.load.describe(),
        "started_at": result.started_at,
        "wall_seconds": round(result.wall_seconds, 3),
        "measured_seconds": round(rec.elapsed(), 3),
        "requests": {"measured": measured, "ok": rec.ok, "errors": errors},
        "error_rate": errors / measured if measured else 0.0,
        "errors_by_code": dict(sorted(rec.errors.items())),
        "throughput_rps": rec.throughput(),
        "offered_rps": result.load.rate if result.load.mode == "open" else None,
        "garments_per_request": rec.garments / rec.ok if rec.ok else None,
        "latency_ms": rec.latency_ms(),
        "generator": result.generator,
        "timeseries": rec.timeseries(),
        "memory": result.memory,
        "histogram": rec.latency.encode().decode("ascii"),
        "extra": result.extra,
    }


# ------------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned."""
    aligns = [
        "---:" if rows and isinstance(rows[0][i], int | float) else "---"
        for i in range(len(header))
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(aligns) + " |",
    ]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_HEADER = (
    "run",
    "target",
    "load",
    "requests",
    "errors",
    "throughput (req/s)",
    "p50 (ms)",
    "p90 (ms)",
    "p99 (ms)",
    "p99.9 (ms)",
    "max (ms)",
)


def callers(n: int) -> str:
    """``1 caller``, ``8 callers``."""
    return f"{n} caller" + ("" if n == 1 else "s")


def describe_load(load: dict[str, Any]) -> str:
    """``closed, 8 callers`` or ``open poisson, 20.0 req/s``."""
    if load["mode"] == "closed":
        return f"closed, {callers(load['concurrency'])}"
    return f"open {load['arrival']}, {load['rate']:.4g} req/s"


def summary_row(data: dict[str, Any]) -> list[Any]:
    """One run as a row of :data:`SUMMARY_HEADER`."""
    lat = data["latency_ms"]
    return [
        data["label"] or "-",
        data["target"]["kind"],
        describe_load(data["load"]),
        data["requests"]["measured"],
        data["requests"]["errors"],
        data["throughput_rps"],
        lat["p50"],
        lat["p90"],
        lat["p99"],
        lat["p99_9"],
        lat["max"],
    ]


def markdown_summary(data: dict[str, Any]) -> str:
    """A Markdown summary of one run: figures, errors, generator load, memory."""
    gen = data["generator"]
    lines = [
        f"## Load test: {data['label'] or data['target']['kind']}",
        "",
        f"Target `{data['target']['kind']}` at `{data['target']['address']}`, "
        f"{describe_load(data['load'])}, warm-up {data['load']['warmup']:g} s, "
        f"started {data['started_at']}.",
        "",
        markdown_table(SUMMARY_HEADER, [summary_row(data)]),
        "",
        f"Error rate {100 * data['error_rate']:.2f}%"
        + (
            " (" + ", ".join(f"{k}: {v}" for k, v in data["errors_by_code"].items()) + ")"
            if data["errors_by_code"]
            else ""
        )
        + ". Latencies are from each request's scheduled send time.",
        "",
        f"Generator: {gen['processes']} process(es), {gen['cpu_seconds']:.1f} CPU-seconds "
        f"({_fmt(gen['cores_used'], 2)} of {gen['machine_cores']} cores; busiest process "
        f"{100 * gen['busiest_process_core_fraction']:.0f}% of a core); send lag p99 "
        f"{gen['send_lag_ms']['p99']:.1f} ms.",
    ]
    if gen["busiest_process_core_fraction"] >= GENERATOR_BUSY:
        lines += [
            "",
            f"**Warning**: a generator process was busy "
            f"{100 * gen['busiest_process_core_fraction']:.0f}% of the time: the generator "
            "may be what limits this run; add --processes (on another machine if need be).",
        ]
    if data.get("memory"):
        lines += ["", memory_table(data["memory"])]
    return "\n".join(lines) + "\n"


def memory_table(memory: dict[str, Any]) -> str:
    """Markdown table of the soak's memory figures per watched process tree."""
    rows = [
        [
            name,
            m["pid"],
            m["samples"][-1]["processes"] if m["samples"] else 0,
            m["baseline_mib"],
            m["final_mib"],
            m["peak_mib"],
            m["growth_pct"],
        ]
        for name, m in memory.items()
    ]
    return markdown_table(
        (
            "process tree",
            "pid",
            "processes",
            "baseline (MiB)",
            "final (MiB)",
            "peak (MiB)",
            "growth %",
        ),
        rows,
    )


# --------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(ax: Any) -> None:
    """A log-scale y axis labelled 20, 50, 100 rather than 2x10^1."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def plot_timeseries(data: dict[str, Any], path: Path) -> Path:
    """Latency percentiles (top) and throughput (bottom) per second of the measured window."""
    plt = _pyplot()
    rows = data["timeseries"]
    seconds = [r["second"] for r in rows]
    fig, (lat_ax, tput_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, style in (("p50_ms", "-"), ("p90_ms", "--"), ("p99_ms", ":")):
        values = [r[key] if r[key] is not None else float("nan") for r in rows]
        lat_ax.plot(seconds, values, style, label=key.replace("_ms", ""))
    lat_ax.set_ylabel("latency (ms)")
    _plain_log_axis(lat_ax)
    lat_ax.legend(loc="upper left")
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.set_title(f"{data['label'] or data['target']['kind']}: {describe_load(data['load'])}")
    # A last second cut to a sliver would extrapolate a rate from a handful of requests.
    full = [r for r in rows if r["covered"] >= 0.5]
    full_seconds = [r["second"] for r in full]
    tput_ax.plot(full_seconds, [r["ok"] / r["covered"] for r in full], label="ok")
    if any(r["errors"] for r in rows):
        tput_ax.plot(
            full_seconds,
            [r["errors"] / r["covered"] for r in full],
            label="errors",
            color="tab:red",
        )
    if data.get("offered_rps"):
        tput_ax.axhline(data["offered_rps"], linestyle="--", color="grey", label="offered")
    tput_ax.set_ylabel("requests / s")
    tput_ax.set_xlabel("second of the measured window")
    tput_ax.legend(loc="upper left")
    tput_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency_vs_load(
    runs: Sequence[dict[str, Any]], path: Path, p99_target_ms: float | None = None
) -> Path:
    """p50 and p99 against offered load (achieved throughput for closed-loop runs)."""
    plt = _pyplot()
    points = sorted(
        (r["offered_rps"] or r["throughput_rps"], r["latency_ms"], r["throughput_rps"])
        for r in runs
        if r["latency_ms"]["p50"] is not None
    )
    fig, (lat_ax, tput_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = [p[0] for p in points]
    lat_ax.plot(x, [p[1]["p50"] for p in points], "o-", label="p50")
    lat_ax.plot(x, [p[1]["p99"] for p in points], "s-", label="p99")
    if p99_target_ms is not None:
        lat_ax.axhline(p99_target_ms, linestyle="--", color="tab:red", label="p99 target")
    _plain_log_axis(lat_ax)
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(loc="upper left")
    lat_ax.set_title("latency against offered load")
    tput_ax.plot(x, [p[2] for p in points], "o-", label="achieved")
    if x:
        tput_ax.plot([0, max(x)], [0, max(x)], ":", color="grey", label="offered")
    tput_ax.set_xlabel("offered load (req/s)")
    tput_ax.set_ylabel("throughput (req/s)")
    tput_ax.grid(True, alpha=0.3)
    tput_ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory(memory: dict[str, Any], path: Path, title: str = "memory during the soak") -> Path:
    """RSS of each watched process tree over time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, m in memory.items():
        growth = m.get("growth_pct")
        suffix = f" ({growth:+.1f}%)" if growth is not None else ""
        ax.plot(
            [s["t"] for s in m["samples"]],
            [s["rss_mib"] for s in m["samples"]],
            label=f"{name}{suffix}",
        )
    ax.axvline(0, linestyle=":", color="grey")
    ax.set_xlabel("seconds from the end of warm-up")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(data: dict[str, Any], out_dir: Path, plots: bool = True) -> dict[str, Path]:
    """Write ``result.json``, ``summary.md`` and (with ``plots``) ``timeseries.png`` and,
    for a soak, ``memory.png`` into ``out_dir``. Returns the paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "result.json", "markdown": out_dir / "summary.md"}
    written["json"].write_text(json.dumps(data, indent=2) + "\n")
    written["markdown"].write_text(markdown_summary(data))
    if plots:
        written["timeseries"] = plot_timeseries(data, out_dir / "timeseries.png")
        if data.get("memory"):
            written["memory"] = plot_memory(data["memory"], out_dir / "memory.png")
    return written


# ------------------------------------------------------------------------------ SLO
@dataclass(frozen=True)
class Slo:
    """Targets a run must meet; ``None`` means not checked."""

    p99_ms: float | None = None
    max_error_rate: float | None = None
    max_memory_growth_pct: float | None = None

    @property
    def active(self) -> bool:
        """Whether any target is set."""
        return any(
            v is not None for v in (self.p99_ms, self.max_error_rate, self.max_memory_growth_pct)
        )


def check_slo(data: dict[str, Any], slo: Slo) -> list[str]:
    """The targets ``data`` misses, one sentence each (empty: every target met).

    A run with no successful request misses any p99 target: no latency is not a good one.
    """
    misses = []
    if slo.p99_ms is not None:
        p99 = data["latency_ms"]["p99"]
        if p99 is None:
            misses.append(f"p99 latency: no successful request (target {slo.p99_ms:g} ms)")
        elif p99 > slo.p99_ms:
            misses.append(f"p99 latency {p99:.3f} ms > target {slo.p99_ms:g} ms")
    if slo.max_error_rate is not None and data["error_rate"] > slo.max_error_rate:
        misses.append(
            f"error rate {100 * data['error_rate']:.3f}% > target {100 * slo.max_error_rate:g}%"
        )
    if slo.max_memory_growth_pct is not None:
        for name, m in (data.get("memory") or {}).items():
            growth = m.get("growth_pct")
            if growth is not None and growth > slo.max_memory_growth_pct:
                misses.append(
                    f"{name} memory grew {growth:.2f}% > target {slo.max_memory_growth_pct:g}%"
                )
    return misses
