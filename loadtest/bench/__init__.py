"""The standard benchmark (``make bench``): every claim measured as a ratio in one run.

On the embedded default stack (``fashionserve serve``: Triton from the nvidia-pytriton
wheel with the python-ort repository, and the gateway), with the same images and the
same generator settings throughout, it measures

1. the gateway against Triton's ensemble called directly, at equal concurrency: the
   throughput ratio, and the p50 latency the gateway adds (under load, and with one
   caller, where it is pure overhead);
2. the gateway with its micro-batching off (a second gateway, same settings file,
   ``max_batch_size: 1``) against the default, with more callers than batch slots;
3. fashionserve against the naive server (the same models in PyTorch, one request at a
   time) at equal concurrency;
4. a capacity search: the highest open-loop rate meeting a p99 target, and the curve of
   latency against offered load;
5. the same closed loops (1, 8 and 32 callers) and capacity search on the phone-photo set
   (1-12 MP, EXIF orientation, JPEG and WebP), with Triton's compute time per model and
   image for each set (its statistics API), and 12 MP JPEGs alone;
6. fashionserve against the Ray Serve reference (:mod:`~fashionserve.loadtest.peers`,
   the same ONNX files and steps), checked first to answer alike, then with the same
   closed loops and capacity search (same p99 target) on both image sets;
7. a soak at half the small-image capacity, recording the gateway's and Triton's memory;

and writes ``BENCHMARKS.md`` (machine, versions, commands, results, plots, and for each
target whether it was met). The CPU used by each server process tree during each run is
recorded too: on a machine with two cores, where the CPU went is the profile that
explains a ratio.

The results go into a named section of ``BENCHMARKS.md`` (``cpu-default`` here,
``gpu-<flavour>`` from ``scripts/gpu_bench.sh``), so runs on other hosts add sections
instead of overwriting each other. An already running stack (a GPU host) is measured
with ``--gateway/--triton/--api-key`` instead of starting one.

The parts: :mod:`~fashionserve.loadtest.bench.stack` starts what is measured,
:mod:`~fashionserve.loadtest.bench.runs` measures it, :mod:`~fashionserve.loadtest.bench.report`
writes the section; :func:`run_bench` runs the three in order.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from fashionserve.loadtest.bench.report import triton_version, write_benchmarks
from fashionserve.loadtest.bench.runs import (
    Bench,
    bench_images,
    measure_all,
    phone_images,
    say,
)
from fashionserve.loadtest.bench.settings import BenchError, BenchSettings
from fashionserve.loadtest.bench.stack import Stack, start_default_stack, stop, wait_serving
from fashionserve.loadtest.generator import clock

__all__ = ["BenchSettings", "run_bench"]


def run_bench(settings: BenchSettings) -> int:
    """Run the benchmark and write BENCHMARKS.md; 0 when it completed (targets missed
    are reported in the file, not as a failure: the benchmark's job is to tell). Raises
    :class:`BenchError` when the stack could not be started."""
    if "ray" not in settings.skip and importlib.util.find_spec("ray") is None:
        # Found now, not after the other runs: the Ray Serve reference comes last.
        raise BenchError(
            "Ray Serve is not installed: `pip install -e '.[peers]'` (make bench does), "
            "or pass --skip ray"
        )
    started = clock()
    logs = Path(tempfile.mkdtemp(prefix="fashionserve-bench-"))
    stack: Stack | None = None
    try:
        if settings.gateway and settings.triton:
            stack = Stack(
                gateway=settings.gateway,
                api_key=settings.api_key,
                triton=settings.triton,
                pids=dict(settings.watch),
                gateway_config=settings.gateway_config,
                checkpoints=settings.checkpoints,
                repository=settings.repository,
            )
            wait_serving(stack.gateway, timeout=600)  # Triton may still be loading engines
        else:
            say(f"starting the default stack (fashionserve serve --workdir {settings.workdir})")
            stack = start_default_stack(settings.workdir, logs)
            say(f"stack ready in {stack.started_seconds:.0f} s: gateway {stack.gateway}")
            if settings.checkpoints is not None:
                stack.checkpoints = settings.checkpoints
            if settings.repository is not None:
                stack.repository = settings.repository
        images = bench_images(settings)
        bench = Bench(settings, stack, images, triton_version=triton_version(stack.triton))
        if "phone" not in settings.skip:
            say(f"making the phone-photo set ({settings.phone_images} photos, cached)")
            bench.phone_images, bench.phone_12mp = phone_images(settings)
        measure_all(bench, logs)
        elapsed = clock() - started
        say(f"measured in {elapsed / 60:.1f} min; writing {settings.output}")
        write_benchmarks(bench, elapsed)
    except BenchError as exc:  # the logs of what was started stay, for the reader
        raise BenchError(f"{exc} (logs in {logs})") from exc
    finally:
        if stack is not None:
            for proc in stack.processes:
                stop(proc)
    shutil.rmtree(logs, ignore_errors=True)
    return 0
