"""Small crafted images that are slow to check cannot stall the gateway: while one tenant
sends them back to back at its full quota, health checks are still answered within 100 ms,
and every image gets its clear error.

The images (built in code at test time):

* a progressive JPEG of a 7000 x 7000 canvas in about 200 KB, cut before its end: telling
  it from a JPEG with trailing data takes a 1/8-scale decode of every scan (about 0.2 s);
* the same ending with a PNG's IEND chunk, which once passed for "whole" and was checked
  on the event loop;
* a PNG of a hundred compressed text chunks, each of which inflates to 1 MiB.

They run against a real gateway process (in front of the conftest's oracle Triton, which
they never reach) over a real socket.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from conftest import Gateway, Oracle, encode, start_gateway
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

ORACLE = Oracle()
SERVING = health_pb2.HealthCheckResponse.SERVING
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
MIB = 1024 * 1024
# The attacking tenant's quota, all of which it uses.
ATTACKERS = 8
QUOTA = {"images_per_second": 100.0, "burst_images": 100, "max_concurrent_images": ATTACKERS}
ATTACK_SECONDS = 6.0
HEALTH_P99_SECONDS = 0.1
# Refusals of the tenant's quota or of the image-check queue: the clear error of a caller
# past its share (with a retry delay).
BUSY_REASONS = {"TENANT_RATE_LIMITED", "TENANT_CONCURRENCY_LIMITED", "IMAGE_CHECKS_BUSY"}


# ---------------------------------------------------------------------- the images
def cut_progressive_jpeg(side: int = 7000) -> bytes:
    """A progressive greyscale JPEG of ``side`` x ``side`` pixels, cut before its end."""
    noise = np.random.default_rng(0).integers(126, 130, (side // 8, side // 8), np.uint8)
    canvas = Image.fromarray(noise).resize((side, side), Image.Resampling.NEAREST)
    data = encode(canvas, "JPEG", progressive=True, quality=20)
    return data[: len(data) * 9 // 10]


def png_text_bomb(chunks: int = 100) -> bytes:
    """A small real PNG carrying ``chunks`` zTXt chunks that inflate to 1 MiB each."""
    data = ORACLE.scene(64, 48, [], "PNG")
    body = b"comment\x00\x00" + zlib.compress(b"\x00" * MIB, 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + body))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk * chunks + data[at:]


@dataclass(frozen=True)
class Hostile:
    """A crafted image and the reason it is refused with."""

    data: bytes
    reason: str
    metadata: dict[str, str]


@pytest.fixture(scope="module")
def hostile() -> dict[str, Hostile]:
    jpeg = cut_progressive_jpeg()
    assert 150_000 < len(jpeg) < 300_000, len(jpeg)
    corrupt = {"format": "JPEG"}
    return {
        "cut progressive JPEG of a huge canvas": Hostile(jpeg, "CORRUPT_IMAGE", corrupt),
        "the same ending with a PNG end marker": Hostile(jpeg + PNG_IEND, "CORRUPT_IMAGE", corrupt),
        "PNG of compressed text chunks": Hostile(
            png_text_bomb(),
            "METADATA_TOO_LARGE",
            {"format": "PNG", "maxPngMetadataBytes": str(4 * MIB)},
        ),
    }


@pytest.fixture(scope="module")
def gateway(
    own_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        own_triton.grpc_url,
        tmp_path_factory.mktemp("hostile-images"),
        max_image_pixels=50_000_000,
        tenant_quota=QUOTA,
    )
    try:
        gw.wait_health(SERVING)
        yield gw
    finally:
        gw.stop()


# ---------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str]
    retry_delay: float | None


def outcome_of(err: grpc.RpcError) -> Outcome:
    status = rpc_status.from_call(err)
    assert status is not None, f"{err.code()}: {err.details()}"
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    infos = [d for d in status.details if d.Is(info.DESCRIPTOR)]
    retries = [d for d in status.details if d.Is(retry.DESCRIPTOR)]
    assert len(infos) == 1, "exactly one ErrorInfo"
    infos[0].Unpack(info)
    delay = None
    if retries:
        retries[0].Unpack(retry)
        delay = retry.retry_delay.ToNanoseconds() / 1e9
    return Outcome(err.code(), info.reason, dict(info.metadata), delay)


Calls = list[tuple[int, Outcome | None]]
"""Each call of an attack: the index of its image, and its error (None: analysed)."""


def attack(gw: Gateway, images: list[bytes], stop: threading.Event) -> Callable[[], Calls]:
    """Start ``ATTACKERS`` threads sending ``images`` in turn until ``stop``; returns a
    function that waits for them and gives their calls."""
    results: Calls = []

    def run(offset: int) -> None:
        turn = offset
        while not stop.is_set():
            index = turn % len(images)
            turn += 1
            request = pb.AnalyzeRequest(image=pb.Image(data=images[index]))
            try:
                gw.stub.Analyze(request, metadata=gw.auth, timeout=30)
                results.append((index, None))
            except grpc.RpcError as err:
                got = outcome_of(err)
                results.append((index, got))
                if got.code == EXHAUSTED:
                    time.sleep(0.01)  # refused at once: do not spin

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(ATTACKERS)]
    for thread in threads:
        thread.start()

    def join() -> Calls:
        for thread in threads:
            thread.join(timeout=40)
        return results

    return join


def probe_health(gw: Gateway, stop: threading.Event) -> list[float]:
    """Health Check latencies (seconds), one call every 10 ms until ``stop``, on a channel
    of its own as a kubelet probe has."""
    latencies = []
    with grpc.insecure_channel(gw.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connected
        while not stop.is_set():
            started = time.monotonic()
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            latencies.append(time.monotonic() - started)
            assert reply.status == SERVING
            time.sleep(0.01)
    return latencies


# ---------------------------------------------------------------------- the test
def test_health_stays_fast_while_a_tenant_sends_slow_images_at_its_full_quota(
    gateway: Gateway, hostile: dict[str, Hostile]
) -> None:
    names = list(hostile)
    stop = threading.Event()
    join = attack(gateway, [hostile[n].data for n in names], stop)
    time.sleep(0.5)  # the attack under way
    timer = threading.Timer(ATTACK_SECONDS, stop.set)
    timer.start()
    try:
        latencies = probe_health(gateway, stop)
    finally:
        stop.set()
        timer.cancel()
    calls = join()

    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    assert len(latencies) > 100
    assert p99 < HEALTH_P99_SECONDS, f"health p99 {p99 * 1000:.0f} ms, max {latencies[-1]:.3f} s"

    refused_for_itself = {name: 0 for name in names}
    for index, got in calls:
        name = names[index]
        assert isinstance(got, Outcome), f"{name} was analysed"
        if got.code == EXHAUSTED:
            assert got.reason in BUSY_REASONS, got
            assert got.retry_delay is not None and got.retry_delay > 0, got
            continue
        expected = hostile[name]
        assert (got.code, got.reason) == (INVALID, expected.reason), (name, got)
        assert expected.metadata.items() <= got.metadata.items(), (name, got)
        refused_for_itself[name] += 1
    assert all(refused_for_itself.values()), refused_for_itself

    # The gateway still serves a good image afterwards.
    result = gateway.analyze(ORACLE.scene(320, 240, [((20, 30, 120, 200), 0)], "PNG"))
    assert (result.width, result.height, len(result.garments)) == (320, 240, 1)


def test_each_slow_image_alone_gets_its_error(
    gateway: Gateway, hostile: dict[str, Hostile]
) -> None:
    for name, image in hostile.items():
        with pytest.raises(grpc.RpcError) as info:
            gateway.analyze(image.data)
        got = outcome_of(info.value)
        assert (got.code, got.reason) == (INVALID, image.reason), (name, got)
        assert image.metadata.items() <= got.metadata.items(), (name, got)


def test_a_whole_progressive_jpeg_of_a_large_canvas_is_analysed(gateway: Gateway) -> None:
    """The same kind of file, whole: the check decodes nothing and Triton analyses it."""
    image = np.full((1500, 2000, 3), 255, np.uint8)
    image[100:900, 200:1000] = ORACLE.colours[0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", progressive=True, quality=95)
    result = gateway.analyze(buf.getvalue())
    assert (result.width, result.height, len(result.garments)) == (2000, 1500, 1)
