"""The image-check pool: where every image's checks run, off the event loop, behind admission.

:func:`~fashionserve.gateway.validation.inspect_image` does work a caller controls (a header
parse, a chunk walk, a reduced decode of a JPEG that does not end with its EOI marker), so
it never runs on the event loop that answers every other call, health checks included. It
runs in a :class:`ImageCheckPool` of its own:

* a ``ThreadPoolExecutor`` sized to the CPU limit (:func:`cpu_limit`), never asyncio's
  default executor, which is sized from the node's CPUs, has no bound on its queue, and is
  where DNS lookups run;
* behind admission: at most ``max_queued`` images wait for a thread. A call whose images do
  not all fit is refused whole, at once, with RESOURCE_EXHAUSTED (IMAGE_CHECKS_BUSY) and a
  retry delay (how long the queue ahead takes to drain at the recent mean check time).

A check a caller stops waiting for still runs to its end: the count of queued images is
then exact, and the executor's own queue never holds more than the bound.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fashionserve.errors import Error
from fashionserve.gateway.failures import ResourceExhausted, as_error
from fashionserve.gateway.validation import ImageInfo, ImageLimits, inspect_image

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Bounds of the suggested retry delay (seconds), and the weight of the newest check in the
# running mean of check durations.
_MIN_RETRY = 0.05
_MAX_RETRY = 10.0
_EWMA_WEIGHT = 0.1


def cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its cgroup's ``cpu.max`` quota (rounded up), else the
    CPUs it may run on. A container's limit is the quota, not the node's CPU count."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable here
    return len(os.sched_getaffinity(0))


class ImageCheckPool:
    """Checks images against ``limits`` on ``workers`` threads, with at most ``max_queued``
    images waiting for one."""

    def __init__(self, limits: ImageLimits, workers: int, max_queued: int) -> None:
        self.limits = limits
        self.workers = workers
        self.max_queued = max_queued
        self.pending = 0
        """Images submitted and not yet checked (running or queued)."""
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="image-check")
        self._mean_seconds = _MIN_RETRY

    async def check(self, images: Sequence[bytes]) -> list[ImageInfo | Error]:
        """Check ``images``, one outcome each, in order: what the header says, or the
        image's error. All are queued, or the call is refused at once: RESOURCE_EXHAUSTED
        (IMAGE_CHECKS_BUSY) when fewer places are free than there are images."""
        count = len(images)
        if self.pending + count > self.workers + self.max_queued:
            raise self._busy(count)
        loop = asyncio.get_running_loop()
        futures = []
        for data in images:
            future = loop.run_in_executor(self._executor, self._timed, data)
            self.pending += 1
            future.add_done_callback(self._finished)
            futures.append(future)
        # Shielded: a caller that goes away leaves its checks running, so that `pending`
        # counts what the threads really have left to do.
        outcomes = await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
        return [o if isinstance(o, ImageInfo) else as_error(o) for o in outcomes]

    def close(self) -> None:
        """Take no more checks; those queued still finish, on their threads."""
        self._executor.shutdown(wait=False)

    def _timed(self, data: bytes) -> ImageInfo:
        started = time.monotonic()
        try:
            return inspect_image(data, self.limits)
        finally:
            # Updated from several threads without a lock: a lost update only makes the
            # suggested retry delay a little less current.
            elapsed = time.monotonic() - started
            self._mean_seconds += _EWMA_WEIGHT * (elapsed - self._mean_seconds)

    def _finished(self, _: object) -> None:
        self.pending -= 1  # a done callback: runs on the event loop

    def _busy(self, count: int) -> ResourceExhausted:
        queued = max(0, self.pending - self.workers)
        delay = min(_MAX_RETRY, max(_MIN_RETRY, self._mean_seconds * queued / self.workers))
        return ResourceExhausted(
            "IMAGE_CHECKS_BUSY",
            f"no room to check {count} more image(s): {queued} are waiting, the limit is "
            f"{self.max_queued}; retry in {delay:.3f} s",
            {
                "images": count,
                "maxQueuedImageChecks": self.max_queued,
                "retryDelayMs": max(1, round(delay * 1000)),
            },
            retry_delay=delay,
        )
