"""The load generator: closed and open loops, run from several processes at once.

* **Closed loop**: ``concurrency`` callers, each sending its next request as soon as the
  previous one returns. Throughput follows the server; latency is from send to answer.
* **Open loop**: requests *arrive* on a schedule fixed in advance, at a constant rate or as
  a Poisson process, whether or not earlier ones have been answered. Latency is measured
  from each request's scheduled time, so when the server (or the generator) falls behind,
  the backlog shows up as latency instead of silently lowering the offered load: no
  coordinated omission.

Load comes from ``processes`` spawned worker processes (each with its own event loop and
gRPC channel), so the generator is not one interpreter's bottleneck; they start together
from a shared start time, and their HdrHistograms are merged afterwards. A warm-up period
runs the same load first without counting it. Each worker reports its CPU time, so the
report can say how busy the generator itself was.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing as mp
import os
import queue
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fashionserve.errors import Error, ErrorKind, InvalidInput
from fashionserve.loadtest.memory import MemoryWatcher
from fashionserve.loadtest.recorder import Recorder, merge_payloads
from fashionserve.loadtest.targets import Target, TargetSpec, open_target

Mode = Literal["closed", "open"]
Arrival = Literal["constant", "poisson"]

clock = time.monotonic
"""The one clock of every measurement: CLOCK_MONOTONIC is shared by all processes of a
Linux machine, so worker processes can agree on a start time."""

DEFAULT_DURATION = 10.0
"""Seconds measured when neither a duration nor a request count is given."""

READY_TIMEOUT = 60.0
"""Seconds a worker may take to start and connect before the run is abandoned."""


class LoadTestError(Error):
    """The load test itself could not run (a worker failed, a target never became ready)."""

    kind = ErrorKind.UNAVAILABLE
    reason = "LOAD_TEST_FAILED"


@dataclass(frozen=True)
class LoadSpec:
    """How much load, for how long.

    At most one of ``duration`` (seconds measured) and ``requests`` (requests measured)
    is set; with neither, the run lasts :data:`DEFAULT_DURATION` seconds. ``warmup`` seconds of the same load run first and are not counted. In an open
    loop, ``max_in_flight`` bounds outstanding requests over all processes; a request
    waiting for a slot is still timed from its scheduled time.
    """

    mode: Mode = "closed"
    concurrency: int = 8
    rate: float = 0.0
    arrival: Arrival = "poisson"
    duration: float | None = None
    requests: int | None = None
    warmup: float = 2.0
    processes: int = 2
    max_in_flight: int = 4096
    timeout: float = 30.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration is not None and self.requests is not None:
            raise InvalidInput("set at most one of duration and requests")
        if self.duration is None and self.requests is None:
            object.__setattr__(self, "duration", DEFAULT_DURATION)  # frozen dataclass
        if self.duration is not None and self.duration <= 0:
            raise InvalidInput("duration must be > 0")
        if self.requests is not None and self.requests < 1:
            raise InvalidInput("requests must be >= 1")
        if self.mode == "closed" and self.concurrency < 1:
            raise InvalidInput("a closed loop needs concurrency >= 1")
        if self.mode == "open" and not self.rate > 0:
            raise InvalidInput("an open loop needs a rate > 0")
        if self.warmup < 0 or self.timeout <= 0 or self.processes < 1:
            raise InvalidInput("warmup >= 0, timeout > 0 and processes >= 1 are required")
        if self.max_in_flight < 1:
            raise InvalidInput("max_in_flight must be >= 1")

    @property
    def effective_processes(self) -> int:
        """Processes actually started: a closed loop never has an idle one."""
        if self.mode == "closed":
            return min(self.processes, self.concurrency)
        return self.processes

    def describe(self) -> dict[str, Any]:
        """JSON-able settings, with only the fields that apply to the mode."""
        out = asdict(self)
        if self.mode == "closed":
            for key in ("rate", "arrival", "max_in_flight"):
                out.pop(key)
        else:
            out.pop("concurrency")
        out["processes"] = self.effective_processes
        return out


# -------------------------------------------------------------------------- schedules
def constant_schedule(rate: float, start: float, phase: float = 0.0) -> Iterator[float]:
    """Send times ``start + phase + k / rate`` for k = 0, 1, 2, ..."""
    if not rate > 0:
        raise ValueError("rate must be > 0")
    for k in itertools.count():
        # Computed from k, not accumulated, so floating-point error does not drift.
        yield start + phase + k / rate


def poisson_schedule(rate: float, start: float, rng: random.Random) -> Iterator[float]:
    """Send times of a Poisson process of ``rate`` per second from ``start``:
    exponentially distributed gaps with mean ``1 / rate``."""
    if not rate > 0:
        raise ValueError("rate must be > 0")
    t = start
    while True:
        t += rng.expovariate(rate)
        yield t


def process_schedule(spec: LoadSpec, index: int, start: float) -> Iterator[float]:
    """The share of an open-loop schedule that worker ``index`` sends.

    Each of P workers runs at ``rate / P``. Constant: worker i is offset by ``i / rate``,
    so together they send exactly every ``1 / rate`` seconds. Poisson: independent
    Poisson processes add up to a Poisson process of the summed rate.
    """
    processes = spec.effective_processes
    share = spec.rate / processes
    if spec.arrival == "constant":
        return constant_schedule(share, start, phase=index / spec.rate)
    return poisson_schedule(share, start, random.Random(spec.seed * 1_000_003 + index))


def split(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split as evenly as possible over ``parts``."""
    return total // parts + (1 if index < total % parts else 0)


