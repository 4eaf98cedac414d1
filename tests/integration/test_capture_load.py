"""Capture under load, through a real gateway process in front of real Triton (the oracle
models): sampling served results never fails or changes a call. With a tiny writer queue,
concurrent calls overflow it: the overflow is dropped and counted, every call is answered
as with capture off, and the capture files hold exactly the records counted as written,
each matching the call it came from. With room in the queue, every call is captured."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, Oracle, start_gateway
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from fashionserve.gateway.capture import read_capture
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

CALLS = 48
CONCURRENCY = 16
TENANT = "default"  # the tenant of start_gateway's key


@pytest.fixture(scope="module")
def scenes(oracle: Oracle) -> list[bytes]:
    """Four distinct images with one to three garments each."""
    return [
        oracle.scene(320, 240, [((20, 30, 120, 200), 0)]),
        oracle.scene(320, 240, [((20, 30, 120, 200), 0), ((160, 40, 300, 220), 1)]),
        oracle.scene(400, 300, [((10, 10, 90, 150), 2), ((120, 20, 250, 280), 0),
                                ((280, 60, 390, 290), 1)]),
        oracle.scene(240, 320, [((40, 60, 200, 300), 1)]),
    ]  # fmt: skip


@contextmanager
def capturing(
    triton: TritonServer, workdir: Path, captured: Path, **capture: Any
) -> Iterator[Gateway]:
    """A SERVING gateway capturing every image of TENANT (no other tenant) into
    ``captured``, each record written as soon as the writer has shaped it."""
    gateway = start_gateway(
        triton.grpc_url,
        workdir,
        metrics_port=0,
        capture={
            "directory": str(captured),
            "sample_rate": 0.0,
            "tenant_sample_rates": {TENANT: 1.0},
            "include_images": True,
            "max_file_bytes": 1,
            **capture,
        },
    )
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway
    finally:
        gateway.stop()


def call(gateway: Gateway, request_id: str, image: bytes) -> pb.ImageResult:
    request = pb.AnalyzeRequest(image=pb.Image(data=image))
    metadata = (*gateway.auth, ("x-request-id", request_id))
    reply: pb.AnalyzeResponse = gateway.stub.Analyze(request, metadata=metadata, timeout=60)
    return reply.result


def capture_counts(gateway: Gateway) -> dict[str, float]:
    """``fashionserve_capture_records_total`` by outcome, from the metrics endpoint."""
    port = json.loads((gateway.log.parent / "ready.json").read_text())["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts = {"written": 0.0, "dropped": 0.0, "failed": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fashionserve_capture_records_total":
                counts[sample.labels["outcome"]] = sample.value
    return counts


def settled_counts(gateway: Gateway, calls: int) -> dict[str, float]:
    """The counts once every call's record is accounted for. A call's record is queued or
    dropped before its answer is sent; the writer writes the queued ones after, so wait
    for it (a bounded wait for the writer, not a speed check)."""
    deadline = time.monotonic() + 60
    counts = capture_counts(gateway)
    while sum(counts.values()) < calls and time.monotonic() < deadline:
        assert gateway.process.poll() is None, "gateway died:\n" + gateway.log.read_text()
        time.sleep(0.05)
        counts = capture_counts(gateway)
    return counts


def box(b: Any) -> tuple[float, float, float, float]:
    return (b["x_min"], b["y_min"], b["x_max"], b["y_max"])


def proto_box(b: pb.Box) -> tuple[float, float, float, float]:
    return (b.x_min, b.y_min, b.x_max, b.y_max)


def check_records(
    records: list[dict[str, Any]], sent: dict[str, bytes], answers: dict[str, pb.ImageResult]
) -> None:
    """Each record is of a call that was made, once, and says what that call was answered."""
    ids = [r["request_id"] for r in records]
    assert len(set(ids)) == len(ids), "a call captured twice"
    for record in records:
        request_id = record["request_id"]
        assert request_id in sent, f"a record of a call never made: {request_id}"
        image, answer = sent[request_id], answers[request_id]
        assert record["tenant"] == TENANT
        assert record["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert record["image"] == image  # include_images
        assert (record["width"], record["height"]) == (answer.width, answer.height)
        assert {m["name"] for m in record["models"]} >= {"detector", "tagger", "embedder"}
        assert len(record["garments"]) == len(answer.garments), request_id
        assert sorted(box(g["box"]) for g in record["garments"]) == sorted(
            proto_box(g.box) for g in answer.garments
        ), request_id
        for garment in record["garments"]:
            assert len(garment["embedding"]) > 0 and garment["probabilities"]
            assert 0.0 <= garment["margin"] <= 1.0 and 0.0 <= garment["entropy"] <= 1.0


@pytest.fixture(scope="module")
def reference(gw: Gateway, scenes: list[bytes]) -> list[pb.ImageResult]:
    """Each scene as a gateway with capture off answers it."""
    return [call(gw, f"reference-{i}", scene) for i, scene in enumerate(scenes)]


def test_a_full_capture_queue_drops_records_and_no_call(
    own_triton: TritonServer,
    tmp_path: Path,
    scenes: list[bytes],
    reference: list[pb.ImageResult],
) -> None:
    captured = tmp_path / "captured"
    sent = {f"load-{i}": scenes[i % len(scenes)] for i in range(CALLS)}
    with capturing(own_triton, tmp_path / "gw", captured, max_queued_records=1) as gateway:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            futures = {rid: pool.submit(call, gateway, rid, image) for rid, image in sent.items()}
            answers = {rid: future.result() for rid, future in futures.items()}
        counts = settled_counts(gateway, CALLS)

    for i, (rid, answer) in enumerate(answers.items()):
        assert answer == reference[i % len(scenes)], f"{rid} answered unlike with capture off"
    assert counts["failed"] == 0
    assert counts["written"] + counts["dropped"] == CALLS, counts
    assert counts["dropped"] > 0, f"a one-record queue overflowed under load: {counts}"
    records = read_capture(captured)
    assert len(records) == counts["written"]
    check_records(records, sent, answers)


def test_room_in_the_queue_captures_every_call(
    own_triton: TritonServer, tmp_path: Path, scenes: list[bytes], reference: list[pb.ImageResult]
) -> None:
    captured = tmp_path / "captured"
    sent = {f"seq-{i}": scenes[i % len(scenes)] for i in range(12)}
    with capturing(own_triton, tmp_path / "gw", captured) as gateway:
        answers = {rid: call(gateway, rid, image) for rid, image in sent.items()}
        counts = settled_counts(gateway, len(sent))

    assert all(a == reference[i % len(scenes)] for i, a in enumerate(answers.values()))
    assert counts == {"written": len(sent), "dropped": 0, "failed": 0}
    records = read_capture(captured)
    assert sorted(r["request_id"] for r in records) == sorted(sent)
    check_records(records, sent, answers)
