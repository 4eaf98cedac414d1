"""The measured runs: one session of load tests against the stack, each recorded with
the CPU every server process tree used meanwhile."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fashionserve.loadtest.bench import triton_stats
from fashionserve.loadtest.bench.settings import BenchError, BenchSettings
from fashionserve.loadtest.bench.stack import Stack, extra_gateway, naive_server, ray_server
from fashionserve.loadtest.generator import LoadSpec, clock, run_load
from fashionserve.loadtest.memory import cpu_snapshot
from fashionserve.loadtest.report import callers, result_to_dict
from fashionserve.loadtest.targets import TargetSpec


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    """One benchmark session: settings, the stack, the images and what was measured."""

    settings: BenchSettings
    stack: Stack
    images: list[bytes]
    triton_version: str = "unknown"
    phone_images: list[bytes] = field(default_factory=list)
    phone_12mp: list[bytes] = field(default_factory=list)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    triton_compute: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per image set: Triton's compute time per model and image (:mod:`triton_stats`)."""

    def measure(
        self,
        key: str,
        label: str,
        target: TargetSpec,
        load: LoadSpec,
        pids: Mapping[str, int],
        watch: Mapping[str, int] | None = None,
        watch_interval: float = 5.0,
        images: list[bytes] | None = None,
    ) -> dict[str, Any]:
        """Run one load test (of ``images``, default the small-image set), with the CPU
        each server process tree used meanwhile."""
        say(f"{label}: {_describe(load)}")
        before, t0 = cpu_snapshot(pids), clock()
        result = run_load(
            target,
            load,
            self.images if images is None else images,
            label=label,
            progress=self.settings.progress,
            watch=watch,
            watch_interval=watch_interval,
        )
        wall = clock() - t0
        after = cpu_snapshot(pids)
        data = result_to_dict(result)
        data["extra"]["server_cpu_cores"] = {
            name: round((after[name] - before[name]) / wall, 3) for name in pids
        }
        lat = data["latency_ms"]
        say(
            f"{label}: {data['throughput_rps']:.2f} req/s, p50 {_ms(lat['p50'])}, p99 "
            f"{_ms(lat['p99'])}, errors {data['requests']['errors']}"
        )
        self.runs[key] = data
        self.commands[key] = _equivalent_command(target, load)
        return data


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _describe(load: LoadSpec) -> str:
    shape = (
        f"closed loop, {callers(load.concurrency)}"
        if load.mode == "closed"
        else f"open loop, {load.rate:.2f} req/s ({load.arrival})"
    )
    return f"{shape}, {load.duration:g} s after {load.warmup:g} s warm-up"


def _equivalent_command(target: TargetSpec, load: LoadSpec) -> str:
    args = ["fashionserve", "loadtest", "run", "--target", target.kind, "--address", target.address]
    if target.api_key:
        args += ["--api-key", "$FASHIONSERVE_API_KEY"]
    if load.mode == "closed":
        args += ["--concurrency", str(load.concurrency)]
    else:
        args += ["--rate", f"{load.rate:.2f}", "--arrival", load.arrival]
    args += [
        "--duration",
        f"{load.duration:g}",
        "--warmup",
        f"{load.warmup:g}",
        "--processes",
        str(load.processes),
    ]
    return " ".join(args)


def bench_images(settings: BenchSettings) -> list[bytes]:
    """The small-image set: the files given, else 16 synthetic street scenes."""
    from fashionserve.loadtest.images import load_images, synthetic_images

    if settings.images:
        return load_images(list(settings.images), limit=16)
    return synthetic_images(16)


def phone_images(settings: BenchSettings) -> tuple[list[bytes], list[bytes]]:
    """The phone-photo set, and those of its photos that are 12 MP JPEGs."""
    from fashionserve.loadtest.images import phone_photo_formats, phone_photos

    photos = phone_photos(settings.phone_images)
    formats = phone_photo_formats(settings.phone_images)
    twelve = [
        photo
        for photo, fmt in zip(photos, formats, strict=True)
        if fmt.codec == "JPEG" and fmt.megapixels >= 11
    ]
    return photos, twelve


def _shapes(s: BenchSettings, base: LoadSpec) -> list[tuple[str, LoadSpec]]:
    """The closed loops every stack is measured with, and their key suffixes: one caller,
    ``concurrency`` (8) and ``batching_concurrency`` (32) callers."""
    return [
        ("_1", replace(base, concurrency=1, duration=max(5.0, s.duration / 2))),
        ("", base),
        ("_batched", replace(base, concurrency=s.batching_concurrency)),
    ]


class _Compute:
    """Triton's compute time per model and image over the runs inside the ``with``."""

    def __init__(self, bench: Bench, key: str) -> None:
        self.bench, self.key = bench, key

    def __enter__(self) -> None:
        self.before = _triton_snapshot(self.bench)

    def __exit__(self, *exc: object) -> None:
        after = _triton_snapshot(self.bench)
        if self.before is not None and after is not None:
            self.bench.triton_compute[self.key] = triton_stats.per_image(self.before, after)