def plan_window(
    schedule: Iterable[float], measure_start: float, measure_end: float, count: int | None
) -> Iterator[tuple[float, bool]]:
    """``(scheduled time, counted)`` for each request to send.

    Requests scheduled before ``measure_start`` are warm-up (not counted); then requests
    are counted until ``count`` of them have been planned or one falls at or after
    ``measure_end``.
    """
    planned = 0
    for t in schedule:
        if t < measure_start:
            yield t, False
            continue
        if t >= measure_end or (count is not None and planned >= count):
            return
        planned += 1
        yield t, True


# ----------------------------------------------------------------------- worker side
@dataclass
class _Shared:
    """Objects shared between the parent and the workers (inherited at spawn)."""

    messages: Any  # mp.Queue of ("ready"|"result"|"error", index, payload)
    go: Any  # mp.Event: set once every worker is ready
    start_time: Any  # mp.Value("d"): the common start (monotonic clock)
    progress: Any  # mp.Array("q", 2 * P): measured ok / error count per worker
    remaining: Any  # mp.Value("q"): closed loop, request-count mode: requests left


@dataclass
class _WorkerArgs:
    index: int
    target: TargetSpec
    load: LoadSpec
    images: list[bytes]


def _worker_entry(args: _WorkerArgs, shared: _Shared) -> None:
    """Entry point of a spawned worker process."""
    try:
        payload = asyncio.run(_worker(args, shared))
        shared.messages.put(("result", args.index, payload))
    except BaseException:
        shared.messages.put(("error", args.index, traceback.format_exc()))


async def _sleep_until(t: float) -> None:
    delay = t - clock()
    if delay > 0:
        await asyncio.sleep(delay)


async def _worker(args: _WorkerArgs, shared: _Shared) -> dict[str, Any]:
    load = args.load
    # Start each worker on a different image so workers do not send in lockstep.
    images = args.images[args.index :] + args.images[: args.index]
    target = open_target(args.target, images)
    try:
        await target.wait_ready(READY_TIMEOUT)
        shared.messages.put(("ready", args.index, None))
        if not await asyncio.to_thread(shared.go.wait, READY_TIMEOUT * 2):
            raise LoadTestError("the parent never gave the start signal")
        t0 = float(shared.start_time.value)
        measure_start = t0 + load.warmup
        measure_end = measure_start + load.duration if load.duration is not None else math.inf
        recorder = Recorder(measure_start)

        def on_done(code: str) -> None:
            slot = 2 * args.index + (0 if code == "OK" else 1)
            shared.progress[slot] += 1

        await _sleep_until(t0)
        cpu0 = time.process_time()
        if load.mode == "closed":
            callers = split(load.concurrency, load.effective_processes, args.index)
            await closed_loop(
                target, load, callers, recorder, measure_end, shared.remaining, on_done
            )
        else:
            await open_loop(target, load, args.index, t0, recorder, measure_end, on_done)
        cpu = time.process_time() - cpu0
        wall = clock() - t0
    finally:
        await target.close()
    return {"recorder": recorder.to_payload(), "cpu_seconds": cpu, "wall_seconds": wall}


