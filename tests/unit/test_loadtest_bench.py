"""The benchmark's verdicts and how it rewrites its section of BENCHMARKS.md."""

from __future__ import annotations

from fashionserve.loadtest.bench import triton_stats
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


def capacity(rps: float, p99_target: float = 200.0) -> dict:
    return {"capacity_rps": rps, "p99_target_ms": p99_target}


def test_issue_16_ratios_against_ray_serve_and_across_image_sets():
    runs = {
        "gateway": run(60.0, 100.0),
        "ray": run(30.0, 200.0),
        "phone_gateway": run(30.0, 250.0),
        "phone_ray": run(25.0, 300.0),
        "capacity": capacity(40.0),
        "ray_capacity": capacity(20.0),
        "phone_capacity": capacity(20.0, 900.0),
        "phone_ray_capacity": capacity(16.0, 900.0),
    }
    compute = {"phone_12mp": {"images": 10, "models": {"preprocess": {"total": 35.0}}}}
    rows = {r["comparison"]: r for r in headline(runs, compute)}
    assert rows["fashionserve / Ray Serve throughput, 8 callers, small images"]["value"] == 2.0
    assert rows["fashionserve / Ray Serve throughput, 8 callers, small images"]["met"] is True
    phone = rows["fashionserve / Ray Serve throughput, 8 callers, phone photos"]
    assert phone["value"] == 1.2 and phone["met"] is False
    # Capacity at the same p99 target for both stacks, the target named in the row.
    cap = rows["fashionserve / Ray Serve capacity at p99 <= 200 ms, small images"]
    assert cap["value"] == 2.0 and cap["met"] is True
    cap = rows["fashionserve / Ray Serve capacity at p99 <= 900 ms, phone photos"]
    assert cap["value"] == 1.25 and cap["met"] is False
    across = rows["throughput, phone photos / small images (gateway, 8 callers)"]
    assert across["value"] == 0.5 and across["met"] is False
    preprocess = rows["preprocess compute per 12 MP JPEG (Triton statistics)"]
    assert preprocess["value"] == 35.0 and preprocess["met"] is True


def test_issue_16_rows_say_not_measured_without_the_peer_or_the_phone_set():
    rows = {r["comparison"]: r for r in headline({"gateway": run(10.0, 100.0)})}
    for name in (
        "fashionserve / Ray Serve throughput, 8 callers, small images",
        "fashionserve / Ray Serve capacity, phone photos",
        "preprocess compute per 12 MP JPEG (Triton statistics)",
    ):
        assert rows[name]["value"] is None and rows[name]["met"] is None


def model_stats(name: str, count: int, batches: list[tuple[int, int, int]]) -> dict:
    """Triton's statistics JSON for one model: uint64 fields are strings."""
    return {
        "name": name,
        "version": "1",
        "inference_count": str(count),
        "batch_stats": [
            {
                "batch_size": str(i + 1),
                "compute_input": {"count": "1", "ns": str(a)},
                "compute_infer": {"count": "1", "ns": str(b)},
                "compute_output": {"count": "1", "ns": str(c)},
            }
            for i, (a, b, c) in enumerate(batches)
        ],
    }


def test_triton_compute_per_image_comes_from_batch_stats_over_the_detector_images():
    before = triton_stats.parse(
        {
            "model_stats": [
                model_stats("preprocess", 2, [(1_000_000, 10_000_000, 1_000_000)]),
                model_stats("detector", 10, [(0, 20_000_000, 0)]),
                model_stats("fashion_pipeline", 10, []),
            ]
        }
    )
    after = triton_stats.parse(
        {
            "model_stats": [
                # 20 more images, in executions of several images each.
                model_stats("preprocess", 5, [(3_000_000, 50_000_000, 3_000_000)]),
                model_stats("detector", 30, [(0, 20_000_000, 0), (0, 40_000_000, 0)]),
                model_stats("fashion_pipeline", 30, []),
            ]
        }
    )
    figures = triton_stats.per_image(before, after)
    assert figures["images"] == 20
    assert figures["models"]["preprocess"] == {
        "compute_input": 0.1,
        "compute_infer": 2.0,
        "compute_output": 0.1,
        "total": 2.2,
    }
    assert figures["models"]["detector"]["total"] == 2.0
    assert "fashion_pipeline" not in figures["models"]  # the ensemble computes nothing
    assert triton_stats.per_image(after, after) == {"images": 0, "models": {}}
