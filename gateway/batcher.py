"""Micro-batching: concurrent requests become one backend call.

The contract (as Triton's dynamic batcher and Ray Serve's ``@serve.batch``):

* the clock starts at the first request of a batch: it waits at most
  ``max_queue_delay_microseconds`` from its own arrival for others to join;
* a batch is dispatched when it holds ``max_batch_size`` requests or its delay is up;
* a semaphore bounds the batches in flight (``max_batches_in_flight``); while every slot
  is busy requests queue, and the next batch takes as many as are waiting;
* a request whose caller gave up (its task was cancelled) is dropped from the batch it
  would have joined, and a batch left empty is not sent;
* a request may carry a deadline: one already past when its batch is sent is dropped and
  fails with :class:`DeadlineExpired` (DEADLINE_EXCEEDED), and the backend is given the batch's latest
  deadline (None if a request has none) to bound its call by;
* results are checked one-for-one against the requests; the backend may return an
  exception in place of a result to fail that one request only;
* a backend failure (an exception raised, or a wrong number of results) fails every
  request of the batch with that cause;
* with a ``key``, a batch only holds requests whose keys agree (``None`` agrees with any):
  the gateway keys a stream's images by the model versions the stream started on, which
  one backend call must serve alike;
* batch sizes and queue waits are recorded in the histograms it is given
  (``batch_size``, ``queue_wait_seconds``: the gateway's Prometheus metrics).

:func:`bounded_map` is the flow-control half of streaming: it reads the next item of a
stream only while fewer than ``limit`` are being served.

Nothing here knows about gRPC or Triton: its errors derive from
:class:`fashionserve.errors.Error`, with a transport-free kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from fashionserve.errors import Error, ErrorKind

log = logging.getLogger(__name__)

_SHUTTING_DOWN = "the gateway is shutting down; retry"

T = TypeVar("T")
R = TypeVar("R")

Backend = Callable[[list[T], float | None], Awaitable[Sequence[R | BaseException]]]
"""``backend(items, deadline)``: ``deadline`` is the latest of the items' deadlines
(``time.monotonic()`` seconds), None when some item has none."""


class BatcherClosed(Error):
    """The batcher is shutting down and takes no more requests."""

    kind = ErrorKind.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class DeadlineExpired(Error):
    """The request's deadline passed before its batch was sent."""

    kind = ErrorKind.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class BatchResultMismatch(Error):
    """The backend returned a different number of results than requests."""

    kind = ErrorKind.INTERNAL


