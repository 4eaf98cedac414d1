"""Callers that hold connections, streams or memory, against a real gateway process in
front of a real Triton (the conftest's oracle models).

Each case is an attack an outside review found (issue 13, items 1 and 2) and the guarantee
that now holds: anonymous streams cannot starve the health port nor authenticated calls;
an idle stream is ended; a tenant's open streams are limited; a caller without credentials
costs a small bounded amount of memory whatever it sends, and is told UNAUTHENTICATED.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import SERVICE, Gateway, Oracle, error_reason, start_gateway
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

MIB = 1024 * 1024
ANONYMOUS_STREAMS = 4
TENANT_STREAMS = 2
SETTINGS = {
    "health_port": 0,
    "max_anonymous_streams": ANONYMOUS_STREAMS,
    "max_streams_per_tenant": TENANT_STREAMS,
    "stream_idle_timeout_seconds": 2.0,
    # The default message limit, not the conftest's small one: anonymous bodies this big
    # must cost nothing anyway.
    "max_message_bytes": 64 * MIB,
}
ANONYMOUS_CALLS = 20
ANONYMOUS_BODY_BYTES = 30 * 1000 * 1000


@pytest.fixture(scope="module")
def good() -> bytes:
    return Oracle().scene(320, 240, [((20, 30, 120, 200), 0)], "PNG")


@pytest.fixture(scope="module")
def conn_gw(
    own_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("connections-gw")
    gateway = start_gateway(own_triton.grpc_url, workdir, **SETTINGS)
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway
    finally:
        gateway.stop()


def health_port(gw: Gateway) -> int:
    ready = json.loads((gw.log.parent / "ready.json").read_text())
    port: int = ready["health_port"]
    return port


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def timed_check(channel: grpc.Channel) -> tuple[int, float]:
    started = time.monotonic()
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status), time.monotonic() - started


def stream_requests(
    good: bytes, first: str, hold: threading.Event | None
) -> Iterator[pb.StreamAnalyzeRequest]:
    """One request, then (with ``hold``) the stream kept open, silent, until it is set."""
    yield pb.StreamAnalyzeRequest(request_id=first, image=pb.Image(data=good))
    if hold is not None:
        hold.wait(30)


# ---------------------------------------------------------------------- call slots
def test_anonymous_streams_cannot_starve_health_or_authenticated_calls(
    conn_gw: Gateway, good: bytes
) -> None:
    """Far more anonymous Watch and reflection streams than their budget, on both ports:
    the surplus is refused, and health checks on the health port and on the main port,
    and authenticated calls, are answered as before."""
    hold = threading.Event()
    health_channel = grpc.insecure_channel(f"127.0.0.1:{health_port(conn_gw)}")
    held: list[Any] = []
    refused = []

    def reflection_requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        hold.wait(30)

    try:
        for channel in (conn_gw.channel, health_channel):
            for _ in range(3 * ANONYMOUS_STREAMS):
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(), timeout=30
                )
                held.append(watch)
                try:
                    next(watch)
                except grpc.RpcError as err:
                    refused.append(err.code())
        for _ in range(3 * ANONYMOUS_STREAMS):
            call = reflection_pb2_grpc.ServerReflectionStub(conn_gw.channel).ServerReflectionInfo(
                reflection_requests(), timeout=30
            )
            held.append(call)
            try:
                next(call)
            except grpc.RpcError as err:
                refused.append(err.code())
        # Per port, the first max_anonymous_streams Watch streams are held and the rest
        # refused; all the reflection streams find the main port's budget full.
        budget = ANONYMOUS_STREAMS
        assert len(refused) == 2 * (3 * budget - budget) + 3 * budget
        assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}

        for channel in (health_channel, conn_gw.channel):
            status, took = timed_check(channel)
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert took < 1.0
        assert len(conn_gw.analyze(good).garments) == 1
    finally:
        hold.set()
        for call in held:
            call.cancel()
        health_channel.close()


# ---------------------------------------------------------------------- streams
def test_an_idle_stream_is_ended_after_its_answers(conn_gw: Gateway, good: bytes) -> None:
    hold = threading.Event()
    answers = []
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            for reply in conn_gw.stub.StreamAnalyze(
                stream_requests(good, "first", hold), metadata=conn_gw.auth, timeout=30
            ):
                answers.append(reply)
    finally:
        hold.set()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(info.value) == "STREAM_IDLE"
    assert [a.request_id for a in answers] == ["first"]
    assert len(answers[0].result.garments) == 1
    # Ended by the idle timeout (2 s), not by the caller (30 s) or the call's deadline.
    assert time.monotonic() - started < 10


def test_a_tenant_past_its_open_streams_is_refused_until_one_ends(
    conn_gw: Gateway, good: bytes
) -> None:
    limit = TENANT_STREAMS
    hold = threading.Event()
    held = []
    try:
        for i in range(limit):
            call = conn_gw.stub.StreamAnalyze(
                stream_requests(good, f"held-{i}", hold), metadata=conn_gw.auth, timeout=30
            )
            assert next(call).request_id == f"held-{i}"  # open and served
            held.append(call)
        with pytest.raises(grpc.RpcError) as info:
            list(
                conn_gw.stub.StreamAnalyze(
                    stream_requests(good, "one-too-many", None), metadata=conn_gw.auth, timeout=30
                )
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_reason(info.value) == "TENANT_STREAM_LIMITED"
        # Meanwhile the tenant's unary calls are served.
        assert len(conn_gw.analyze(good).garments) == 1
    finally:
        hold.set()
    for call in held:  # the callers close their streams
        assert list(call) == []
    replies = list(
        conn_gw.stub.StreamAnalyze(
            stream_requests(good, "after", None), metadata=conn_gw.auth, timeout=30
        )
    )
    assert [r.request_id for r in replies] == ["after"]


# ---------------------------------------------------------------------- anonymous bodies
def test_anonymous_large_bodies_keep_memory_bounded(conn_gw: Gateway, good: bytes) -> None:
    """20 calls of 30 MB each, at once, without credentials: each is refused from its
    metadata before its body is read, so the gateway grows by far less than what was sent
    (600 MB; the issue measured about 1 GiB for a few such calls before the fix)."""
    channel = grpc.insecure_channel(
        conn_gw.address, options=[("grpc.max_send_message_length", 64 * MIB)]
    )
    body = pb.AnalyzeRequest(image=pb.Image(data=b"\xff" * ANONYMOUS_BODY_BYTES))
    analyze = channel.unary_unary(
        f"/{SERVICE}/Analyze", request_serializer=pb.AnalyzeRequest.SerializeToString
    )
    pid = conn_gw.process.pid
    before = rss_bytes(pid)
    try:
        for _ in range(2):  # twice: nothing kept between rounds either
            calls = [analyze.future(body, timeout=60) for _ in range(ANONYMOUS_CALLS)]
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call.result()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    finally:
        channel.close()
    growth = rss_bytes(pid) - before
    assert growth < 100 * MIB, f"the gateway grew by {growth / MIB:.0f} MiB"
    assert len(conn_gw.analyze(good).garments) == 1


@pytest.mark.parametrize(
    "body", [b"\xff\xff\xff\xff", b"\x0a\x05\x0a\x03abc\x12\x01"], ids=["garbage", "overrun"]
)
def test_a_malformed_anonymous_body_is_unauthenticated(conn_gw: Gateway, body: bytes) -> None:
    """Not INVALID_ARGUMENT: a caller without credentials learns nothing about its body."""
    for method in ("Analyze", "BatchAnalyze"):
        call = conn_gw.channel.unary_unary(f"/{SERVICE}/{method}")  # raw bytes
        with pytest.raises(grpc.RpcError) as info:
            call(body, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(info.value) == "API_KEY_MISSING"
