"""The search benchmark runs and reports what BENCHMARKS.md needs (at a tiny size)."""

from __future__ import annotations

from fashionserve.loadtest import search_bench


def test_the_benchmark_reports_every_figure() -> None:
    result = search_bench.run([3000], dim=16, n_queries=30, k=10, seed=0)
    (row,) = result["rows"]
    for kind in ("exact", "hnsw"):
        figures = row[kind]
        assert figures["p50_ms"] <= figures["p99_ms"]
        assert figures["queries_per_second"] > 0 and figures["memory_mib"] > 0
        assert figures["build_seconds"] >= 0
    assert 0.0 <= row["recall_at_10"] <= 1.0
    assert row["hnsw_to_exact_qps"] > 0
