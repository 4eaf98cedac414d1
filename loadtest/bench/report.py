"""The benchmark's report: its section of ``BENCHMARKS.md`` (headline with each target's
verdict, machine and versions, results, plots, commands) and the raw figures as JSON."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fashionserve.loadtest.bench.runs import Bench
from fashionserve.loadtest.report import (
    SUMMARY_HEADER,
    callers,
    markdown_table,
    memory_table,
    plot_latency_vs_load,
    plot_memory,
    plot_timeseries,
    summary_row,
)

TARGETS = {
    "gateway_throughput_ratio": 0.9,
    "gateway_added_p50_ms": 2.0,
    "naive_throughput_ratio": 3.0,
    "memory_growth_pct": 5.0,
    "preprocess_12mp_ms": 40.0,
    "phone_small_throughput_ratio": 0.6,
    "ray_throughput_ratio": 1.5,
    "ray_capacity_ratio": 1.5,
}
"""The targets of issues 5 and 16, checked and reported in BENCHMARKS.md."""

IMAGE_SETS = (("", "small images"), ("phone_", "phone photos"))
"""Each image set's run-key prefix and name."""


def machine_info() -> dict[str, Any]:
    """The host: CPU model and count, memory, OS, GPUs (when ``nvidia-smi`` is present)."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus,
    }


VERSIONED = (
    "fashionserve",
    "nvidia-pytriton",
    "tritonclient",
    "grpcio",
    "onnxruntime",
    "torch",
    "numpy",
    "hdrhistogram",
)


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_commit() -> str:
    source = Path(__file__).resolve().parents[2]  # the checkout being measured
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=source,
        ).stdout.strip()
        dirty = subprocess.run(
            # What the bench writes itself (this report, its figures) does not make the
            # measured code dirty.
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!BENCHMARKS.md",
                ":!benchmarks",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=source,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" (with uncommitted changes)" if dirty else "")


def triton_version(url: str) -> str:
    """The version Triton reports in its server metadata (``unknown`` if it does not)."""
    from fashionserve.ensemble import connect

    try:
        client = connect(url)
        try:
            return str(client.get_server_metadata().version)
        finally:
            client.close()
    except Exception:  # a benchmark still runs without this detail
        return "unknown"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(
    runs: Mapping[str, Any], compute: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The comparisons of the issues, each with its target and verdict. ``compute`` is
    Triton's compute time per image set (:attr:`Bench.triton_compute`)."""
    rows: list[dict[str, Any]] = []

    def tput(key: str) -> float | None:
        return runs[key]["throughput_rps"] if key in runs else None

    def p50(key: str) -> float | None:
        return runs[key]["latency_ms"]["p50"] if key in runs else None

    def add(name: str, value: float | None, unit: str, target: str, met: bool | None) -> None:
        rows.append(
            {"comparison": name, "value": value, "unit": unit, "target": target, "met": met}
        )

    for gateway_key, triton_key, who in (
        ("gateway", "triton", ""),
        ("gateway_batched", "triton_crowd", ", more callers than batch slots"),
    ):
        ratio = _ratio(tput(gateway_key), tput(triton_key))
        add(
            f"gateway / direct Triton throughput{who}",
            ratio,
            "x",
            f">= {TARGETS['gateway_throughput_ratio']}x",
            None if ratio is None else ratio >= TARGETS["gateway_throughput_ratio"],
        )
    for key, who in (("_1", "1 caller"), ("", "same concurrency")):
        g, t = p50("gateway" + key), p50("triton" + key)
        added = g - t if g is not None and t is not None else None
        add(
            f"gateway added p50 latency, {who}",
            added,
            "ms",
            f"<= {TARGETS['gateway_added_p50_ms']:g} ms",
            None if added is None else added <= TARGETS["gateway_added_p50_ms"],
        )
    ratio = _ratio(tput("gateway"), tput("naive"))
    add(
        "fashionserve / naive server throughput",
        ratio,
        "x",
        f">= {TARGETS['naive_throughput_ratio']:g}x",
        None if ratio is None else ratio >= TARGETS["naive_throughput_ratio"],
    )
    add(
        "micro-batching on / off throughput",
        _ratio(tput("gateway_batched"), tput("gateway_unbatched")),
        "x",
        "measured",
        None,
    )
    if "gateway_unbatched" in runs and "gateway_batched" in runs:
        on, off = p50("gateway_batched"), p50("gateway_unbatched")
        add(
            "micro-batching on - off p50 latency",
            on - off if on is not None and off is not None else None,
            "ms",
            "measured",
            None,
        )
    if "capacity" in runs:
        cap = runs["capacity"]
        add(
            f"capacity at p99 <= {cap['p99_target_ms']:.0f} ms (open loop)",
            cap["capacity_rps"],
            "req/s",
            "measured",
            None,
        )
    preprocess = (
        ((compute or {}).get("phone_12mp") or {}).get("models", {}).get("preprocess", {})
    ).get("total")
    add(
        "preprocess compute per 12 MP JPEG (Triton statistics)",
        preprocess,
        "ms",
        f"<= {TARGETS['preprocess_12mp_ms']:g} ms",
        None if preprocess is None else preprocess <= TARGETS["preprocess_12mp_ms"],
    )
    ratio = _ratio(tput("phone_gateway"), tput("gateway"))
    add(
        "throughput, phone photos / small images (gateway, 8 callers)",
        ratio,
        "x",
        f">= {TARGETS['phone_small_throughput_ratio']:g}x",
        None if ratio is None else ratio >= TARGETS["phone_small_throughput_ratio"],
    )
    for prefix, name in IMAGE_SETS:
        ratio = _ratio(tput(f"{prefix}gateway"), tput(f"{prefix}ray"))
        add(
            f"fashionserve / Ray Serve throughput, 8 callers, {name}",
            ratio,
            "x",
            f">= {TARGETS['ray_throughput_ratio']:g}x",
            None if ratio is None else ratio >= TARGETS["ray_throughput_ratio"],
        )
        ours, theirs = runs.get(f"{prefix}capacity"), runs.get(f"{prefix}ray_capacity")
        ratio = _ratio(
            ours["capacity_rps"] if ours else None, theirs["capacity_rps"] if theirs else None
        )
        at = f" at p99 <= {ours['p99_target_ms']:.0f} ms" if ours else ""
        add(
            f"fashionserve / Ray Serve capacity{at}, {name}",
            ratio,
            "x",
            f">= {TARGETS['ray_capacity_ratio']:g}x",
            None if ratio is None else ratio >= TARGETS["ray_capacity_ratio"],
        )
    for name, m in ((runs.get("soak") or {}).get("memory") or {}).items():
        growth = m.get("growth_pct")
        add(
            f"{name} memory growth over the soak",
            growth,
            "%",
            f"< {TARGETS['memory_growth_pct']:g}%",
            None if growth is None else growth < TARGETS["memory_growth_pct"],
        )
    return rows


