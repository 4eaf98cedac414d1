"""``fashionserve loadtest ...``: run, capacity, soak, naive-server, ray-server and bench.

Exit status: 1 when an SLO is missed (so CI can gate on it), 2 when the load test could
not run (a bad flag or file, a target that never became ready); ``bench``: 1 when the
stack it measures could not be started.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fashionserve.cli.command import add_command, add_group
from fashionserve.clients import security
from fashionserve.clients.security import API_KEY_ENV
from fashionserve.loadtest.defaults import DEFAULT_ADDRESSES, TARGET_KINDS

if TYPE_CHECKING:
    from fashionserve.loadtest.targets import TargetSpec


def _watch_arg(text: str) -> tuple[str, int]:
    name, sep, pid = text.partition("=")
    if not sep or not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PID, got {text!r}")
    return name, int(pid)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--target", choices=TARGET_KINDS, default="gateway", help="what to call")
    g.add_argument(
        "--address",
        help="HOST:PORT (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_ADDRESSES.items())
        + ")",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"gateway API key <id>.<secret> (default: ${API_KEY_ENV})",
    )
    g.add_argument(
        "--no-embeddings",
        action="store_true",
        help="do not ask the gateway/naive server for embeddings (Triton always returns them)",
    )
    g.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help="image files or directories (default: rendered synthetic street scenes)",
    )
    g.add_argument("--max-images", type=int, default=32, help="images sent round robin")
    security.add_flags(p)


def _add_load_flags(p: argparse.ArgumentParser, duration: float) -> None:
    g = p.add_argument_group("load")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument(
        "--concurrency", type=_positive(int), help="closed loop: this many callers (default 8)"
    )
    shape.add_argument(
        "--rate", type=_positive(float), help="open loop: arrivals per second over all processes"
    )
    g.add_argument(
        "--arrival",
        choices=["poisson", "constant"],
        default="poisson",
        help="open loop arrival process",
    )
    length = g.add_mutually_exclusive_group()
    length.add_argument(
        "--duration",
        type=_positive(float),
        help=f"seconds measured after warm-up (default {duration:g})",
    )
    length.add_argument("--requests", type=_positive(int), help="requests measured after warm-up")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of uncounted load first")
    g.add_argument("--processes", type=_positive(int), default=2, help="generator processes")
    g.add_argument("--timeout", type=_positive(float), default=30.0, help="seconds per request")
    g.add_argument(
        "--max-in-flight",
        type=_positive(int),
        default=4096,
        help="open loop: most requests outstanding (waiting ones still count their wait)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the Poisson schedule")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="write result.json, summary.md and plots here")
    g.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_slo_flags(p: argparse.ArgumentParser, memory_growth: float | None = None) -> None:
    g = p.add_argument_group("SLO (exit status 1 when missed)")
    g.add_argument("--slo-p99-ms", type=float, help="p99 latency target in ms")
    g.add_argument("--slo-error-rate", type=float, help="highest error rate, a fraction")
    g.add_argument(
        "--slo-memory-growth",
        type=float,
        default=memory_growth,
        help="highest memory growth of a watched process tree, in %%"
        + (f" (default {memory_growth:g})" if memory_growth is not None else ""),
    )
    g.add_argument(
        "--watch",
        type=_watch_arg,
        action="append",
        default=[],
        metavar="NAME=PID",
        help="sample the RSS of this process and its children (repeatable)",
    )
    g.add_argument("--watch-interval", type=_positive(float), default=5.0, help="seconds")


def _target_spec(args: argparse.Namespace) -> TargetSpec:
    from fashionserve.loadtest.targets import TargetSpec

    return TargetSpec(
        kind=args.target,
        address=args.address or DEFAULT_ADDRESSES[args.target],
        api_key=args.api_key if args.target == "gateway" else None,
        include_embeddings=not args.no_embeddings,
        security=security.from_flags(args),
    )


def _images(args: argparse.Namespace) -> list[bytes]:
    from fashionserve.loadtest.images import load_images, synthetic_images

    if args.images:
        return load_images(args.images, limit=args.max_images)
    return synthetic_images(min(args.max_images, 16))


def _load_spec(args: argparse.Namespace, default_duration: float) -> Any:
    from fashionserve.loadtest.generator import LoadSpec

    duration = args.duration if args.duration or args.requests else default_duration
    return LoadSpec(
        mode="open" if args.rate else "closed",
        concurrency=args.concurrency or 8,
        rate=args.rate or 0.0,
        arrival=args.arrival,
        duration=duration if not args.requests else None,
        requests=args.requests,
        warmup=args.warmup,
        processes=args.processes,
        max_in_flight=args.max_in_flight,
        timeout=args.timeout,
        seed=args.seed,
    )


def _run(args: argparse.Namespace, default_duration: float = 10.0) -> int:
    from fashionserve.loadtest.generator import run_load
    from fashionserve.loadtest.report import (
        Slo,
        check_slo,
        markdown_summary,
        result_to_dict,
        write_report,
    )

    result = run_load(
        _target_spec(args),
        _load_spec(args, default_duration),
        _images(args),
        label=args.label or "",
        progress=not args.no_progress,
        watch=dict(args.watch) or None,
        watch_interval=args.watch_interval,
    )
    data = result_to_dict(result)
    slo = Slo(args.slo_p99_ms, args.slo_error_rate, args.slo_memory_growth if args.watch else None)
    misses = check_slo(data, slo)
    data["slo"] = (
        {"targets": slo.__dict__, "met": not misses, "misses": misses} if slo.active else None
    )
    if args.out:
        write_report(data, args.out)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(markdown_summary(data))
    if slo.active:
        verdict = "SLO met" if not misses else "SLO missed: " + "; ".join(misses)
        print(verdict, file=sys.stderr if misses else sys.stdout)
    return 1 if misses else 0


def _soak(args: argparse.Namespace) -> int:
    from fashionserve.loadtest.generator import LoadTestError

    if not args.watch:
        raise LoadTestError("a soak needs at least one --watch NAME=PID")
    return _run(args, default_duration=600.0)


def _capacity(args: argparse.Namespace) -> int:
    from fashionserve.loadtest.capacity import find_capacity
    from fashionserve.loadtest.report import markdown_table, plot_latency_vs_load

    def on_step(step: dict[str, Any]) -> None:
        lat = step["latency_ms"]
        print(
            f"offered {step['offered_rps']:8.2f} req/s: achieved {step['throughput_rps']:8.2f}"
            f", p99 {lat['p99'] if lat['p99'] is not None else float('nan'):9.2f} ms, errors "
            f"{100 * step['error_rate']:.2f}% -> {'meets' if step['extra']['meets'] else 'misses'}",
            flush=True,
        )

    found = find_capacity(
        _target_spec(args),
        _images(args),
        args.p99_ms,
        max_error_rate=args.max_error_rate,
        start_rate=args.start_rate,
        step_duration=args.step_duration,
        warmup=args.warmup,
        processes=args.processes,
        max_steps=args.max_steps,
        tolerance=args.tolerance,
        arrival=args.arrival,
        progress=not args.no_progress,
        on_step=on_step,
    )
    data = found.to_dict()
    rows = [
        [
            s["offered_rps"],
            s["throughput_rps"],
            s["latency_ms"]["p50"],
            s["latency_ms"]["p99"],
            100 * s["error_rate"],
            "yes" if s["extra"]["meets"] else "no",
        ]
        for s in sorted(found.steps, key=lambda s: s["offered_rps"])
    ]
    table = markdown_table(
        ("offered (req/s)", "achieved (req/s)", "p50 (ms)", "p99 (ms)", "errors %", "meets"), rows
    )
    print(table)
    print(
        f"\ncapacity at p99 <= {args.p99_ms:g} ms: {found.best_rate:.2f} req/s"
        + (" (no step met the target)" if found.best is None else "")
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "capacity.json").write_text(json.dumps(data, indent=2) + "\n")
        (args.out / "capacity.md").write_text(table + "\n")
        plot_latency_vs_load(found.steps, args.out / "latency_vs_load.png", args.p99_ms)
    return 0 if found.best is not None else 1


def _naive_server(args: argparse.Namespace) -> int:
    from fashionserve.loadtest.naive_server import serve_naive

    return serve_naive(
        args.checkpoints,
        address=args.listen_address,
        ready_file=args.ready_file,
        min_score=args.min_score,
        max_garments=args.max_garments,
        device=args.device,
    )


def _ray_server(args: argparse.Namespace) -> int:
    from fashionserve.loadtest.peers.ray_serve import RayServeSettings, serve_ray

    settings = RayServeSettings(
        repository=args.repository,
        port=args.port,
        cores=args.cores,
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.max_queue_delay_microseconds / 1e6,
    )
    return serve_ray(settings, ready_file=args.ready_file)


def _bench(args: argparse.Namespace) -> int:
    from fashionserve.loadtest.bench import BenchSettings, run_bench

    settings = BenchSettings(
        output=args.output,
        assets=args.assets,
        section=args.section,
        workdir=args.workdir,
        duration=args.duration,
        warmup=args.warmup,
        stack_warmup=args.stack_warmup,
        concurrency=args.concurrency,
        batching_concurrency=args.batching_concurrency,
        processes=args.processes,
        soak_duration=args.soak_duration,
        capacity_p99_ms=args.capacity_p99_ms,
        capacity_steps=args.capacity_steps,
        flavour=args.flavour,
        skip=tuple(args.skip),
        gateway=args.gateway,
        api_key=args.api_key,
        triton=args.triton,
        gateway_config=args.gateway_config,
        checkpoints=args.checkpoints,
        watch=tuple(args.watch),
        images=tuple(args.images or ()),
        phone_images=args.phone_images,
        repository=args.repository,
        ray_cores=args.ray_cores,
        ray_replicas=args.ray_replicas,
        progress=not args.no_progress,
        command=shlex.join(["fashionserve", *sys.argv[1:]]) if sys.argv[1:] else "",
    )
    return run_bench(settings)


def add_commands(subparsers: Any) -> None:
    """Add ``loadtest`` and its subcommands to the ``fashionserve`` command line."""
    sub = add_group(
        subparsers,
        "loadtest",
        "load tests, capacity search, soak, the naive reference server, benchmarks",
        description="Load tests of the gateway, Triton's ensemble or the naive server.",
    )

    def command(
        name: str, handler: Any, help: str, error_status: int = 2
    ) -> argparse.ArgumentParser:
        return add_command(sub, name, handler, help, error_status=error_status)

    p = command("run", _run, "one load test (closed loop by default, open loop with --rate)")
    _add_target_flags(p)
    _add_load_flags(p, duration=10.0)
    _add_slo_flags(p)
    _add_output_flags(p)
    p.add_argument("--label", help="name of the run in reports")

    p = command("soak", _soak, "a long run recording the memory of the watched processes")
    _add_target_flags(p)
    _add_load_flags(p, duration=600.0)
    _add_slo_flags(p, memory_growth=5.0)
    _add_output_flags(p)
    p.add_argument("--label", default="soak", help="name of the run in reports")

    p = command("capacity", _capacity, "the highest open-loop rate meeting a p99 target")
    _add_target_flags(p)
    p.add_argument("--p99-ms", type=_positive(float), required=True, help="p99 target in ms")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="fraction (default 0.01)")
    p.add_argument("--start-rate", type=_positive(float), help="first step (default: probed)")
    p.add_argument("--step-duration", type=_positive(float), default=5.0, help="seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per step, not counted")
    p.add_argument("--processes", type=_positive(int), default=2, help="generator processes")
    p.add_argument("--max-steps", type=_positive(int), default=10)
    p.add_argument("--tolerance", type=_positive(float), default=0.1, help="relative bracket")
    p.add_argument("--arrival", choices=["poisson", "constant"], default="poisson")
    p.add_argument("--out", type=Path, help="write capacity.json, capacity.md and a plot here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "naive-server", _naive_server, "serve the naive reference (PyTorch, one request at a time)"
    )
    p.add_argument("--checkpoints", type=Path, required=True, help="directory of the three .pt")
    p.add_argument("--listen-address", default=DEFAULT_ADDRESSES["naive"], help="HOST:PORT")
    p.add_argument("--ready-file", type=Path, help="write HOST:PORT here once serving")
    p.add_argument("--min-score", type=float, default=0.3, help="detector score floor")
    p.add_argument("--max-garments", type=int, default=16, help="garments kept per image")
    p.add_argument(
        "--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda"
    )

    p = command(
        "ray-server",
        _ray_server,
        "serve the Ray Serve reference (needs the `peers` extra: pip install '.[peers]')",
    )
    p.add_argument(
        "--repository", type=Path, required=True, help="the built model repository to serve"
    )
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free one)")
    p.add_argument("--ready-file", type=Path, help="write HOST:PORT here once answering")
    p.add_argument("--cores", type=_positive(int), default=2, help="CPUs of the Ray cluster")
    p.add_argument("--replicas", type=_positive(int), default=4, help="replicas sharing them")
    p.add_argument(
        "--max-batch-size", type=_positive(int), default=8, help="@serve.batch's (the gateway's)"
    )
    p.add_argument(
        "--max-queue-delay-microseconds",
        type=int,
        default=0,
        help="@serve.batch's wait (the gateway's)",
    )

    p = command(
        "bench", _bench, "the standard benchmark: writes a section of BENCHMARKS.md", error_status=1
    )
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--assets", type=Path, default=Path("benchmarks"), help="plots and JSON")
    p.add_argument("--section", default="cpu-default", help="section of the output to rewrite")
    p.add_argument(
        "--workdir", type=Path, default=Path("var"), help="`fashionserve serve` work directory"
    )
    p.add_argument("--duration", type=_positive(float), default=30.0, help="seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds per run, not counted")
    p.add_argument(
        "--stack-warmup", type=float, default=10.0, help="seconds of unmeasured load first"
    )
    p.add_argument("--concurrency", type=_positive(int), default=8, help="callers per run")
    p.add_argument(
        "--batching-concurrency",
        type=_positive(int),
        default=32,
        help="callers of the micro-batching on/off runs (more than the gateway's batch slots)",
    )
    p.add_argument("--processes", type=_positive(int), default=2, help="generator processes")
    p.add_argument("--soak-duration", type=float, default=600.0, help="seconds (0: no soak)")
    p.add_argument(
        "--capacity-p99-ms",
        type=_positive(float),
        help="p99 target of the capacity search (default: 5x the 1-caller p50, >= 100 ms)",
    )
    p.add_argument("--capacity-steps", type=_positive(int), default=8, help="open-loop steps")
    p.add_argument("--flavour", default="python-ort", help="repository flavour measured")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["triton", "naive", "batching", "capacity", "soak", "phone", "ray"],
        help="parts to leave out",
    )
    p.add_argument(
        "--images", type=Path, nargs="+", help="small-image set (default: synthetic scenes)"
    )
    p.add_argument(
        "--phone-images", type=_positive(int), default=16, help="photos in the phone-photo set"
    )
    p.add_argument(
        "--ray-cores", type=_positive(int), default=2, help="CPUs of the Ray Serve reference"
    )
    p.add_argument(
        "--ray-replicas", type=_positive(int), default=4, help="its replicas sharing them"
    )
    ext = p.add_argument_group("an already running stack (default: start `fashionserve serve`)")
    ext.add_argument("--gateway", metavar="HOST:PORT", help="the gateway to measure")
    ext.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"default ${API_KEY_ENV}"
    )
    ext.add_argument("--triton", metavar="HOST:PORT", help="Triton's gRPC address")
    ext.add_argument(
        "--gateway-config", type=Path, help="the gateway's YAML (for the batching-off gateway)"
    )
    ext.add_argument("--checkpoints", type=Path, help="checkpoints for the naive server")
    ext.add_argument(
        "--repository", type=Path, help="the model repository, for the Ray Serve reference"
    )
    ext.add_argument(
        "--watch",
        type=_watch_arg,
        action="append",
        default=[],
        metavar="NAME=PID",
        help="server processes to profile and soak (e.g. gateway=PID triton=PID)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
