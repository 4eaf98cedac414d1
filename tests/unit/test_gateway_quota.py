"""Per-tenant quotas and overload bounds (fashionserve.gateway.quota) on a fake clock, the RetryInfo they
send, and the client honouring it. The in-process store; the shared one (a real Valkey
server) is in test_quota_backend.py."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from pydantic import ValidationError

from fashionserve.clients.errors import FashionServeError
from fashionserve.clients.retry import RetryPolicy
from fashionserve.errors import ErrorKind
from fashionserve.gateway.errors import to_rpc_status
from fashionserve.gateway.failures import GatewayError, ResourceExhausted
from fashionserve.gateway.quota import Admission
from fashionserve.gateway.quota_store import _PRUNE_AT
from fashionserve.gateway.settings import GatewaySettings, load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: Any) -> GatewaySettings:
    base: dict[str, Any] = {
        "auth_enabled": False,
        "max_images_per_batch_request": 4,
        "tenant_quota": {"images_per_second": 10, "burst_images": 4, "max_concurrent_images": 6},
    }
    return load_settings(**{**base, **overrides})


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=60))

    return run


async def refusal(admission: Admission, tenant: str, images: int) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as info:
        async with admission.admit(tenant, images):
            pass
    return info.value


@aio
async def test_a_tenant_over_its_rate_is_refused_with_the_time_its_bucket_needs() -> None:
    clock = Clock()
    admission = Admission(settings(), queued=lambda: 0, clock=clock)
    for _ in range(4):  # the burst
        async with admission.admit("acme", 1):
            pass
    err = await refusal(admission, "acme", 1)
    assert err.kind == ErrorKind.RESOURCE_EXHAUSTED
    assert err.reason == "TENANT_RATE_LIMITED"
    assert err.retry_delay == pytest.approx(0.1)  # 1 image at 10/s
    assert err.metadata == {
        "tenant": "acme",
        "limit": "images_per_second",
        "images": "1",
        "retryDelayMs": "100",
    }
    # Another tenant is untouched.
    async with admission.admit("other", 4):
        pass
    # Waiting the suggested delay is enough.
    clock.now += err.retry_delay or 0
    async with admission.admit("acme", 1):
        pass


@aio
async def test_a_batch_costs_one_token_per_image_and_a_refusal_costs_nothing() -> None:
    clock = Clock()
    admission = Admission(settings(), queued=lambda: 0, clock=clock)
    async with admission.admit("acme", 3):
        pass
    err = await refusal(admission, "acme", 2)  # 1 token left
    assert err.retry_delay == pytest.approx(0.1)
    clock.now += 0.1
    async with admission.admit("acme", 2):  # the refused call spent nothing
        pass


@aio
async def test_concurrency_is_limited_per_tenant_and_released_when_calls_end() -> None:
    low = settings(tenant_quota={"max_concurrent_images": 5, "burst_images": 100})
    admission = Admission(low, queued=lambda: 0, clock=Clock())
    async with admission.admit("acme", 4):
        err = await refusal(admission, "acme", 2)
        assert err.reason == "TENANT_CONCURRENCY_LIMITED"
        assert err.retry_delay is not None and err.retry_delay > 0
        async with admission.admit("other", 4):  # per tenant
            pass
    async with admission.admit("acme", 4), admission.admit("acme", 1):
        pass
    assert admission.in_flight == 0


@aio
async def test_global_bounds_refuse_every_tenant_at_once() -> None:
    queued = [0]
    admission = Admission(
        settings(max_images_in_flight=5, max_queued_images=4),
        queued=lambda: queued[0],
        clock=Clock(),
    )
    async with admission.admit("a", 4):
        err = await refusal(admission, "b", 2)
        assert (err.reason, err.metadata["limit"]) == ("GATEWAY_OVERLOADED", "max_images_in_flight")
    queued[0] = 3
    err = await refusal(admission, "b", 2)
    assert (err.reason, err.metadata["limit"]) == ("GATEWAY_OVERLOADED", "max_queued_images")
    assert err.retry_delay is not None and err.retry_delay > 0


@aio
async def test_per_tenant_overrides_keep_the_default_for_fields_left_out() -> None:
    s = settings(tenant_quotas={"big": {"images_per_second": 100}})
    assert s.quota_for("big").images_per_second == 100
    assert s.quota_for("big").burst_images == 4
    assert s.quota_for("small") == s.tenant_quota
    clock = Clock()
    admission = Admission(s, queued=lambda: 0, clock=clock)
    for tenant in ("big", "small"):
        async with admission.admit(tenant, 4):
            pass
    assert (await refusal(admission, "big", 4)).retry_delay == pytest.approx(0.04)
    assert (await refusal(admission, "small", 4)).retry_delay == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"tenant_quota": {"burst_images": 3}}, "tenant_quota.burst_images"),
        ({"tenant_quotas": {"t": {"max_concurrent_images": 2}}}, "tenant_quotas.t"),
        ({"max_queued_images": 3}, "max_queued_images"),
        ({"tenant_quotas": {"t": {"burst": 9}}}, "burst"),  # unknown field
    ],
)
def test_a_limit_no_batch_call_could_pass_is_refused_at_start(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        settings(**overrides)


@aio
async def test_idle_tenants_are_forgotten_so_the_table_stays_bounded() -> None:
    clock = Clock()
    admission = Admission(settings(), queued=lambda: 0, clock=clock)
    for i in range(3 * _PRUNE_AT):
        async with admission.admit(f"tenant-{i}", 1):
            pass
        clock.now += 0.01
    assert len(admission.local.tenants) <= _PRUNE_AT + 1


def test_refusal_carries_retry_info_and_the_client_waits_at_least_that() -> None:
    err = ResourceExhausted("TENANT_RATE_LIMITED", "slow down", {"tenant": "a"}, retry_delay=1.25)
    status = to_rpc_status(err)
    assert len(status.details) == 2
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 1_250_000_000
    # Errors without a delay keep exactly one detail (ErrorInfo).
    assert len(to_rpc_status(GatewayError("X", "y")).details) == 1

    class Call(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return status.message

        def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
            return (("grpc-status-details-bin", status.SerializeToString()),)

    failure = FashionServeError.from_rpc_error(Call())
    assert (failure.reason, failure.retry_delay) == ("TENANT_RATE_LIMITED", 1.25)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.1)
    state = policy.start(timeout=10)
    assert state.next_delay(failure.code, failure.retry_delay) == 1.25
    # Without RetryInfo RESOURCE_EXHAUSTED is final (a message over the size limit).
    assert policy.start(timeout=10).next_delay(grpc.StatusCode.RESOURCE_EXHAUSTED) is None
    # Never past the deadline.
    assert policy.start(timeout=1.0).next_delay(failure.code, 1.25) is None