def _headline_table(rows: list[dict[str, Any]]) -> str:
    def value(row: dict[str, Any]) -> str:
        v = row["value"]
        if v is None:
            return "not measured"
        return f"{v:.2f}{row['unit']}" if row["unit"] == "x" else f"{v:.2f} {row['unit']}"

    verdict = {True: "met", False: "**missed**", None: "-"}
    return markdown_table(
        ("comparison", "measured", "target", "verdict"),
        [[r["comparison"], value(r), r["target"], verdict[r["met"]]] for r in rows],
    )


def _cpu_profile(runs: Mapping[str, Any], key: str) -> str:
    run = runs.get(key)
    if not run:
        return ""
    cores = run["extra"].get("server_cpu_cores", {})
    parts = [f"{name} {value:.2f}" for name, value in cores.items()]
    parts.append(f"load generator {run['generator']['cores_used'] or 0:.2f}")
    return (
        f"`{run['label']}`: " + ", ".join(parts) + f" cores of {run['generator']['machine_cores']}"
    )


def _misses(rows: list[dict[str, Any]], runs: Mapping[str, Any]) -> list[str]:
    notes = []
    for row in rows:
        if row["met"] is not False:
            continue
        name = row["comparison"]
        if name.startswith("gateway /") or name.startswith("gateway added"):
            keys = ["gateway", "triton"] + (["gateway_1", "triton_1"] if "1 caller" in name else [])
        elif name.startswith("fashionserve / naive"):
            keys = ["gateway", "naive"]
        elif name.startswith("fashionserve / Ray Serve"):
            prefix = "phone_" if name.endswith("phone photos") else ""
            keys = [f"{prefix}gateway", f"{prefix}ray"]
        elif name.startswith("throughput, phone photos") or name.startswith("preprocess"):
            keys = ["gateway", "phone_gateway", "phone_12mp_1"]
        else:
            keys = ["soak"]
        profile = "; ".join(p for p in (_cpu_profile(runs, k) for k in keys) if p)
        notes.append(
            f"- **{name}** missed its target ({row['target']}). CPU used meanwhile: {profile}."
        )
    return notes


def _is_capacity(key: str) -> bool:
    return key.endswith("capacity") or key.endswith("capacity_steps")


