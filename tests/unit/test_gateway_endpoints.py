"""The endpoint pool's policy: readiness and canaries, pick, ejection and return, retries,
DNS; and the serving monitor's refusal, which names no server.

Each Triton server is a scripted stand-in for :class:`fashionserve.gateway.triton_client.EnsembleClient`
(the unit tier runs no Triton; ``tests/integration/test_gateway_failover.py`` runs the same
behaviour against real ``tritonserver`` processes), and DNS is a scripted resolver, since
the answers of a real one cannot be chosen here.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import pytest
from tritonclient.grpc import model_config_pb2

from fashionserve.gateway.endpoints import (
    EndpointPool,
    RetryBudget,
    canary_image,
    resolve_dns,
    split_target,
)
from fashionserve.gateway.failures import DeadlineExceeded, GatewayError, InternalError, Unavailable
from fashionserve.gateway.monitor import ServingMonitor
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.triton_client import INFERENCE_TIMEOUT, EnsembleClient, EnsembleStatus
from fashionserve.taxonomy import load_taxonomy

TAXONOMY = load_taxonomy()


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return run


class FakeTriton:
    """One server: ready or not, its taxonomy, and how its calls go. Like the real client,
    a call not answered by its deadline raises DEADLINE_EXCEEDED (INFERENCE_TIMEOUT)."""

    def __init__(self, address: str) -> None:
        self.url = address
        self.ready = True
        self.taxonomy_hash = TAXONOMY.hash
        self.error: GatewayError | None = None  # raised by every call while set
        self.delay = 0.0
        self.gate: asyncio.Event | None = None  # calls wait for it while set
        self.calls = 0  # batches, canaries apart
        self.canaries = 0
        self.deadlines: list[float | None] = []
        self.closed = False
        self.tagger_version = 1  # the version its ensemble's tagger step names

    async def status(self) -> EnsembleStatus:
        if not self.ready:
            return EnsembleStatus("connection refused")
        config = model_config_pb2.ModelConfig()
        step = config.ensemble_scheduling.step.add()
        step.model_name, step.model_version = "tagger", self.tagger_version
        config.parameters["taxonomy_hash"].string_value = self.taxonomy_hash
        config.parameters["taxonomy_version"].string_value = "x"
        return EnsembleStatus(config=config)

    async def infer(
        self, images: Sequence[bytes], deadline: float | None = None
    ) -> list[ImageOutput | GatewayError]:
        if list(images) == [canary_image()]:
            self.canaries += 1
        else:
            self.calls += 1
            self.deadlines.append(deadline)
        try:
            async with asyncio.timeout_at(deadline):  # the loop's clock is time.monotonic()
                await asyncio.sleep(self.delay)
                if self.gate is not None:
                    await self.gate.wait()
        except TimeoutError:
            raise DeadlineExceeded(INFERENCE_TIMEOUT, "no answer in time") from None
        if self.error is not None:
            raise self.error
        return [ImageOutput(1, 1, []) for _ in images]

    async def close(self) -> None:
        self.closed = True


class Fleet:
    """The fake servers by address, and a pool over them."""

    def __init__(self) -> None:
        self.servers: dict[str, FakeTriton] = {}

    def connect(self, address: str) -> EnsembleClient:
        self.servers[address] = FakeTriton(address)
        return cast(EnsembleClient, self.servers[address])

    def pool(
        self, targets: Sequence[str], ratio: float = 0.2, burst: int = 10, **kw: Any
    ) -> EndpointPool:
        return EndpointPool(
            targets,
            TAXONOMY,
            self.connect,
            request_timeout_seconds=kw.pop("timeout", 5.0),
            retry_budget=RetryBudget(ratio, burst),
            dns_refresh_seconds=kw.pop("dns_refresh", 60.0),
            eject_after_timeouts=kw.pop("eject_after_timeouts", 3),
            canary_backoff_seconds=kw.pop("canary_backoff", 0.0),
            **kw,
        )


UNREACHABLE = Unavailable("TRITON_UNAVAILABLE", "the inference server cannot be reached")


@aio
async def test_calls_go_to_the_server_with_the_fewest_outstanding() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1"])
    await pool.describe()
    for _ in range(4):  # both idle: in turn
        await pool.infer([b"x"])
    assert [s.calls for s in fleet.servers.values()] == [2, 2]

    gate = asyncio.Event()  # a call that does not return yet (a slow server)
    for server in fleet.servers.values():
        server.gate = gate
    held = asyncio.ensure_future(pool.infer([b"x"]))
    await asyncio.sleep(0.01)
    busy = next(s for s in fleet.servers.values() if s.calls == 3)
    idle = next(s for s in fleet.servers.values() if s is not busy)
    idle.gate = None
    for _ in range(5):
        await pool.infer([b"x"])
    assert (busy.calls, idle.calls) == (3, 7)
    gate.set()
    await held


@aio
async def test_ties_go_to_the_server_picked_longest_ago() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1", "c:1"])
    await pool.describe()
    a, b, c = fleet.servers.values()
    a.gate = asyncio.Event()
    held = asyncio.ensure_future(pool.infer([b"x"]))  # a is busy from now on
    await asyncio.sleep(0.01)
    for _ in range(6):  # b and c tie: in turn, not "first in the list"
        await pool.infer([b"x"])
    assert (a.calls, b.calls, c.calls) == (1, 3, 3)
    a.gate.set()
    await held
    for _ in range(6):  # all idle again: a, picked longest ago, first, then in turn
        await pool.infer([b"x"])
    assert (a.calls, b.calls, c.calls) == (3, 5, 5)


@aio
async def test_a_failed_call_is_retried_elsewhere_and_its_server_taken_out_until_ready() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1"])
    await pool.describe()
    a = fleet.servers["a:1"]
    a.error, a.ready = UNREACHABLE, False
    for _ in range(4):
        assert len(await pool.infer([b"x", b"y"])) == 2
    assert a.calls == 1, "taken out after its first failure"
    assert [e.address for e in pool.admitted] == ["b:1"]

    a.error, a.ready = None, True
    await pool.describe()  # the readiness probe puts it back
    assert {e.address for e in pool.admitted} == {"a:1", "b:1"}
    await asyncio.gather(*(pool.infer([b"x"]) for _ in range(4)))
    assert a.calls > 1


@aio
async def test_with_no_server_left_calls_fail_at_once_with_unavailable() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1"])
    await pool.describe()
    fleet.servers["a:1"].error = UNREACHABLE
    with pytest.raises(Unavailable) as first:
        await pool.infer([b"x"])
    assert first.value.reason == "TRITON_UNAVAILABLE"
    started = time.monotonic()
    with pytest.raises(Unavailable) as then:
        await pool.infer([b"x"], deadline=time.monotonic() + 30)
    assert then.value.reason == "NO_TRITON_SERVING"
    assert time.monotonic() - started < 0.1
    assert fleet.servers["a:1"].calls == 1


@aio
async def test_retries_stay_within_the_budget() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1", "c:1"], ratio=0.5, burst=1)
    await pool.describe()
    for server in fleet.servers.values():
        server.error = UNREACHABLE
    with pytest.raises(Unavailable):
        await pool.infer([b"x"])
    # One token (the burst) plus half a token earned: one retry, so two servers tried.
    assert sum(s.calls for s in fleet.servers.values()) == 2

    budget = RetryBudget(ratio=0.2, burst=2)
    assert [budget.spend() for _ in range(3)] == [True, True, False]
    for _ in range(10):
        budget.earn()
    assert [budget.spend() for _ in range(3)] == [True, True, False]  # 10 calls: 2 retries


@aio
async def test_calls_that_time_out_in_a_row_eject_the_server_whoever_set_the_deadline() -> None:
    fleet = Fleet()
    # No retries: a timed-out call fails, so that the timeouts can be counted.
    pool = fleet.pool(["a:1", "b:1"], ratio=0, burst=0, timeout=30.0, eject_after_timeouts=3)
    await pool.describe()
    a, b = fleet.servers.values()
    a.gate = asyncio.Event()  # hung: its status probe still passes
    timed_out = 0
    for _ in range(10):  # the caller's deadline, far shorter than the request timeout
        try:
            await pool.infer([b"x"], deadline=time.monotonic() + 0.02)
        except DeadlineExceeded as exc:
            assert exc.reason == INFERENCE_TIMEOUT
            timed_out += 1
    assert (timed_out, a.calls, b.calls) == (3, 3, 7)
    assert [e.address for e in pool.admitted] == ["b:1"]
    assert "3 calls in a row timed out" in pool.endpoints["a:1"].problem

    fleet2 = Fleet()  # an answer, even an error, ends a run of timeouts
    pool2 = fleet2.pool(["a:1"], eject_after_timeouts=2)
    await pool2.describe()
    only = fleet2.servers["a:1"]
    only.gate = asyncio.Event()
    with pytest.raises(DeadlineExceeded):
        await pool2.infer([b"x"], deadline=time.monotonic() + 0.02)
    only.gate, only.error = None, InternalError("INFERENCE_FAILED", "the models failed")
    with pytest.raises(InternalError):
        await pool2.infer([b"x"])
    only.gate, only.error = asyncio.Event(), None
    with pytest.raises(DeadlineExceeded):
        await pool2.infer([b"x"], deadline=time.monotonic() + 0.02)
    assert len(pool2.admitted) == 1, "two timeouts, but not in a row"


@aio
async def test_an_ejected_server_returns_only_after_a_canary_passes_with_backoff() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1"], timeout=0.1, canary_backoff=0.3)
    await pool.describe()
    a = fleet.servers["a:1"]
    assert a.canaries == 1, "admitted at start by a canary too"
    a.error = UNREACHABLE
    await pool.infer([b"x"])  # a fails, b answers
    assert [e.address for e in pool.admitted] == ["b:1"]
    # a is back up but hangs on inference, while its status probe passes.
    a.error, a.gate = None, asyncio.Event()
    await pool.describe()
    assert a.canaries == 1, "no canary within 0.3 s of the ejection"
    await asyncio.sleep(0.3)
    await pool.describe()  # its canary times out (the 0.1 s request timeout)
    assert a.canaries == 2 and "canary inference failed" in pool.endpoints["a:1"].problem
    await asyncio.sleep(0.2)  # the next waits 0.6 s: not yet
    await pool.describe()
    assert a.canaries == 2
    await asyncio.sleep(0.45)
    a.gate = None  # a answers again
    await pool.describe()
    assert a.canaries == 3
    assert {e.address for e in pool.admitted} == {"a:1", "b:1"}
    assert a.calls == 1, "no call but canaries while it was out"


@aio
async def test_a_refusal_names_no_server_and_quotes_no_triton_text() -> None:
    fleet = Fleet()
    pool = fleet.pool(["10.1.2.3:8001"])
    monitor = ServingMonitor(pool, TAXONOMY, interval=60)
    fleet.servers["10.1.2.3:8001"].ready = False
    with pytest.raises(Unavailable) as info:
        await monitor.require_serving()
    assert info.value.reason == "NOT_SERVING"
    assert "10.1.2.3" in monitor.problem and "connection refused" in monitor.problem
    said = f"{info.value.message} {info.value.metadata}"
    assert "10.1.2.3" not in said and "8001" not in said and "refused" not in said
    with pytest.raises(Unavailable) as none:
        await pool.infer([b"x"])
    assert "10.1.2.3" not in f"{none.value.message} {none.value.metadata}"


@aio
async def test_no_retry_past_the_deadline_and_one_caller_timeout_takes_no_server_out() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1"], timeout=5.0)
    await pool.describe()
    for server in fleet.servers.values():
        server.error = DeadlineExceeded("INFERENCE_TIMEOUT", "too slow")
        server.delay = 0.05
    deadline = time.monotonic() + 0.03  # shorter than the request timeout
    with pytest.raises(DeadlineExceeded):
        await pool.infer([b"x"], deadline=deadline)
    assert sum(s.calls for s in fleet.servers.values()) == 1
    assert all(d == deadline for s in fleet.servers.values() for d in s.deadlines)
    assert len(pool.admitted) == 2, "one timeout is not a run of them"


@aio
async def test_errors_another_server_would_repeat_are_not_retried() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1"])
    await pool.describe()
    for server in fleet.servers.values():
        server.error = InternalError("INFERENCE_FAILED", "the models failed")
    with pytest.raises(InternalError):
        await pool.infer([b"x"])
    assert sum(s.calls for s in fleet.servers.values()) == 1
    assert len(pool.admitted) == 2


@aio
async def test_only_servers_with_the_gateways_taxonomy_are_admitted() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1"])
    fleet.servers["a:1"].taxonomy_hash = "other"
    state = await pool.describe()
    assert [e.address for e in pool.admitted] == ["b:1"]
    assert state.taxonomy_hash == TAXONOMY.hash

    fleet.servers["b:1"].ready = False
    state = await pool.describe()
    assert pool.admitted == []
    assert state.ready and state.taxonomy_hash == "other"  # so the monitor names the mismatch

    fleet.servers["a:1"].ready = False
    state = await pool.describe()
    assert not state.ready and "a:1: connection refused" in state.problem


@aio
async def test_a_dns_name_becomes_one_endpoint_per_address_re_resolved() -> None:
    answers: list[list[str] | OSError] = [
        ["10.0.0.1:8001", "10.0.0.2:8001"],
        ["10.0.0.2:8001", "10.0.0.3:8001"],
        OSError("temporary failure in name resolution"),
    ]
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    fleet = Fleet()
    pool = fleet.pool(["dns:///triton.ns.svc.cluster.local:8001"], resolver=resolver, dns_refresh=0)
    await pool.describe()
    assert asked == [("triton.ns.svc.cluster.local", 8001)]
    assert sorted(pool.endpoints) == ["10.0.0.1:8001", "10.0.0.2:8001"]
    await pool.describe()
    assert sorted(pool.endpoints) == ["10.0.0.2:8001", "10.0.0.3:8001"]
    assert fleet.servers["10.0.0.1:8001"].closed
    await pool.describe()  # a failed lookup keeps what was known
    assert sorted(pool.endpoints) == ["10.0.0.2:8001", "10.0.0.3:8001"]
    assert len(pool.admitted) == 2


@aio
async def test_the_real_resolver_reads_the_hosts_file() -> None:
    assert "127.0.0.1:8001" in await resolve_dns("localhost", 8001)


def test_targets() -> None:
    assert split_target("triton:8001") == ("triton", 8001, False)
    assert split_target("dns:///triton.ns:8001") == ("triton.ns", 8001, True)
    assert split_target("[::1]:8001") == ("::1", 8001, False)


@aio
async def test_a_call_naming_model_versions_goes_only_where_they_are_served() -> None:
    fleet = Fleet()
    pool = fleet.pool(["a:1", "b:1", "c:1"])
    fleet.servers["c:1"].tagger_version = 2  # a rollout switched one server of three
    await pool.describe()
    old = pool.preferred_versions()  # what most servers serve: a new stream keeps to it
    assert old is not None and "tagger:1" in old
    for _ in range(6):
        await pool.infer([b"x"], versions=old)
    assert [s.calls for s in fleet.servers.values()] == [3, 3, 0]

    for server in fleet.servers.values():  # the rollout goes on: every server switched
        server.tagger_version = 2
    await pool.describe()
    with pytest.raises(Unavailable) as refused:
        await pool.infer([b"x"], versions=old)
    assert refused.value.reason == "SERVED_VERSION_CHANGED"
    assert "open a new stream" in refused.value.message
    assert "tagger:2" in (pool.preferred_versions() or "")
    await pool.infer([b"x"])  # a call naming no versions goes anywhere
