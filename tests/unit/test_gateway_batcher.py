"""The micro-batcher's contract (STYLE.md point 6), with plain coroutines as the backend."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from fashionserve.gateway.batcher import (
    BatcherClosed,
    BatchResultMismatch,
    DeadlineExpired,
    MicroBatcher,
    bounded_map,
)
from fashionserve.gateway.telemetry import Metrics


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return run


class Recorder:
    """A backend that doubles numbers and records every batch it was given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.deadlines: list[float | None] = []
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(
        self, items: list[int], deadline: float | None
    ) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        self.deadlines.append(deadline)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return [2 * i for i in items]


def make(
    backend: Recorder, size: int = 4, delay_us: int = 50_000, in_flight: int = 2
) -> MicroBatcher[int, int]:
    return MicroBatcher(
        backend,
        max_batch_size=size,
        max_queue_delay_microseconds=delay_us,
        max_batches_in_flight=in_flight,
    )


@aio
async def test_concurrent_requests_share_one_call_and_get_their_own_result() -> None:
    backend = Recorder()
    batcher = make(backend, size=4)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)))
    assert results == [0, 2, 4, 6]
    assert backend.batches == [[0, 1, 2, 3]]  # full: sent without waiting for the delay
    await batcher.close()


@aio
async def test_full_batch_is_dispatched_on_size_not_delay() -> None:
    backend = Recorder()
    batcher = make(backend, size=3, delay_us=5_000_000)  # 5 s: must not be waited for
    start = time.monotonic()
    assert await asyncio.gather(*(batcher.submit(i) for i in range(3))) == [0, 2, 4]
    assert time.monotonic() - start < 1.0
    await batcher.close()


@aio
async def test_lone_request_waits_at_most_the_delay_from_its_arrival() -> None:
    backend = Recorder()
    batcher = make(backend, size=8, delay_us=100_000)
    start = time.monotonic()
    assert await batcher.submit(5) == 10
    waited = time.monotonic() - start
    assert 0.09 <= waited < 0.5
    assert backend.batches == [[5]]
    await batcher.close()


@aio
async def test_clock_starts_at_first_request_of_the_batch() -> None:
    backend = Recorder()
    batcher = make(backend, size=8, delay_us=200_000)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.15)
    second = asyncio.ensure_future(batcher.submit(2))  # joins; does not restart the clock
    start = time.monotonic()
    assert await asyncio.gather(first, second) == [2, 4]
    assert time.monotonic() - start < 0.15  # ~0.05 s left of the first one's 0.2 s
    assert backend.batches == [[1, 2]]
    await batcher.close()


@aio
async def test_more_requests_than_batch_size_are_split_in_order() -> None:
    backend = Recorder()
    batcher = make(backend, size=3, delay_us=20_000, in_flight=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
    assert results == [2 * i for i in range(7)]
    assert [len(b) for b in backend.batches] == [3, 3, 1]
    assert sorted(i for b in backend.batches for i in b) == list(range(7))
    await batcher.close()


@aio
async def test_semaphore_bounds_batches_in_flight() -> None:
    backend = Recorder(delay=0.05)
    batcher = make(backend, size=1, delay_us=0, in_flight=2)
    await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    assert backend.max_in_flight == 2
    await batcher.close()


@aio
async def test_requests_queued_while_slots_are_busy_form_the_next_batch() -> None:
    backend = Recorder(delay=0.1)
    batcher = make(backend, size=8, delay_us=0, in_flight=1)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.02)  # the first batch is running, the only slot is taken
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.gather(first, *rest)
    assert backend.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


@aio
async def test_cancelled_request_is_dropped_before_dispatch() -> None:
    backend = Recorder()
    batcher = make(backend, size=8, delay_us=100_000)
    keep = asyncio.ensure_future(batcher.submit(1))
    drop = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    drop.cancel()
    assert await keep == 2
    assert backend.batches == [[1]]
    assert drop.cancelled()
    await batcher.close()


@aio
async def test_batch_of_only_cancelled_requests_is_not_sent() -> None:
    backend = Recorder()
    batcher = make(backend, size=8, delay_us=50_000)
    gone = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    for task in gone:
        task.cancel()
    await asyncio.sleep(0.1)
    assert backend.batches == []
    assert await batcher.submit(7) == 14  # and the batcher still works
    await batcher.close()


@aio
async def test_a_request_past_its_deadline_is_dropped_before_the_call() -> None:
    backend = Recorder()
    batcher = make(backend, size=4, delay_us=100_000)
    now = time.monotonic()
    late = asyncio.ensure_future(batcher.submit(1, deadline=now + 0.02))  # expires in the queue
    on_time = asyncio.ensure_future(batcher.submit(2, deadline=now + 5))
    with pytest.raises(DeadlineExpired):
        await late
    assert await on_time == 4
    assert backend.batches == [[2]]
    await batcher.close()


@aio
async def test_the_call_is_bounded_by_the_latest_deadline_of_its_batch() -> None:
    backend = Recorder()
    batcher = make(backend, size=2)
    now = time.monotonic()
    assert await asyncio.gather(
        batcher.submit(1, deadline=now + 3), batcher.submit(2, deadline=now + 5)
    ) == [2, 4]
    # A request without a deadline: the call has none either (the backend's own timeout).
    assert await asyncio.gather(batcher.submit(3, deadline=now + 3), batcher.submit(4)) == [6, 8]
    assert backend.deadlines == [now + 5, None]
    await batcher.close()