async def closed_loop(
    target: Target,
    load: LoadSpec,
    callers: int,
    recorder: Recorder,
    measure_end: float,
    remaining: Any = None,
    on_done: Callable[[str], None] | None = None,
) -> None:
    """Run ``callers`` closed-loop callers in this event loop until ``measure_end`` or,
    in request-count mode, until ``remaining`` (a shared counter with ``get_lock()``)
    reaches zero. Requests sent before ``recorder.measure_start`` are not recorded."""
    next_image = itertools.count()

    def claim() -> bool:
        if load.requests is None:
            return True
        with remaining.get_lock():
            if remaining.value <= 0:
                return False
            remaining.value -= 1
            return True

    async def caller() -> None:
        while True:
            sent = clock()
            if sent >= measure_end:
                return
            counted = sent >= recorder.measure_start
            if counted and not claim():
                return
            outcome = await target.call(next(next_image), load.timeout)
            if counted:
                recorder.record(sent, sent, clock(), outcome.code, outcome.garments)
                if on_done is not None:
                    on_done(outcome.code)

    await asyncio.gather(*(caller() for _ in range(callers)))


async def open_loop(
    target: Target,
    load: LoadSpec,
    index: int,
    t0: float,
    recorder: Recorder,
    measure_end: float,
    on_done: Callable[[str], None] | None = None,
) -> None:
    """Send worker ``index``'s share of the open-loop schedule starting at ``t0``.

    Each request is a task created at its scheduled time, whatever is still in flight;
    one waiting for a free slot (``max_in_flight``) or answered late is timed from its
    scheduled time, and gives up ``load.timeout`` seconds after it.
    """
    processes = load.effective_processes
    slots = asyncio.Semaphore(max(1, split(load.max_in_flight, processes, index)))
    count = split(load.requests, processes, index) if load.requests is not None else None
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, counted: bool, image: int) -> None:
        deadline = scheduled + load.timeout
        sent = clock()
        try:
            await asyncio.wait_for(slots.acquire(), max(0.0, deadline - sent))
        except TimeoutError:
            code, garments = "DEADLINE_EXCEEDED", 0
        else:
            try:
                sent = clock()
                outcome = await target.call(image, deadline - sent)
                code, garments = outcome.code, outcome.garments
            finally:
                slots.release()
        if counted:
            recorder.record(scheduled, sent, clock(), code, garments)
            if on_done is not None:
                on_done(code)

    schedule = process_schedule(load, index, t0)
    for image, (scheduled, counted) in enumerate(
        plan_window(schedule, recorder.measure_start, measure_end, count)
    ):
        await _sleep_until(scheduled)
        task = asyncio.create_task(one(scheduled, counted, image))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


