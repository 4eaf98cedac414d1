"""Search index benchmark: the approximate index against exact search, in one run.

    python -m fashionserve.loadtest.search_bench [--sizes 100000,1000000] [--dim 128]

For each size, ``size`` random-but-clustered unit vectors of the served dimension (the demo
embedder's 128 by default): ``size / 100`` cluster centres, each vector a centre plus noise,
as garments of one product and of similar products lie near each other. Both indexes the
gateway may serve are built from them (:func:`fashionserve.search_index.build_index`): the
exact ``flat`` one and the ``hnsw`` graph with the served parameters. Queries are new
vectors from the same clusters, searched one at a time on one thread, as SearchSimilar does
(:func:`fashionserve.search_index.search_one_thread_each`).

Printed per size and index: build time, memory (the index's serialised size), search
latency p50/p99 and queries/s; then recall@10 of HNSW against exact search (target
>= 0.95) and the ratio of HNSW to exact queries/s, both measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from fashionserve.search_index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    build_index,
    memory_bytes,
    search_one_thread_each,
)

RECALL_TARGET = 0.95
DEMO_DIMENSION = 128  # the demo embedder's (checkpoints/embedder.pt)


@dataclass
class Figures:
    """One index at one size."""

    size: int
    kind: str
    build_seconds: float
    memory_mib: float
    p50_ms: float
    p99_ms: float
    queries_per_second: float


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """``n`` unit vectors, each a random centre of ``centres`` plus noise."""
    picks = rng.integers(0, len(centres), n)
    noise = rng.normal(scale=0.35 / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    vectors = centres[picks] + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def timed_queries(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    """Search each query alone; return the ids found and each search's seconds."""
    ids = np.empty((len(queries), k), np.int64)
    seconds = []
    for i, query in enumerate(queries):
        t0 = time.perf_counter()
        _, found = index.search(query[None], k)
        seconds.append(time.perf_counter() - t0)
        ids[i] = found[0]
    return ids, seconds


def measure(
    size: int, kind: str, vectors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[Figures, np.ndarray]:
    t0 = time.perf_counter()
    index, _, _ = build_index(vectors, "flat" if kind == "flat" else "hnsw")
    build = time.perf_counter() - t0
    index.search(queries[:10], k)  # warm-up
    threads = faiss.omp_get_max_threads()
    search_one_thread_each()  # as the gateway searches
    try:
        ids, seconds = timed_queries(index, queries, k)
    finally:
        faiss.omp_set_num_threads(threads)  # builds use every core
    ms = np.array(seconds) * 1000
    figures = Figures(
        size=size,
        kind=kind,
        build_seconds=round(build, 2),
        memory_mib=round(memory_bytes(index) / 2**20, 1),
        p50_ms=round(float(np.percentile(ms, 50)), 3),
        p99_ms=round(float(np.percentile(ms, 99)), 3),
        queries_per_second=round(len(seconds) / sum(seconds), 1),
    )
    return figures, ids


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """The share of the exact top-k the approximate top-k holds."""
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size


def run(sizes: list[int], dim: int, n_queries: int, k: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        centres = rng.normal(size=(max(1, size // 100), dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        vectors = clustered(size, dim, rng, centres)
        queries = clustered(n_queries, dim, rng, centres)
        exact, exact_ids = measure(size, "flat", vectors, queries, k)
        approx, approx_ids = measure(size, "hnsw", vectors, queries, k)
        recall = recall_at(approx_ids, exact_ids)
        ratio = approx.queries_per_second / exact.queries_per_second
        rows.append(
            {
                "size": size,
                "exact": asdict(exact),
                "hnsw": asdict(approx),
                "recall_at_10": round(recall, 4),
                "recall_target_met": recall >= RECALL_TARGET,
                "hnsw_to_exact_qps": round(ratio, 1),
            }
        )
        print(format_row(rows[-1], k), flush=True)
    return {
        "dimension": dim,
        "queries": n_queries,
        "k": k,
        "seed": seed,
        "hnsw": {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH},
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def format_row(row: dict[str, Any], k: int) -> str:
    lines = [f"{row['size']:,} vectors"]
    for kind in ("exact", "hnsw"):
        f = row[kind]
        lines.append(
            f"  {kind:<5} build {f['build_seconds']:>7.2f}s  memory {f['memory_mib']:>8.1f} MiB  "
            f"p50 {f['p50_ms']:>8.3f} ms  p99 {f['p99_ms']:>8.3f} ms  "
            f"{f['queries_per_second']:>9.1f} queries/s"
        )
    met = "met" if row["recall_target_met"] else "MISSED"
    lines.append(
        f"  recall@{k} hnsw vs exact {row['recall_at_10']:.4f} (target {RECALL_TARGET}: {met}); "
        f"hnsw/exact queries/s {row['hnsw_to_exact_qps']:.1f}x"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fashionserve.loadtest.search_bench")
    parser.add_argument(
        "--sizes",
        default="100000,1000000",
        help="catalog sizes, comma-separated (default 100000,1000000)",
    )
    parser.add_argument("--dim", type=int, default=DEMO_DIMENSION, help="vector dimension")
    parser.add_argument("--queries", type=int, default=500, help="queries per index")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    result = run(sizes, args.dim, args.queries, args.k, args.seed)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(r["recall_target_met"] for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
