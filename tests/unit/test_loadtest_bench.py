"""The benchmark's verdicts and how it rewrites its section of BENCHMARKS.md."""

from __future__ import annotations

from fashionserve.loadtest.bench.report import PREAMBLE, headline, write_section


def run(throughput: float, p50: float) -> dict:
    return {"throughput_rps": throughput, "latency_ms": {"p50": p50}}


def test_headline_ratios_and_verdicts():
    runs = {
        "gateway": run(18.0, 400.0),
        "triton": run(19.0, 399.0),
        "gateway_1": run(5.0, 190.0),
        "triton_1": run(5.2, 187.0),
        "gateway_batched": run(18.0, 1500.0),
        "triton_crowd": run(24.0, 1400.0),
        "gateway_unbatched": run(12.0, 2200.0),
        "naive": run(4.0, 2000.0),
        "soak": {"memory": {"gateway": {"growth_pct": 1.5}, "triton": {"growth_pct": 7.0}}},
    }
    rows = {r["comparison"]: r for r in headline(runs)}
    ratio = rows["gateway / direct Triton throughput"]
    assert ratio["value"] == 18.0 / 19.0 and ratio["met"] is True
    crowded = rows["gateway / direct Triton throughput, more callers than batch slots"]
    assert crowded["value"] == 18.0 / 24.0 and crowded["met"] is False
    added = rows["gateway added p50 latency, 1 caller"]
    assert added["value"] == 3.0 and added["met"] is False  # over the 2 ms target
    assert rows["fashionserve / naive server throughput"]["value"] == 4.5
    assert rows["fashionserve / naive server throughput"]["met"] is True
    batching = rows["micro-batching on / off throughput"]
    assert batching["value"] == 1.5 and batching["met"] is None  # reported, no target
    # Both batching runs are at the crowded concurrency, not the default gateway run.
    assert rows["micro-batching on - off p50 latency"]["value"] == -700.0
    assert rows["gateway memory growth over the soak"]["met"] is True
    assert rows["triton memory growth over the soak"]["met"] is False


def test_headline_marks_what_was_not_measured():
    rows = {r["comparison"]: r for r in headline({"gateway": run(10.0, 100.0)})}
    assert rows["gateway / direct Triton throughput"]["value"] is None
    assert rows["gateway / direct Triton throughput"]["met"] is None


def test_sections_are_rewritten_in_place_and_others_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "cpu-default", "## cpu\nfirst run")
    write_section(path, "gpu-tensorrt", "## gpu\nnumbers")
    write_section(path, "cpu-default", "## cpu\nsecond run")
    text = path.read_text()
    assert text.startswith(PREAMBLE)
    assert "second run" in text and "first run" not in text
    assert "numbers" in text
    assert text.index("## cpu") < text.index("## gpu")  # the section kept its place
    assert text.count("<!-- bench:cpu-default begin -->") == 1
