"""The image-check pool: checks run off the event loop, on a bounded pool sized to the CPU
limit, behind a bounded queue that refuses at once when full."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from fashionserve.errors import ErrorKind
from fashionserve.gateway import image_checks
from fashionserve.gateway.failures import InvalidArgument, ResourceExhausted
from fashionserve.gateway.image_checks import ImageCheckPool, cpu_limit
from fashionserve.gateway.validation import ImageInfo, ImageLimits, inspect_image

LIMITS = ImageLimits(
    max_image_bytes=1_000_000,
    max_image_pixels=1_000_000,
    max_jpeg_scans=100,
    max_png_chunks=100,
    max_png_metadata_bytes=100_000,
)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 16), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------ CPU limit
@pytest.mark.parametrize(("cpu_max", "cpus"), [("150000 100000\n", 2), ("50000 100000\n", 1)])
def test_the_pool_is_sized_to_the_cgroup_quota(tmp_path: Path, cpu_max: str, cpus: int) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert cpu_limit(tmp_path / "cpu.max") == cpus


@pytest.mark.parametrize("cpu_max", ["max 100000\n", None])
def test_without_a_quota_the_pool_is_sized_to_the_cpus_it_may_run_on(
    tmp_path: Path, cpu_max: str | None
) -> None:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    assert cpu_limit(tmp_path / "cpu.max") == len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------ checks
def test_each_image_gets_its_outcome_checked_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[str] = []

    def recording(data: bytes, limits: ImageLimits) -> ImageInfo:
        threads.append(threading.current_thread().name)
        return inspect_image(data, limits)

    monkeypatch.setattr(image_checks, "inspect_image", recording)

    async def main() -> list[ImageInfo | object]:
        pool = ImageCheckPool(LIMITS, workers=2, max_queued=4)
        try:
            return list(await pool.check([png(), b"not an image", png()]))
        finally:
            pool.close()

    good, bad, again = asyncio.run(main())
    assert isinstance(good, ImageInfo) and (good.width, good.height) == (32, 16)
    assert isinstance(bad, InvalidArgument) and bad.reason == "NOT_AN_IMAGE"
    assert isinstance(again, ImageInfo)
    assert len(threads) == 3 and all(name.startswith("image-check") for name in threads)


def test_an_unexpected_failure_is_the_generic_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(data: bytes, limits: ImageLimits) -> ImageInfo:
        raise RuntimeError("a bug, with internal details")

    monkeypatch.setattr(image_checks, "inspect_image", broken)

    async def main() -> object:
        pool = ImageCheckPool(LIMITS, workers=1, max_queued=1)
        try:
            return (await pool.check([png()]))[0]
        finally:
            pool.close()

    outcome = asyncio.run(main())
    assert getattr(outcome, "kind", None) is ErrorKind.INTERNAL
    assert "internal details" not in str(outcome)


# ------------------------------------------------------------------------ the bound
@pytest.fixture
def blocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Checks wait until the event is set (set at the end in any case)."""
    release = threading.Event()

    def waiting(data: bytes, limits: ImageLimits) -> ImageInfo:
        assert release.wait(10)
        return ImageInfo("PNG", 1, 1, len(data))

    monkeypatch.setattr(image_checks, "inspect_image", waiting)
    yield release
    release.set()


def test_past_its_queue_the_pool_refuses_whole_calls_at_once(blocked: threading.Event) -> None:
    """One worker and two places: three images are taken, a fourth is refused at once
    with a retry delay, and a call of two is refused whole (nothing of it queued)."""

    async def main() -> None:
        pool = ImageCheckPool(LIMITS, workers=1, max_queued=2)
        first = asyncio.create_task(pool.check([b"a"]))
        second = asyncio.create_task(pool.check([b"b", b"c"]))
        await asyncio.sleep(0.05)
        assert pool.pending == 3
        for images in ([b"d"], [b"e", b"f"]):
            with pytest.raises(ResourceExhausted) as info:
                await pool.check(images)
            err = info.value
            assert err.reason == "IMAGE_CHECKS_BUSY"
            assert err.metadata["maxQueuedImageChecks"] == "2"
            assert err.metadata["images"] == str(len(images))
            assert err.retry_delay is not None and err.retry_delay > 0
            assert pool.pending == 3
        blocked.set()
        assert len(await first) == 1 and len(await second) == 2
        assert pool.pending == 0
        assert len(await pool.check([b"g", b"h", b"i"])) == 3  # room again
        pool.close()

    asyncio.run(main())


def test_a_caller_that_goes_away_keeps_its_place_until_its_check_is_done(
    blocked: threading.Event,
) -> None:
    """The queue's count is what the threads really have left, so cancelled callers cannot
    pile up work behind the bound."""

    async def main() -> None:
        pool = ImageCheckPool(LIMITS, workers=1, max_queued=1)
        caller = asyncio.create_task(pool.check([b"a", b"b"]))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert pool.pending == 2
        with pytest.raises(ResourceExhausted):
            await pool.check([b"c"])
        blocked.set()
        for _ in range(100):
            if pool.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.pending == 0
        pool.close()

    asyncio.run(main())
