"""Connections, call budgets and streams: the real gateway server in-process on port 0.

Triton is an address where nothing listens: health, reflection, auth and the call budgets
answer without it. What needs a real Triton and a gateway process (memory under anonymous
load, idle streams with answers) is in tests/integration/test_hostile_connections.py.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from fashionserve.gateway.auth.keys import create_key
from fashionserve.gateway.core import IdleLimit, RawOptions, StreamItem
from fashionserve.gateway.failures import ResourceExhausted
from fashionserve.gateway.quota import Admission
from fashionserve.gateway.server import GatewayServer, connection_options, create_server
from fashionserve.gateway.settings import load_settings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

SERVICE = "fashion.v1.FashionAnalysisService"


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=60))

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[GatewayServer]:
    settings = load_settings(
        listen_address="127.0.0.1:0",
        triton_urls=[f"127.0.0.1:{_free_port()}"],  # nothing listens there
        health_check_interval_seconds=0.2,
        **{"auth_enabled": False, **overrides},
    )
    server, _ = await create_server(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def channel_to(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None, err
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


async def open_watches(channel: grpc.aio.Channel, n: int) -> list[Any]:
    """``n`` health Watch streams, each past its first answer (so it holds a call slot)."""
    calls = [
        health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()) for _ in range(n)
    ]
    for call in calls:
        await call.read()
    return calls


# ------------------------------------------------------------------ call budgets
@aio
async def test_anonymous_streams_cannot_take_the_slots_of_checks_or_service_calls() -> None:
    async with (
        gateway(max_anonymous_streams=2, max_concurrent_rpcs=2) as server,
        channel_to(server.port) as channel,
    ):
        watches = await open_watches(channel, 2)
        refused = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused.read()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_info(info.value)
        assert details.reason == "TOO_MANY_CALLS"
        assert details.metadata["limit"] == "max_anonymous_streams"
        # Reflection is a credential-free stream too: the same budget.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in reflection:
                pass
        assert error_info(info.value).reason == "TOO_MANY_CALLS"
        # Health checks and the service's calls keep their own slots.
        assert await check(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.FashionAnalysisServiceStub(channel)
        reply = await stub.GetTaxonomy(pb.GetTaxonomyRequest(), timeout=5)
        assert reply.hash
        for watch in watches:
            watch.cancel()
        await asyncio.sleep(0.2)
        # A slot is given back when its call ends.
        (again,) = await open_watches(channel, 1)
        again.cancel()


@aio
async def test_service_calls_past_max_concurrent_rpcs_are_refused_at_once() -> None:
    async with gateway(max_concurrent_rpcs=1) as server, channel_to(server.port) as channel:
        stub = pb_grpc.FashionAnalysisServiceStub(channel)
        stream = stub.StreamAnalyze()  # held open: the one call allowed
        await stream.wait_for_connection()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetTaxonomy(pb.GetTaxonomyRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(info.value).metadata["limit"] == "max_concurrent_rpcs"
        # Health does not count against the service's budget.
        assert await check(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        await stream.done_writing()
        async for _ in stream:
            pass
        assert (await stub.GetTaxonomy(pb.GetTaxonomyRequest(), timeout=5)).version


# ------------------------------------------------------------------ the health port
@aio
async def test_the_health_port_serves_health_alone_and_keeps_answering() -> None:
    async with gateway(health_port=0, max_anonymous_streams=2) as server:
        assert server.health_port is not None and server.health_port != server.port
        async with channel_to(server.health_port) as health, channel_to(server.port) as main:
            # Both ports tell the same, for both services.
            for service in ("", SERVICE):
                assert await check(health, service) == await check(main, service)
            # Anonymous streams on the main port do not touch the health port's budgets,
            # and those on the health port do not take its checks' slots.
            main_watches = await open_watches(main, 2)
            health_watches = await open_watches(health, 2)
            assert await check(health) == health_pb2.HealthCheckResponse.NOT_SERVING
            # Nothing but health is served there.
            stub = pb_grpc.FashionAnalysisServiceStub(health)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetTaxonomy(pb.GetTaxonomyRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            for watch in (*main_watches, *health_watches):
                watch.cancel()


@aio
async def test_without_health_port_there_is_one_port() -> None:
    async with gateway() as server:
        assert server.health_port is None and server.health_server is None


@aio
async def test_reflection_can_be_turned_off() -> None:
    async with gateway(reflection_enabled=False) as server, channel_to(server.port) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_connection_options_come_from_the_settings() -> None:
    settings = load_settings(
        auth_enabled=False,
        max_streams_per_connection=7,
        keepalive_time_seconds=11,
        keepalive_timeout_seconds=3,
        min_client_ping_interval_seconds=5,
        max_connection_idle_seconds=60,
        max_connection_age_seconds=120,
        max_connection_age_grace_seconds=9.5,
    )
    options = dict(connection_options(settings))
    assert options["grpc.max_concurrent_streams"] == 7
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (
        11_000,
        3_000,
    )
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] == 5_000
    assert options["grpc.max_connection_idle_ms"] == 60_000
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 9_500


# ------------------------------------------------------------------ anonymous bodies
@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("Analyze", b"\xff\xff\xff\xff"),  # does not parse
        ("BatchAnalyze", b"\x08" + b"\xff" * 11),  # an over-long varint
        ("Analyze", pb.AnalyzeRequest(image=pb.Image(data=b"x" * 100_000)).SerializeToString()),
    ],
    ids=["garbage", "over-long varint", "well-formed"],
)
@aio
async def test_a_call_without_credentials_is_unauthenticated_whatever_its_body(
    tmp_path: Path, method: str, body: bytes
) -> None:
    keys = tmp_path / "keys.yaml"
    create_key(keys, "dev")
    async with (
        gateway(auth_enabled=True, api_keys_file=keys) as server,
        channel_to(server.port) as channel,
    ):
        call = channel.unary_unary(f"/{SERVICE}/{method}")  # raw bytes
        for metadata in ((), (("x-api-key", "dev.wrong-secret"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(body, metadata=metadata, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
        stream = channel.stream_stream(f"/{SERVICE}/StreamAnalyze")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream(iter([body]), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------------ streams
def test_a_tenant_has_at_most_max_streams_per_tenant_open() -> None:
    admission = Admission(
        load_settings(auth_enabled=False, max_streams_per_tenant=2), queued=lambda: 0
    )
    with admission.open_stream("acme"), admission.open_stream("acme"):
        with pytest.raises(ResourceExhausted) as info, admission.open_stream("acme"):
            pass
        assert info.value.reason == "TENANT_STREAM_LIMITED"
        assert info.value.metadata["limit"] == "max_streams_per_tenant"
        with admission.open_stream("other"):  # another tenant's streams are its own
            pass
    with admission.open_stream("acme"):  # given back when the streams end
        pass


async def _requests(gaps: list[float]) -> AsyncIterator[StreamItem]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield StreamItem(str(i), b"", RawOptions())


@aio
async def test_a_stream_idle_past_its_timeout_stops_being_read() -> None:
    idle = IdleLimit(0.2)
    read = [item.request_id async for item in idle.read(_requests([0.0, 0.1, 0.5, 0.0]))]
    assert read == ["0", "1"]
    assert idle.exceeded is not None
    assert (idle.exceeded.reason, idle.exceeded.metadata) == (
        "STREAM_IDLE",
        {"streamIdleTimeoutSeconds": "0.2"},
    )


@aio
async def test_time_the_gateway_spends_not_reading_is_not_idle() -> None:
    idle = IdleLimit(0.2)
    read = []
    async for item in idle.read(_requests([0.0, 0.1, 0.1])):
        read.append(item.request_id)
        await asyncio.sleep(0.3)  # busy answering: the caller is not asked for more
    assert read == ["0", "1", "2"] and idle.exceeded is None
