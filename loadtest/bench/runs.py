"""The measured runs: one session of load tests against the stack, each recorded with
the CPU every server process tree used meanwhile."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fashionserve.loadtest.bench.settings import BenchSettings
from fashionserve.loadtest.bench.stack import Stack, extra_gateway, naive_server
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
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)

    def measure(
        self,
        key: str,
        label: str,
        target: TargetSpec,
        load: LoadSpec,
        pids: Mapping[str, int],
        watch: Mapping[str, int] | None = None,
        watch_interval: float = 5.0,
    ) -> dict[str, Any]:
        """Run one load test, with the CPU each server process tree used meanwhile."""
        say(f"{label}: {_describe(load)}")
        before, t0 = cpu_snapshot(pids), clock()
        result = run_load(
            target,
            load,
            self.images,
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
    from fashionserve.loadtest.images import load_images, synthetic_images

    if settings.images:
        return load_images(list(settings.images), limit=16)
    return synthetic_images(16)


def measure_all(bench: Bench, logs: Path) -> None:
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

    bench.measure("gateway", f"gateway, {s.concurrency} callers", gateway, base, servers)
    if "triton" not in s.skip:
        bench.measure("triton", f"direct Triton, {s.concurrency} callers", triton, base, servers)
        bench.measure("gateway_1", "gateway, 1 caller", gateway, one, servers)
        bench.measure("triton_1", "direct Triton, 1 caller", triton, one, servers)
    if "batching" not in s.skip:
        # Batches form only while callers outnumber the gateway's batch slots: compare on
        # and off where they do, both at the same (higher) concurrency.
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
        capacity = capacity_search(bench, gateway)
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


def capacity_search(bench: Bench, gateway: TargetSpec) -> float:
    from fashionserve.loadtest.capacity import find_capacity

    s = bench.settings
    target = s.capacity_p99_ms
    if target is None:
        # Relative to the service's own latency: its p50 with one caller, times five.
        single = bench.runs.get("gateway_1") or bench.runs["gateway"]
        target = max(100.0, 5 * (single["latency_ms"]["p50"] or 20.0))
    start = bench.runs["gateway"]["throughput_rps"] or None
    say(f"capacity search: p99 <= {target:.0f} ms, from {start or 0:.1f} req/s")
    found = find_capacity(
        gateway,
        bench.images,
        target,
        start_rate=start,
        step_duration=5.0,
        warmup=1.0,
        processes=s.processes,
        max_steps=s.capacity_steps,
        progress=s.progress,
    )
    bench.runs["capacity"] = found.to_dict()
    bench.runs["capacity_steps"] = {"steps": found.steps}
    say(f"capacity: {found.best_rate:.2f} req/s at p99 <= {target:.0f} ms")
    return found.best_rate
