"""Benchmark of bulk tagging (issue 12): ``batch run`` against the gateway's closed loop.

Against a running stack (``fashionserve serve``, or the chart), in one command::

    python -m fashionserve.loadtest.bulk_bench --gateway HOST:PORT --api-key KEY

1. the gateway's closed-loop throughput: ``--concurrency`` callers sending the same small
   images for ``--duration`` seconds (the load generator of ``loadtest run``);
2. ``fashionserve batch run`` over a manifest of ``--lines`` lines (10k and 100k by
   default: the same images repeated under different ids), ``--concurrency`` calls in
   flight, each run in its own process.

It prints the batch run's images/s (the rate ``batch status`` reports: the committed rows
over the tagging time) as a ratio of the closed loop's (target >= 0.9x), and the batch
run's peak RSS at each manifest size (target: flat, the input is streamed). The batch run
is measured as a user runs it, through its command line, so nothing here imports the bulk
application.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fashionserve.loadtest.defaults import DEFAULT_ADDRESSES
from fashionserve.loadtest.generator import LoadSpec, run_load
from fashionserve.loadtest.images import synthetic_images
from fashionserve.loadtest.targets import TargetSpec

DEFAULT_LINES = (10_000, 100_000)
TARGET_RATIO = 0.9


@dataclass(frozen=True)
class BatchRun:
    """One measured ``batch run``."""

    lines: int
    wall_seconds: float
    images_per_second: float
    """As ``batch status`` reports it: committed rows over the tagging time."""
    peak_rss_bytes: int


def write_manifest(path: Path, images: list[Path], lines: int) -> None:
    """A CSV manifest of ``lines`` rows: the images repeated under different ids."""
    with path.open("w") as f:
        f.write("id,uri\n")
        for i in range(lines):
            f.write(f"img-{i:08d},{images[i % len(images)]}\n")


def batch_run(
    manifest: Path, lines: int, output: Path, gateway: str, api_key: str, concurrency: int
) -> BatchRun:
    """Run ``fashionserve batch run`` to completion; its peak RSS from the kernel (wait4)."""
    env = {**os.environ, "FASHIONSERVE_API_KEY": api_key}
    command = [sys.executable, "-m", "fashionserve.cli", "batch"]
    started = time.monotonic()
    process = subprocess.Popen(
        [*command, "run", "--input", str(manifest), "--output", str(output),
         "--gateway", gateway, "--concurrency", str(concurrency)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    error = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"batch run failed ({process.returncode}):\n{error}")
    shown = subprocess.run(
        [*command, "status", "--output", str(output), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rate = json.loads(shown.stdout)["images_per_second"] or 0.0
    # ru_maxrss is in KiB on Linux.
    return BatchRun(lines, wall, float(rate), usage.ru_maxrss * 1024)


def closed_loop_throughput(
    gateway: str, api_key: str, images: list[bytes], concurrency: int, duration: float
) -> float:
    """Analyze calls per second of ``concurrency`` closed-loop callers."""
    result = run_load(
        TargetSpec("gateway", gateway, api_key, include_embeddings=False),
        LoadSpec(mode="closed", concurrency=concurrency, duration=duration),
        images,
        label="gateway closed loop",
        progress=False,
    )
    return result.recorder.throughput()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fashionserve.loadtest.bulk_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--gateway", default=os.environ.get("FASHIONSERVE_GATEWAY", DEFAULT_ADDRESSES["gateway"])
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("FASHIONSERVE_API_KEY"),
        required="FASHIONSERVE_API_KEY" not in os.environ,
    )
    parser.add_argument(
        "--lines", type=int, nargs="+", default=list(DEFAULT_LINES), help="manifest sizes to run"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="callers / calls in flight")
    parser.add_argument("--duration", type=float, default=20.0, help="closed-loop seconds")
    parser.add_argument("--images", type=int, default=16, help="distinct small images")
    parser.add_argument("--workdir", type=Path, help="keep the manifests and outputs here")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    images = synthetic_images(args.images)
    paths = []
    for i, data in enumerate(images):
        path = workdir / "images" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)

    reference = closed_loop_throughput(
        args.gateway, args.api_key, images, args.concurrency, args.duration
    )
    print(f"gateway closed loop, {args.concurrency} callers: {reference:.1f} images/s")
    runs = []
    for lines in args.lines:
        manifest = workdir / f"manifest-{lines}.csv"
        write_manifest(manifest, paths, lines)
        run = batch_run(
            manifest, lines, workdir / f"out-{lines}", args.gateway, args.api_key, args.concurrency
        )
        runs.append(run)
        ratio = run.images_per_second / reference if reference else 0.0
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        print(
            f"batch run, {lines} lines: {run.images_per_second:.1f} images/s = {ratio:.2f}x the "
            f"closed loop ({verdict} >= {TARGET_RATIO}x), {run.wall_seconds:.1f} s wall, "
            f"peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB"
        )
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        print(
            f"peak RSS {first.lines} -> {last.lines} lines: "
            f"{last.peak_rss_bytes / first.peak_rss_bytes:.2f}x (target: flat)"
        )
    print(f"manifests and outputs: {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