CAPACITY_NAMES = {
    "capacity": "gateway, small images",
    "ray_capacity": "Ray Serve, small images",
    "phone_capacity": "gateway, phone photos",
    "phone_ray_capacity": "Ray Serve, phone photos",
}


def _capacity_section(runs: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, name in CAPACITY_NAMES.items():
        if key not in runs:
            continue
        cap = runs[key]
        steps = sorted(runs[f"{key}_steps"]["steps"], key=lambda r: r["offered_rps"])
        lines += [
            f"Capacity search, {name} (open loop, Poisson arrivals, 5 s steps): the highest "
            f"rate with p99 <= {cap['p99_target_ms']:.0f} ms and under 1% errors is "
            f"**{cap['capacity_rps']:.2f} req/s**.",
            "",
            markdown_table(
                ("offered (req/s)", "achieved (req/s)", "p50 (ms)", "p99 (ms)", "errors", "meets"),
                [
                    [
                        r["offered_rps"],
                        r["throughput_rps"],
                        r["latency_ms"]["p50"],
                        r["latency_ms"]["p99"],
                        r["requests"]["errors"],
                        "yes" if r["extra"]["meets"] else "no",
                    ]
                    for r in steps
                ],
            ),
            "",
        ]
    return lines


COMPUTE_NAMES = {
    "small": "small images (every gateway and direct-Triton run of the set)",
    "phone": "phone photos (the gateway's 1, 8 and 32-caller runs)",
    "phone_12mp": "12 MP JPEGs alone (1 caller)",
}


def _compute_section(compute: Mapping[str, Any]) -> list[str]:
    """Triton's compute time per model and image, one row per image set and model."""
    rows = []
    for key, name in COMPUTE_NAMES.items():
        figures = compute.get(key)
        if not figures or not figures["images"]:
            continue
        for model, ms in figures["models"].items():
            rows.append(
                [
                    f"{name}, {figures['images']} images",
                    model,
                    ms["compute_input"],
                    ms["compute_infer"],
                    ms["compute_output"],
                    ms["total"],
                ]
            )
    if not rows:
        return []
    return [
        "Triton's compute time per image (statistics API: each model's `batch_stats`, one "
        "count per execution, divided by the images the detector saw meanwhile). Wall "
        "times: with more busy model processes than cores they include waiting for a core.",
        "",
        markdown_table(
            ("image set", "model", "input (ms)", "infer (ms)", "output (ms)", "total (ms)"),
            rows,
        ),
        "",
    ]


def _ray_section(bench: Bench) -> list[str]:
    s = bench.settings
    if not any(k in bench.runs for k in ("ray", "ray_1", "ray_batched")):
        return []
    threads = max(1, s.ray_cores // s.ray_replicas)
    return [
        "The Ray Serve reference (`fashionserve loadtest ray-server`, "
        "`loadtest/peers/ray_serve.py`) serves the same repository's ONNX files with ONNX "
        "Runtime and the project's own preprocess, crop and taxonomy decoding, behind Ray "
        "Serve's gRPC proxy (`fashion.v1` Analyze); before it was measured it answered the "
        "first 4 images of each set like the gateway (same garments, same top category). "
        f"Served as: a Ray cluster of {s.ray_cores} CPUs; {s.ray_replicas} replicas of one "
        f"deployment with `num_cpus` {s.ray_cores / s.ray_replicas:g} each, ONNX Runtime "
        f"and decoding on {threads} thread(s) per replica; `@serve.batch` with the gateway's "
        'max_batch_size and wait; how it was tuned: "Ray Serve reference: tuning" above.',
        "",
    ]


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def write_benchmarks(bench: Bench, elapsed: float) -> Path:
    """Write plots and JSON under ``assets/<section>/`` and the section of BENCHMARKS.md."""
    s = bench.settings
    assets = s.assets / s.section
    assets.mkdir(parents=True, exist_ok=True)
    runs = bench.runs
    (assets / "results.json").write_text(
        json.dumps({k: _slim(v) for k, v in runs.items()}, indent=2) + "\n"
    )
    plots: list[tuple[str, Path]] = []
    if "gateway" in runs:
        plots.append(
            (
                "Gateway under closed-loop load: latency percentiles and throughput per second",
                plot_timeseries(runs["gateway"], assets / "gateway_timeseries.png"),
            )
        )
    if "capacity_steps" in runs and runs["capacity_steps"]["steps"]:
        plots.append(
            (
                "Latency against offered load (capacity search steps, open loop)",
                plot_latency_vs_load(
                    runs["capacity_steps"]["steps"],
                    assets / "latency_vs_load.png",
                    runs["capacity"]["p99_target_ms"],
                ),
            )
        )
    soak = runs.get("soak")
    if soak is not None:
        plots.append(
            ("Soak: latency and throughput", plot_timeseries(soak, assets / "soak_timeseries.png"))
        )
        if soak.get("memory"):
            plots.append(("Soak: memory", plot_memory(soak["memory"], assets / "soak_memory.png")))

    rows = headline(runs, bench.triton_compute)
    table_runs = [r for k, r in runs.items() if not _is_capacity(k)]
    header = (*SUMMARY_HEADER, "server CPU (cores)", "generator CPU (cores)")
    table = markdown_table(
        header,
        [
            [
                *summary_row(r),
                ", ".join(
                    f"{k} {v:.2f}" for k, v in r["extra"].get("server_cpu_cores", {}).items()
                ),
                r["generator"]["cores_used"],
            ]
            for r in table_runs
        ],
    )
    machine, vers = machine_info(), versions()
    base = s.output.parent
    lines = [
        f"## {s.section}: {s.flavour} repository flavour",
        "",
        f"Measured {datetime.now(UTC).isoformat(timespec='minutes')} in {elapsed / 60:.1f} min "
        f"at commit {_git_commit()}.",
        "",
        "### Headline",
        "",
        _headline_table(rows),
        "",
    ]
    misses = _misses(rows, runs)
    if misses:
        lines += [
            "Targets missed, with where the CPU went during the runs concerned (server "
            "process trees and the load generator, in cores busy on average):",
            "",
            *misses,
            "",
        ]
    lines += [
        "### Machine and versions",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores; memory {machine['memory_gib']} GiB",
        f"- GPU: {', '.join(machine['gpus']) or 'none'}",
        f"- OS: {machine['os']}; Python {machine['python']}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- Triton server {bench.triton_version}; model repository flavour {s.flavour}",
        "",
        "### Results",
        "",
        f"Two image sets, the same for every target, sent round robin: small images "
        f"({len(bench.images)} synthetic street scenes of 192-640 px) and phone photos "
        f"({len(bench.phone_images)} of those scenes at 1, 2, 5 and 12 MP, 4:3 and 16:9, "
        "EXIF orientations, JPEG quality 80-95 and some WebP; rows say 'phone photos'); "
        f"{s.processes} load generator processes; latencies from each request's "
        "scheduled send time (HdrHistogram). Closed loop unless stated. The server CPU "
        "column is the CPU each process tree used during the run (warm-up included), in "
        "cores busy on average.",
        "",
        table,
        "",
    ]
    lines += _capacity_section(runs)
    lines += _compute_section(bench.triton_compute)
    lines += _ray_section(bench)
    if soak is not None and soak.get("memory"):
        lines += [
            f"Soak: {_describe_dict(soak['load'])}; RSS of each process tree sampled from "
            "/proc (Triton with its python-backend stub processes), growth from the median "
            "of the first tenth of the measured window to the median of the last tenth.",
            "",
            memory_table(soak["memory"]),
            "",
        ]
    lines += ["### Plots", ""]
    for title, path in plots:
        lines += [f"![{title}]({_rel(path, base)})", ""]
    lines += [
        "### Commands",
        "",
        "```sh",
        s.command or "make bench",
        "# each row on its own (API key from the stack's ready file or `fashionserve keys create`):",
        *(bench.commands[k] for k in bench.commands),
        "```",
        "",
        f"Raw figures: [{_rel(assets / 'results.json', base)}]({_rel(assets / 'results.json', base)}).",
    ]
    write_section(s.output, s.section, "\n".join(lines))
    return s.output


def _describe_dict(load: dict[str, Any]) -> str:
    if load["mode"] == "closed":
        return f"closed loop of {callers(load['concurrency'])} for {load['duration']:g} s"
    return f"open loop at {load['rate']:.2f} req/s for {load['duration']:g} s"


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "histogram"}


PREAMBLE = """# Benchmarks

Measured by `make bench` (`fashionserve loadtest bench`): the gateway against Triton's
ensemble called directly, the gateway's micro-batching on and off, fashionserve against a
naive PyTorch server and against a Ray Serve reference of the same pipeline, on small
synthetic images and on phone photos (1-12 MP), capacity searches and a memory soak, all
in one run on one machine, so each claim is a ratio. `scripts/gpu_bench.sh` adds a section measured on a GPU host.
Each section below is rewritten by the run that produced it.
"""


def write_section(path: Path, section: str, body: str) -> None:
    """Put ``body`` in ``path`` between the markers of ``section``, keeping other sections."""
    begin, end = f"<!-- bench:{section} begin -->", f"<!-- bench:{section} end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.is_file() else PREAMBLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n")
