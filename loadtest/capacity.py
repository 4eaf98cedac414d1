"""Capacity search: the highest open-loop arrival rate that still meets a p99 target.

Short open-loop steps, first bracketing (doubling or halving from a start rate until one
step meets the target and another misses it), then bisection between the two. A step
meets the target when its p99 (from scheduled send time) and error rate are within
target and it kept up with the offered rate. A per-request timeout of a few times the
target keeps an overloaded step from draining a long backlog.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fashionserve.loadtest.generator import LoadSpec, RunResult, run_load
from fashionserve.loadtest.report import Slo, check_slo, result_to_dict
from fashionserve.loadtest.targets import TargetSpec

KEEP_UP = 0.9
"""A step must achieve at least this fraction of the offered rate: over a short step a
server that falls behind may not yet show it in p99."""


@dataclass
class CapacityResult:
    """The best rate found (0 when even the lowest step missed) and every step run."""

    p99_target_ms: float
    max_error_rate: float
    best_rate: float
    best: dict[str, Any] | None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the verdict and each step's figures (histograms left out)."""
        return {
            "p99_target_ms": self.p99_target_ms,
            "max_error_rate": self.max_error_rate,
            "capacity_rps": self.best_rate,
            "best": _slim(self.best) if self.best else None,
            "steps": [_slim(s) for s in self.steps],
        }


def _slim(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("histogram", "timeseries")}


def step_meets(data: dict[str, Any], p99_ms: float, max_error_rate: float) -> bool:
    """Whether one open-loop step met the p99 and error-rate targets and kept up."""
    if check_slo(data, Slo(p99_ms=p99_ms, max_error_rate=max_error_rate)):
        return False
    offered = data["offered_rps"] or 0.0
    return bool(data["throughput_rps"] >= KEEP_UP * offered)


def find_capacity(
    target: TargetSpec,
    images: list[bytes],
    p99_ms: float,
    *,
    max_error_rate: float = 0.01,
    start_rate: float | None = None,
    step_duration: float = 5.0,
    warmup: float = 1.0,
    processes: int = 2,
    max_steps: int = 10,
    tolerance: float = 0.1,
    arrival: str = "poisson",
    timeout: float | None = None,
    cooldown: float = 1.0,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> CapacityResult:
    """Search the highest rate meeting ``p99_ms`` (see the module docstring).

    ``start_rate`` defaults to the throughput of a short closed loop of 4 callers. The
    search stops after ``max_steps`` open-loop steps or once the bracket is narrower than
    ``tolerance`` (relative).
    """
    if timeout is None:
        timeout = min(30.0, max(1.0, 5 * p99_ms / 1000.0))
    steps: list[dict[str, Any]] = []

    def run_step(rate: float) -> bool:
        spec = LoadSpec(
            mode="open",
            rate=rate,
            arrival="constant" if arrival == "constant" else "poisson",
            duration=step_duration,
            warmup=warmup,
            processes=processes,
            timeout=timeout,
            seed=len(steps),
        )
        result: RunResult = run_load(
            target, spec, images, label=f"{rate:.1f} req/s", progress=progress
        )
        data = result_to_dict(result)
        data["extra"]["meets"] = step_meets(data, p99_ms, max_error_rate)
        steps.append(data)
        if on_step is not None:
            on_step(data)
        time.sleep(cooldown)  # let the server drain what the step left queued
        return bool(data["extra"]["meets"])

    if start_rate is None:
        probe = run_load(
            target,
            LoadSpec(
                mode="closed",
                concurrency=4,
                duration=step_duration,
                warmup=warmup,
                processes=min(processes, 4),
                timeout=timeout,
            ),
            images,
            label="probe",
            progress=progress,
        )
        start_rate = max(0.5, probe.recorder.throughput())

    lo, hi = 0.0, float("inf")
    rate = start_rate
    floor = start_rate / 64
    while len(steps) < max_steps:
        if run_step(rate):
            lo = rate
            if hi == float("inf"):
                rate *= 2
                continue
        else:
            hi = rate
            if lo == 0.0:
                if rate / 2 < floor:
                    break
                rate /= 2
                continue
        if hi - lo <= tolerance * hi:
            break
        rate = (lo + hi) / 2

    met = [s for s in steps if s["extra"]["meets"] and s["offered_rps"] == lo]
    return CapacityResult(
        p99_target_ms=p99_ms,
        max_error_rate=max_error_rate,
        best_rate=lo,
        best=met[-1] if met else None,
        steps=steps,
    )