# ----------------------------------------------------------------------- parent side
@dataclass
class RunResult:
    """Everything one run measured (see :func:`fashionserve.loadtest.report.result_to_dict`)."""

    label: str
    target: TargetSpec
    load: LoadSpec
    recorder: Recorder
    started_at: str
    wall_seconds: float
    generator: dict[str, Any]
    memory: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_load(
    target: TargetSpec,
    load: LoadSpec,
    images: list[bytes],
    *,
    label: str = "",
    progress: bool = True,
    watch: Mapping[str, int] | None = None,
    watch_interval: float = 5.0,
) -> RunResult:
    """Run one load test and return its merged result.

    ``watch`` maps names to PIDs whose process trees' memory is sampled every
    ``watch_interval`` seconds during the run (the soak mode). Raises
    :class:`LoadTestError` when a worker fails or the target is not ready in time.
    """
    if not images:
        raise InvalidInput("no images to send")
    ctx = mp.get_context("spawn")  # fork and gRPC's threads do not mix
    processes = load.effective_processes
    shared = _Shared(
        messages=ctx.Queue(),
        go=ctx.Event(),
        start_time=ctx.Value("d", 0.0, lock=False),
        progress=ctx.Array("q", 2 * processes, lock=False),
        remaining=ctx.Value("q", load.requests or 0),
    )
    watcher = MemoryWatcher(watch, watch_interval) if watch else None
    workers = [
        ctx.Process(
            target=_worker_entry,
            args=(_WorkerArgs(i, target, load, images), shared),
            name=f"loadtest-worker-{i}",
            daemon=True,
        )
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    try:
        return _drive(target, load, label, progress, workers, shared, watcher)
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()
                w.join(timeout=5)


def _next_message(shared: _Shared, timeout: float) -> tuple[str, int, Any] | None:
    try:
        message: tuple[str, int, Any] = shared.messages.get(timeout=timeout)
    except queue.Empty:
        return None
    return message


def _worker_failed(index: int, detail: str) -> LoadTestError:
    return LoadTestError(f"load generator process {index} failed:\n{detail}")


def _drive(
    target: TargetSpec,
    load: LoadSpec,
    label: str,
    progress: bool,
    workers: list[Any],
    shared: _Shared,
    watcher: MemoryWatcher | None,
) -> RunResult:
    from tqdm import tqdm

    processes = len(workers)
    ready: set[int] = set()
    deadline = clock() + READY_TIMEOUT + 30.0  # + spawn and import time
    while len(ready) < processes:
        message = _next_message(shared, 0.25)
        if message is not None:
            kind, index, payload = message
            if kind == "error":
                raise _worker_failed(index, payload)
            ready.add(index)
        elif clock() > deadline:
            raise LoadTestError(f"{target.kind} at {target.address} was not ready in time")
        elif any(not w.is_alive() for w in workers):
            dead = [w.name for w in workers if not w.is_alive()]
            raise LoadTestError(f"load generator processes exited early: {dead}")

    t0 = clock() + 0.1
    shared.start_time.value = t0
    measure_start = t0 + load.warmup
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    cpu0 = time.process_time()
    shared.go.set()

    total = load.requests if load.requests is not None else load.duration
    bar = tqdm(
        total=total,
        desc=f"{label or target.kind}: warm-up",
        unit="req" if load.requests is not None else "s",
        disable=None if progress else True,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    payloads: dict[int, dict[str, Any]] = {}
    hard_deadline = (
        measure_start
        + (load.duration if load.duration is not None else 24 * 3600.0)
        + load.timeout
        + 60.0
    )
    with bar:
        while len(payloads) < processes:
            message = _next_message(shared, 0.25)
            now = clock()
            if watcher is not None:
                watcher.maybe_sample(now)
            if message is not None:
                kind, index, payload = message
                if kind == "error":
                    raise _worker_failed(index, payload)
                if kind == "result":
                    payloads[index] = payload
            elif now > hard_deadline:
                raise LoadTestError("load generator processes did not finish in time")
            elif any(not w.is_alive() for i, w in enumerate(workers) if i not in payloads):
                raise LoadTestError("a load generator process died without a result")
            ok = sum(shared.progress[0::2])
            errors = sum(shared.progress[1::2])
            if now >= measure_start:
                bar.set_description(label or target.kind)
                elapsed = now - measure_start
                position = ok + errors if load.requests is not None else elapsed
                bar.n = min(total, position) if total is not None else position
                bar.set_postfix(ok=ok, errors=errors, rps=f"{ok / max(elapsed, 1e-9):.1f}")
                bar.refresh()
    if watcher is not None:
        watcher.sample(clock())
    parent_cpu = time.process_time() - cpu0
    recorder = merge_payloads([payloads[i]["recorder"] for i in sorted(payloads)])
    wall = max(p["wall_seconds"] for p in payloads.values())
    worker_cpu = [p["cpu_seconds"] for p in payloads.values()]
    cpu_total = sum(worker_cpu) + parent_cpu
    generator = {
        "processes": processes,
        "cpu_seconds": round(cpu_total, 3),
        "cores_used": round(cpu_total / wall, 3) if wall > 0 else None,
        "machine_cores": os.cpu_count(),
        "busiest_process_core_fraction": round(
            max(c / p["wall_seconds"] for c, p in zip(worker_cpu, payloads.values(), strict=True)),
            3,
        ),
        "send_lag_ms": {
            "p50": recorder.send_lag.get_value_at_percentile(50) / 1000.0,
            "p99": recorder.send_lag.get_value_at_percentile(99) / 1000.0,
            "max": recorder.send_lag.get_max_value() / 1000.0,
        },
    }
    return RunResult(
        label=label,
        target=target,
        load=load,
        recorder=recorder,
        started_at=started_at,
        wall_seconds=wall,
        generator=generator,
        memory=watcher.report(measure_start) if watcher is not None else None,
    )