@aio
async def test_backend_failure_fails_every_request_of_the_batch_with_the_cause() -> None:
    calls: list[list[int]] = []

    async def broken(items: list[int], deadline: float | None) -> Sequence[int]:
        calls.append(items)
        raise ConnectionError("triton went away")

    batcher: MicroBatcher[int, int] = MicroBatcher(
        broken, max_batch_size=4, max_queue_delay_microseconds=10_000, max_batches_in_flight=1
    )
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert len(calls) == 1
    assert all(isinstance(o, ConnectionError) and "went away" in str(o) for o in outcomes)
    await batcher.close()


@aio
async def test_result_count_is_checked_one_for_one() -> None:
    async def short(items: list[int], deadline: float | None) -> Sequence[int]:
        return items[:-1]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        short, max_batch_size=4, max_queue_delay_microseconds=10_000, max_batches_in_flight=1
    )
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, BatchResultMismatch) for o in outcomes)
    await batcher.close()


@aio
async def test_an_exception_in_place_of_a_result_fails_only_that_request() -> None:
    async def picky(items: list[int], deadline: float | None) -> Sequence[int | BaseException]:
        return [ValueError(f"bad {i}") if i == 13 else i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        picky, max_batch_size=4, max_queue_delay_microseconds=10_000, max_batches_in_flight=1
    )
    outcomes = await asyncio.gather(
        *(batcher.submit(i) for i in (1, 13, 3)), return_exceptions=True
    )
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], ValueError) and "bad 13" in str(outcomes[1])
    await batcher.close()


@aio
async def test_histograms_record_batch_sizes_and_waits() -> None:
    metrics = Metrics()  # the gateway's Prometheus histograms
    batcher: MicroBatcher[int, int] = MicroBatcher(
        Recorder(),
        max_batch_size=4,
        max_queue_delay_microseconds=20_000,
        max_batches_in_flight=2,
        batch_size=metrics.batch_size,
        queue_wait_seconds=metrics.batch_wait_seconds,
    )
    await asyncio.gather(*(batcher.submit(i) for i in range(6)))
    assert metrics.value("fashionserve_batch_size_count") == 2
    assert metrics.value("fashionserve_batch_size_sum") == 6  # a full 4, then the other 2
    assert metrics.value("fashionserve_batch_size_bucket", le="2.0") == 1
    assert metrics.value("fashionserve_batch_size_bucket", le="4.0") == 2
    assert metrics.value("fashionserve_batch_wait_seconds_count") == 6
    # The two that waited for company waited about the delay, the full batch not at all.
    assert metrics.value("fashionserve_batch_wait_seconds_bucket", le="0.01") == 4
    await batcher.close()


@aio
async def test_close_refuses_new_requests_and_finishes_batches_in_flight() -> None:
    backend = Recorder(delay=0.1)
    batcher = make(backend, size=2, delay_us=0)
    running = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0.02)
    await batcher.close()
    assert await running == 8  # the batch in flight completed
    with pytest.raises(BatcherClosed):
        await batcher.submit(1)


# ------------------------------------------------------------------ bounded_map
@aio
async def test_bounded_map_never_reads_more_than_limit_ahead() -> None:
    read = 0
    answered = 0
    max_outstanding = 0
    release = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        nonlocal read, max_outstanding
        for i in range(50):
            read += 1
            max_outstanding = max(max_outstanding, read - answered)
            yield i

    async def slow(i: int) -> int:
        await release.wait()
        return i

    results: list[int] = []

    async def consume() -> None:
        nonlocal answered
        async for r in bounded_map(source(), slow, limit=5):
            answered += 1
            results.append(r)

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    assert read == 5  # stopped reading: nothing answered yet
    release.set()
    await task
    assert sorted(results) == list(range(50))
    assert max_outstanding <= 5


@aio
async def test_bounded_map_yields_in_completion_order() -> None:
    async def source() -> AsyncIterator[float]:
        for d in (0.06, 0.01, 0.03):
            yield d

    async def sleep_then(d: float) -> float:
        await asyncio.sleep(d)
        return d

    assert [r async for r in bounded_map(source(), sleep_then, limit=3)] == [0.01, 0.03, 0.06]


@aio
async def test_bounded_map_stops_reading_when_consumer_stops() -> None:
    read = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal read
        i = 0
        while True:
            read += 1
            yield i
            i += 1

    async def echo(i: int) -> int:
        return i

    gen = bounded_map(endless(), echo, limit=3)
    first = await anext(gen)
    await asyncio.sleep(0.05)  # the consumer is not reading on
    assert first == 0
    assert read <= 4
    await gen.aclose()


@aio
async def test_a_batch_holds_only_requests_whose_keys_agree() -> None:
    backend = Recorder()
    # Odd and even numbers must not share a call; 100 and up accept any company.
    batcher: MicroBatcher[int, int] = MicroBatcher(
        backend,
        max_batch_size=4,
        max_queue_delay_microseconds=20_000,
        max_batches_in_flight=1,
        key=lambda i: None if i >= 100 else i % 2,
    )
    results = await asyncio.gather(*(batcher.submit(i) for i in (0, 1, 2, 100, 3)))
    assert results == [0, 2, 4, 200, 6]
    assert sorted(backend.batches) == [[0, 2, 100], [1, 3]]  # each in arrival order
    await batcher.close()