def _triton_snapshot(bench: Bench) -> dict[str, dict[str, int]] | None:
    try:
        return triton_stats.snapshot(bench.stack.triton)
    except Exception as exc:  # the load figures still stand without this detail
        say(f"Triton's statistics unavailable: {exc}")
        return None


def measure_all(bench: Bench, logs: Path) -> None:
    """Every run of the benchmark, fashionserve first, then the peers, then the soak."""
    s, stack = bench.settings, bench.stack
    base = LoadSpec(
        mode="closed",
        concurrency=s.concurrency,
        duration=s.duration,
        warmup=s.warmup,
        processes=s.processes,
    )
    one = replace(base, concurrency=1, duration=max(5.0, s.duration / 2))
    gateway = TargetSpec("gateway", stack.gateway, api_key=stack.api_key)
    triton = TargetSpec("triton", stack.triton)
    servers = stack.pids

    # The first requests after a start are slow (ONNX Runtime sessions, allocators, gRPC
    # channels): warm both paths once, unrecorded, so the first measured run is not
    # penalised for going first.
    say(f"warming the stack up for {s.stack_warmup:g} s (not measured)")
    warm = replace(base, duration=max(1.0, s.stack_warmup / 2), warmup=0.0)
    run_load(gateway, warm, bench.images, label="warm-up", progress=s.progress)
    if "triton" not in s.skip:
        run_load(triton, warm, bench.images, label="warm-up", progress=s.progress)

    with _Compute(bench, "small"):
        bench.measure("gateway", f"gateway, {s.concurrency} callers", gateway, base, servers)
        if "triton" not in s.skip:
            bench.measure(
                "triton", f"direct Triton, {s.concurrency} callers", triton, base, servers
            )
        bench.measure("gateway_1", "gateway, 1 caller", gateway, one, servers)
        if "triton" not in s.skip:
            bench.measure("triton_1", "direct Triton, 1 caller", triton, one, servers)
        # 32 callers for every stack (the peers' comparison) and, where callers outnumber
        # the gateway's batch slots, micro-batching on against off.
        crowd = replace(base, concurrency=s.batching_concurrency)
        bench.measure(
            "gateway_batched", f"gateway, {crowd.concurrency} callers", gateway, crowd, servers
        )
        if "triton" not in s.skip:
            bench.measure(
                "triton_crowd",
                f"direct Triton, {crowd.concurrency} callers",
                triton,
                crowd,
                servers,
            )
        if "batching" not in s.skip:
            with extra_gateway(stack, logs, max_batch_size=1) as (address, pid):
                bench.measure(
                    "gateway_unbatched",
                    f"gateway, micro-batching off, {crowd.concurrency} callers",
                    replace(gateway, address=address),
                    crowd,
                    {**servers, "gateway": pid},
                )
    if "naive" not in s.skip:
        if stack.checkpoints is None:
            say("no checkpoints known: skipping the naive server (pass --checkpoints)")
        else:
            with naive_server(stack.checkpoints, logs) as (address, pid):
                bench.measure(
                    "naive",
                    f"naive server, {s.concurrency} callers",
                    TargetSpec("naive", address),
                    base,
                    {**servers, "naive": pid},
                )
    capacity = 0.0
    if "capacity" not in s.skip:
        capacity = capacity_search(bench, gateway, "capacity", bench.images, "gateway")
    if bench.phone_images:
        _measure_phone(bench, gateway, base, servers)
    if "ray" not in s.skip:
        _measure_ray(bench, gateway, base, servers, logs)
    if "soak" not in s.skip and s.soak_duration > 0:
        warmup = min(30.0, max(s.warmup, 0.05 * s.soak_duration))
        soak = (
            LoadSpec(mode="open", rate=capacity / 2, duration=s.soak_duration, warmup=warmup)
            if capacity > 0
            else LoadSpec(mode="closed", concurrency=2, duration=s.soak_duration, warmup=warmup)
        )
        soak = replace(soak, processes=s.processes)
        bench.measure(
            "soak",
            "soak",
            gateway,
            soak,
            servers,
            watch=servers or None,
            watch_interval=max(1.0, min(5.0, s.soak_duration / 60)),
        )


def _measure_phone(
    bench: Bench, gateway: TargetSpec, base: LoadSpec, servers: Mapping[str, int]
) -> None:
    """fashionserve on the phone-photo set: the three shapes, 12 MP JPEGs alone (Triton's
    preprocess time per such photo), and the capacity search."""
    s = bench.settings
    photos = bench.phone_images
    warm = replace(base, duration=max(1.0, s.stack_warmup / 2), warmup=0.0)
    run_load(gateway, warm, photos, label="warm-up", progress=s.progress)
    with _Compute(bench, "phone"):
        for suffix, load in _shapes(s, base):
            bench.measure(
                f"phone_gateway{suffix}",
                f"gateway, phone photos, {callers(load.concurrency)}",
                gateway,
                load,
                servers,
                images=photos,
            )
    if bench.phone_12mp:
        with _Compute(bench, "phone_12mp"):
            bench.measure(
                "phone_12mp_1",
                "gateway, 12 MP JPEGs, 1 caller",
                gateway,
                replace(base, concurrency=1, duration=max(5.0, s.duration / 3)),
                servers,
                images=bench.phone_12mp,
            )
    if "capacity" not in s.skip:
        capacity_search(bench, gateway, "phone_capacity", photos, "phone_gateway")


