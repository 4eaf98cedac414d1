"""Load-test reports: JSON shape, Markdown, PNG plots, SLO verdicts, memory growth."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fashionserve.errors import InvalidInput
from fashionserve.loadtest.generator import LoadSpec, RunResult
from fashionserve.loadtest.memory import MemoryWatcher, growth, process_tree
from fashionserve.loadtest.recorder import Recorder
from fashionserve.loadtest.report import (
    Slo,
    check_slo,
    markdown_summary,
    plot_latency_vs_load,
    result_to_dict,
    write_report,
)
from fashionserve.loadtest.targets import TargetSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result(rate: float | None = None, p_ms: float = 20.0, errors: int = 0) -> dict:
    rec = Recorder(measure_start=0.0)
    for i in range(300):
        done = 0.5 + i * 0.01
        rec.record(done - p_ms / 1000 * (1 + i % 10 / 10), done - p_ms / 1000, done, "OK", 1)
    for i in range(errors):
        rec.record(1.0, 1.0, 1.0 + i * 0.01, "UNAVAILABLE")
    load = (
        LoadSpec(mode="open", rate=rate, duration=3.0)
        if rate
        else LoadSpec(mode="closed", concurrency=4, duration=3.0)
    )
    result = RunResult(
        label="unit",
        target=TargetSpec("gateway", "127.0.0.1:1", api_key="dev.secret"),
        load=load,
        recorder=rec,
        started_at="2026-01-01T00:00:00+00:00",
        wall_seconds=5.0,
        generator={
            "processes": 2,
            "cpu_seconds": 0.5,
            "cores_used": 0.1,
            "machine_cores": 2,
            "busiest_process_core_fraction": 0.05,
            "send_lag_ms": {"p50": 0.1, "p99": 1.0, "max": 2.0},
        },
    )
    return result_to_dict(result)


def test_result_json_has_the_documented_keys_and_no_secret():
    data = make_result(errors=3)
    text = json.dumps(data)
    assert "secret" not in text  # the API key never lands in a report
    for key in (
        "schema",
        "target",
        "load",
        "requests",
        "error_rate",
        "errors_by_code",
        "throughput_rps",
        "latency_ms",
        "generator",
        "timeseries",
        "histogram",
    ):
        assert key in data
    assert data["requests"] == {"measured": 303, "ok": 300, "errors": 3}
    assert data["errors_by_code"] == {"UNAVAILABLE": 3}
    lat = data["latency_ms"]
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert data["throughput_rps"] > 0
    assert data["timeseries"][0]["ok"] == 50  # completions 0.5 s .. 0.99 s


def test_markdown_summary_is_a_table_of_the_figures():
    data = make_result(rate=25.0)
    text = markdown_summary(data)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    assert lines[header + 1].startswith("| ---")
    row = lines[header + 2].split("|")
    assert row[2].strip() == "gateway"
    assert row[3].strip() == "open poisson, 25 req/s"
    assert row[4].strip() == "300"
    assert f"{data['latency_ms']['p99']:.1f}" in row[9]


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
    data = make_result()
    data["memory"] = {
        "gateway": growth([(t, 100 * 2**20 + t * 2**16, 1) for t in range(10)], 0.0) | {"pid": 1}
    }
    written = write_report(data, tmp_path)
    assert json.loads(written["json"].read_text())["label"] == "unit"
    assert "| run |" in written["markdown"].read_text()
    for kind in ("timeseries", "memory"):
        assert written[kind].read_bytes()[:8] == PNG_MAGIC
        assert written[kind].stat().st_size > 5_000

    curve = plot_latency_vs_load(
        [make_result(rate=r, p_ms=10 * r) for r in (5.0, 10.0, 20.0)],
        tmp_path / "curve.png",
        p99_target_ms=150,
    )
    assert curve.read_bytes()[:8] == PNG_MAGIC


def test_slo_verdicts():
    data = make_result(errors=3)
    assert check_slo(data, Slo()) == []
    assert check_slo(data, Slo(p99_ms=10_000, max_error_rate=0.05)) == []
    misses = check_slo(data, Slo(p99_ms=0.001, max_error_rate=0.001))
    assert len(misses) == 2
    assert misses[0].startswith("p99 latency")
    assert misses[1].startswith("error rate")


def test_memory_growth_compares_the_start_and_end_of_the_measured_window():
    mib = 2**20
    # Warm-up samples (t < 0) grow fast and are ignored; then 100 -> 110 MiB.
    samples = [(-2.0, 10 * mib, 1), (-1.0, 50 * mib, 1)]
    samples += [(float(t), (100 + t) * mib, 3) for t in range(11)]
    g = growth(samples, measure_start=0.0)
    assert g["baseline_mib"] == pytest.approx(100)
    assert g["final_mib"] == pytest.approx(110)
    assert g["peak_mib"] == pytest.approx(110)
    assert g["growth_pct"] == pytest.approx(10.0)
    assert len(g["samples"]) == 13


def test_memory_watcher_counts_children_unless_watched_separately():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        assert child.pid in process_tree(me)
        alone = MemoryWatcher({"parent": me})
        both = MemoryWatcher({"parent": me, "child": child.pid})
        alone.sample(0.0)
        both.sample(0.0)
        with_child = alone.series["parent"].samples[0]
        without_child = both.series["parent"].samples[0]
        assert with_child[2] == without_child[2] + 1
        assert both.series["child"].samples[0][1] > 0
    finally:
        child.kill()
        child.wait()
    with pytest.raises(InvalidInput, match="no process"):
        MemoryWatcher({"gone": child.pid})
