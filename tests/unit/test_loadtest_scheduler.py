"""The load generator's schedules and its timing: no coordinated omission."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import random
import statistics

import pytest

from fashionserve.errors import InvalidInput
from fashionserve.loadtest.generator import (
    LoadSpec,
    clock,
    closed_loop,
    constant_schedule,
    open_loop,
    plan_window,
    poisson_schedule,
    process_schedule,
    split,
)
from fashionserve.loadtest.recorder import Recorder
from fashionserve.loadtest.targets import Outcome


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_constant_schedule_is_an_exact_grid():
    times = take(constant_schedule(20.0, start=100.0, phase=0.01), 1001)
    assert times[0] == pytest.approx(100.01)
    # Computed from the index, so the 1000th send is not off by accumulated rounding.
    assert times[1000] == pytest.approx(100.01 + 1000 / 20.0, abs=1e-9)
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.05}


def test_constant_rate_split_over_processes_interleaves_into_one_grid():
    spec = LoadSpec(mode="open", rate=30.0, arrival="constant", processes=3)
    merged = sorted(t for i in range(3) for t in take(process_schedule(spec, i, 0.0), 100))
    expected = [k / 30.0 for k in range(300)]
    assert merged == pytest.approx(expected, abs=1e-9)


def test_poisson_schedule_has_exponential_gaps_at_the_rate():
    rate = 50.0
    times = take(poisson_schedule(rate, 0.0, random.Random(7)), 20_000)
    gaps = [b - a for a, b in itertools.pairwise([0.0, *times])]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential: the standard deviation equals the mean (a constant rate would give 0).
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.05)
    # Same seed, same schedule: runs are reproducible.
    assert take(poisson_schedule(rate, 0.0, random.Random(7)), 5) == times[:5]


def test_poisson_processes_add_up_to_the_total_rate():
    spec = LoadSpec(mode="open", rate=40.0, arrival="poisson", processes=4, seed=3)
    horizon = 200.0
    arrivals = 0
    for i in range(spec.processes):
        arrivals += sum(
            1 for t in itertools.takewhile(lambda t: t < horizon, process_schedule(spec, i, 0.0))
        )
    assert arrivals / horizon == pytest.approx(40.0, rel=0.03)


def test_plan_window_skips_warmup_and_stops_at_count_or_end():
    grid = constant_schedule(10.0, start=0.0)  # 0.0, 0.1, 0.2, ...
    planned = list(plan_window(grid, measure_start=0.5, measure_end=float("inf"), count=3))
    assert [c for _, c in planned] == [False] * 5 + [True] * 3
    assert [t for t, c in planned if c] == pytest.approx([0.5, 0.6, 0.7])

    planned = list(plan_window(constant_schedule(10.0, 0.0), 0.5, 1.0, count=None))
    assert [t for t, c in planned if c] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize(("total", "parts"), [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_split_shares_add_up(total, parts):
    shares = [split(total, parts, i) for i in range(parts)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_load_spec_rejects_contradictions():
    with pytest.raises(InvalidInput, match="at most one"):
        LoadSpec(duration=5.0, requests=10)
    with pytest.raises(InvalidInput, match="rate"):
        LoadSpec(mode="open", rate=0.0)
    with pytest.raises(InvalidInput, match="concurrency"):
        LoadSpec(mode="closed", concurrency=0)
    # A closed loop never starts more processes than it has callers.
    assert LoadSpec(mode="closed", concurrency=3, processes=8).effective_processes == 3


def test_latency_is_measured_from_the_scheduled_time():
    rec = Recorder(measure_start=0.0)
    # Scheduled at 1.0 but sent late at 1.5 (the generator or a queue was behind), answered
    # at 1.6: the caller waited 600 ms, not the 100 ms the server took.
    assert rec.record(scheduled=1.0, sent=1.5, done=1.6, code="OK") == 600_000
    assert rec.latency_ms()["max"] == pytest.approx(600.0, rel=1e-3)
    assert rec.send_lag.get_max_value() == pytest.approx(500_000, rel=0.01)


class SerialServer:
    """A stand-in endpoint that serves one request at a time in ``service`` seconds."""

    def __init__(self, service: float) -> None:
        self.service = service
        self.lock = asyncio.Lock()
        self.calls = 0

    async def wait_ready(self, timeout: float) -> None:
        return None

    async def call(self, image_index: int, timeout: float) -> Outcome:
        async with self.lock:
            await asyncio.sleep(self.service)
            self.calls += 1
        return Outcome("OK", 1)

    async def close(self) -> None:
        return None


def test_open_loop_overload_shows_up_as_growing_latency():
    """Offered 40/s to a server doing 20/s: the backlog must show in the latencies.

    A generator that waited for answers before sending (coordinated omission) would
    report ~50 ms for every request; the k-th request here really waits ~k * 25 ms.
    """
    server = SerialServer(service=0.05)
    load = LoadSpec(
        mode="open",
        rate=40.0,
        arrival="constant",
        requests=20,
        warmup=0.0,
        processes=1,
        max_in_flight=1,
    )

    async def run() -> Recorder:
        t0 = clock() + 0.05
        rec = Recorder(measure_start=t0)
        await open_loop(server, load, 0, t0, rec, float("inf"))
        return rec

    rec = asyncio.run(run())
    assert rec.ok == 20 == server.calls
    lat = rec.latency_ms()
    fastest, p90, slowest = lat["min"], lat["p90"], lat["max"]
    assert fastest is not None and p90 is not None and slowest is not None
    assert fastest == pytest.approx(50, abs=20)
    # Request 20 was scheduled at 0.475 s and answered at ~1.0 s.
    assert slowest == pytest.approx(525, abs=120)
    assert p90 > 5 * fastest
    # The generator also reports how late it sent (here: held back by max_in_flight).
    assert rec.send_lag.get_max_value() / 1000 > 300


def test_closed_loop_counts_exactly_the_requested_number_after_warmup():
    server = SerialServer(service=0.005)

    load = LoadSpec(mode="closed", concurrency=3, requests=25, warmup=0.1, processes=1)

    async def run() -> Recorder:
        rec = Recorder(measure_start=clock() + load.warmup)
        await closed_loop(server, load, 3, rec, float("inf"), multiprocessing.Value("q", 25))
        return rec

    rec = asyncio.run(run())
    assert rec.ok == 25
    assert server.calls > 25  # the warm-up calls happened but were not counted