def _measure_ray(
    bench: Bench,
    gateway: TargetSpec,
    base: LoadSpec,
    servers: Mapping[str, int],
    logs: Path,
) -> None:
    """The Ray Serve reference on both image sets, same shapes and p99 targets as
    fashionserve, once it has answered like fashionserve."""
    s = bench.settings
    say(f"starting the Ray Serve reference ({s.ray_replicas} replicas on {s.ray_cores} cores)")
    with ray_server(bench.stack, logs, s.ray_cores, s.ray_replicas) as (address, pid):
        ray = TargetSpec("ray", address)
        pids = {**servers, "ray": pid}
        sets = [("", bench.images)] + (
            [("phone_", bench.phone_images)] if bench.phone_images else []
        )
        for _, images in sets:
            check_equal_work(gateway, ray, images[:4])
        say("Ray Serve answers like fashionserve; warming it up (not measured)")
        for _, images in sets:
            warm = replace(base, duration=max(1.0, s.stack_warmup / 2), warmup=0.0)
            run_load(ray, warm, images, label="warm-up", progress=s.progress)
        for prefix, images in sets:
            what = "phone photos, " if prefix else ""
            for suffix, load in _shapes(s, base):
                bench.measure(
                    f"{prefix}ray{suffix}",
                    f"Ray Serve, {what}{callers(load.concurrency)}",
                    ray,
                    load,
                    pids,
                    images=images,
                )
            if "capacity" not in s.skip:
                reference = bench.runs.get(f"{prefix}capacity")
                capacity_search(
                    bench,
                    ray,
                    f"{prefix}ray_capacity",
                    images,
                    f"{prefix}ray",
                    p99_ms=reference["p99_target_ms"] if reference else None,
                )


def check_equal_work(gateway: TargetSpec, peer: TargetSpec, images: list[bytes]) -> None:
    """Raise :class:`BenchError` unless ``peer`` finds the same garments with the same top
    categories as the gateway in each of ``images``: a ratio compares equal work only."""
    import grpc

    from fashionserve.loadtest.peers.pipeline import same_answers
    from fashionserve.loadtest.targets import API_KEY_HEADER, MAX_MESSAGE_BYTES
    from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
    from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

    limits = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]

    def answers(target: TargetSpec) -> list[pb.ImageResult]:
        metadata = ((API_KEY_HEADER, target.api_key),) if target.api_key else ()
        with grpc.insecure_channel(target.address, options=limits) as channel:
            stub = pb_grpc.FashionAnalysisServiceStub(channel)
            return [
                stub.Analyze(
                    pb.AnalyzeRequest(image=pb.Image(data=data)), metadata=metadata, timeout=60
                ).result
                for data in images
            ]

    for i, (ours, theirs) in enumerate(zip(answers(gateway), answers(peer), strict=True)):
        why = same_answers(ours, theirs)
        if why is not None:
            raise BenchError(f"{peer.kind} does not answer like fashionserve on image {i}: {why}")


def capacity_search(
    bench: Bench,
    target: TargetSpec,
    key: str,
    images: list[bytes],
    runs_of: str,
    p99_ms: float | None = None,
) -> float:
    """The capacity search of ``target`` on ``images``, stored under ``key`` (its steps
    under ``<key>_steps``). The p99 target is ``p99_ms``, else ``--capacity-p99-ms``, else
    five times the one-caller p50 of the runs keyed ``runs_of`` (at least 100 ms); the
    search starts at those runs' throughput with ``concurrency`` callers."""
    from fashionserve.loadtest.capacity import find_capacity

    s = bench.settings
    target_ms = p99_ms or s.capacity_p99_ms
    if target_ms is None:
        single = bench.runs.get(f"{runs_of}_1") or bench.runs[runs_of]
        target_ms = max(100.0, 5 * (single["latency_ms"]["p50"] or 20.0))
    start = bench.runs[runs_of]["throughput_rps"] or None
    say(f"capacity search ({key}): p99 <= {target_ms:.0f} ms, from {start or 0:.1f} req/s")
    found = find_capacity(
        target,
        images,
        target_ms,
        start_rate=start,
        step_duration=5.0,
        warmup=1.0,
        processes=s.processes,
        max_steps=s.capacity_steps,
        progress=s.progress,
    )
    bench.runs[key] = found.to_dict()
    bench.runs[f"{key}_steps"] = {"steps": found.steps}
    say(f"capacity ({key}): {found.best_rate:.2f} req/s at p99 <= {target_ms:.0f} ms")
    return found.best_rate