class Observer(Protocol):
    """Where a measurement goes (a ``prometheus_client`` Histogram, for one)."""

    def observe(self, amount: float) -> None:
        """Record one value."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    deadline: float | None = None
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[T, R]):
    """Batch concurrent :meth:`submit` calls into calls of ``backend(items)``.

    ``backend`` returns one entry per item, in order: a result, or an exception that fails
    that item alone. Start with :meth:`start` (inside the event loop), stop with
    :meth:`close`.
    """

    def __init__(
        self,
        backend: Backend[T, R],
        *,
        max_batch_size: int,
        max_queue_delay_microseconds: int,
        max_batches_in_flight: int,
        batch_size: Observer | None = None,
        queue_wait_seconds: Observer | None = None,
        key: Callable[[T], Hashable | None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_batches_in_flight < 1 or max_queue_delay_microseconds < 0:
            raise ValueError("batch size and batches in flight must be >= 1, delay >= 0")
        self._backend = backend
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_microseconds / 1e6
        self._slots = asyncio.Semaphore(max_batches_in_flight)
        self._pending: deque[_Pending[T, R]] = deque()
        self._arrival = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._dispatches: set[asyncio.Task[None]] = set()
        self._closed = False
        self._batch_size = batch_size
        self._queue_wait_seconds = queue_wait_seconds
        self._key = key

    def start(self) -> None:
        """Start the batching loop (call from the event loop that will submit)."""
        if self._loop_task is None:
            # A fresh context: the loop and its batches belong to no single request, so
            # they must not inherit the request-scoped context variables of the first caller.
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name="micro-batcher", context=contextvars.Context()
            )

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    async def submit(self, item: T, deadline: float | None = None) -> R:
        """Queue ``item`` and wait for its result. Cancelling the caller drops the item if
        it has not been sent yet, and so does ``deadline`` (``time.monotonic()`` seconds)
        passing: then this raises :class:`DeadlineExpired`."""
        if self._closed:
            raise BatcherClosed(_SHUTTING_DOWN)
        if self._loop_task is None:
            self.start()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future, deadline))
        self._arrival.set()
        return await future

    async def close(self) -> None:
        """Refuse new requests, fail queued ones, and wait for batches in flight."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed(_SHUTTING_DOWN))
        if self._dispatches:
            await asyncio.gather(*self._dispatches, return_exceptions=True)

    # ------------------------------------------------------------------ internals
    def _drop_cancelled(self) -> None:
        """Forget requests at the head of the queue whose callers gave up."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()

    def _live_count(self) -> int:
        """Live queued requests, counted up to a full batch (no need to look further)."""
        n = 0
        for p in self._pending:
            if not p.future.done():
                n += 1
                if n >= self.max_batch_size:
                    break
        return n

    async def _wait_arrival(self, timeout: float | None) -> None:
        self._arrival.clear()
        if timeout is None:
            await self._arrival.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._arrival.wait()

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._dispatch(batch))
            self._dispatches.add(task)
            task.add_done_callback(self._dispatches.discard)

    async def _collect(self) -> list[_Pending[T, R]]:
        """Wait for a first live request, then for more until full or its delay is up."""
        while True:
            self._drop_cancelled()
            if not self._pending:
                await self._wait_arrival(None)
                continue
            # The first request's own arrival starts the clock: a request that already
            # waited for a free slot does not wait again.
            deadline = self._pending[0].arrived + self.max_delay
            while self._live_count() < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait_arrival(remaining)
            batch = self._take()
            if batch:  # empty if every caller gave up while we waited: send nothing
                return batch

    def _take(self) -> list[_Pending[T, R]]:
        """Up to a full batch of live requests, oldest first, whose keys agree; the others
        keep their place in the queue."""
        batch: list[_Pending[T, R]] = []
        kept: deque[_Pending[T, R]] = deque()
        batch_key: Hashable | None = None
        while self._pending and len(batch) < self.max_batch_size:
            p = self._pending.popleft()
            if p.future.done():
                continue
            key = self._key(p.item) if self._key is not None else None
            if key is not None and batch_key is not None and key != batch_key:
                kept.append(p)
                continue
            batch_key = batch_key if key is None else key
            batch.append(p)
        self._pending.extendleft(reversed(kept))
        return batch

    async def _dispatch(self, batch: list[_Pending[T, R]]) -> None:
        try:
            now = time.monotonic()
            for p in batch:
                if p.deadline is not None and p.deadline <= now and not p.future.done():
                    p.future.set_exception(
                        DeadlineExpired("the call's deadline passed before the image was sent")
                    )
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            deadlines = [p.deadline for p in live]
            deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
            if self._batch_size is not None:
                self._batch_size.observe(len(live))
            if self._queue_wait_seconds is not None:
                for p in live:
                    self._queue_wait_seconds.observe(now - p.arrived)
            try:
                results = await self._backend([p.item for p in live], deadline)
                if len(results) != len(live):
                    raise BatchResultMismatch(
                        f"the backend returned {len(results)} results for {len(live)} requests"
                    )
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            for p, result in zip(live, results, strict=True):
                if p.future.done():  # cancelled while the batch ran
                    continue
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
        finally:
            self._slots.release()


async def bounded_map(
    source: AsyncIterator[T], fn: Callable[[T], Awaitable[R]], limit: int
) -> AsyncGenerator[R, None]:
    """Apply ``fn`` to the items of ``source`` concurrently, yielding results as they
    complete, with at most ``limit`` items read but not yet yielded.

    This is flow control: the next item is read only when there is room, so memory stays
    bounded however fast the source produces, and a consumer that stops reading results
    stops the reading of items too. ``fn`` should not raise (a raise ends the stream).
    Closing the generator cancels everything still running.
    """
    if limit < 1:
        raise ValueError("limit must be >= 1")
    running: set[asyncio.Task[R]] = set()
    reader: asyncio.Task[T] | None = None
    exhausted = False
    try:
        while True:
            if reader is None and not exhausted and len(running) < limit:
                reader = asyncio.ensure_future(anext(source))
            waiting: set[asyncio.Future[Any]] = set(running)
            if reader is not None:
                waiting.add(reader)
            if not waiting:
                return
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reader is not None and reader in done:
                finished_reader, reader = reader, None
                try:
                    item = finished_reader.result()
                except StopAsyncIteration:
                    exhausted = True
                else:
                    running.add(asyncio.ensure_future(fn(item)))
            for task in [t for t in running if t in done]:
                running.discard(task)
                # Yielding before reading on keeps "read but not answered" <= limit.
                yield task.result()
    finally:
        pending: list[asyncio.Future[Any]] = [*running]
        if reader is not None:
            pending.append(reader)
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
