"""Several Triton servers, one failing, and the gateway's own stop: real processes only.

Real ``tritonserver`` processes serving the conftest's oracle models (the packaged taxonomy
declared, so the gateway decodes them), a real ``fashionserve gateway`` process, and client
threads calling it over loopback gRPC with no client-side retries, so that every failure
the gateway lets through is counted. A Triton is "killed" with SIGKILL to its whole process
group (Triton and its python-backend stubs), as a node failure or an OOM kill would, or
"hung" with SIGSTOP to the server process: it keeps its sockets open and answers nothing.
No error a caller gets names a Triton or quotes Triton's own text.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import SERVICE, Load, Oracle, start_gateway, start_triton
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALL_TIMEOUT = 10.0  # seconds: each call's deadline


def kill(server: TritonServer) -> None:
    """SIGKILL Triton and its stubs, then reap them (and free their shared memory)."""
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()


def restart(server: TritonServer, log_dir: Path) -> TritonServer:
    """A new Triton on the same ports and repository (ready when this returns)."""
    return TritonServer(
        server.repository,
        grpc_port=server.grpc_port,
        http_port=server.http_port,
        metrics_port=server.metrics_port,
        log_file=log_dir / "triton-restarted.log",
        ready_timeout=120,
    ).start()


def assert_names_no_triton(details: str, err: grpc.RpcError | None, *servers: TritonServer) -> None:
    """An error's message and ErrorInfo metadata name no Triton and quote no gRPC or Triton
    text about it."""
    said = details
    status = rpc_status.from_call(err) if err is not None else None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        said += f" {dict(info.metadata)}"
    for server in servers:
        assert f":{server.grpc_port}" not in said, said
    for internal in ("127.0.0.1", "localhost", "ipv4", "Connection refused", "Socket closed"):
        assert internal not in said, said


def served(server: TritonServer) -> float:
    """How many ensemble calls this Triton has run (its Prometheus metrics)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    prefix = 'nv_inference_request_success{model="fashion_pipeline"'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


@pytest.fixture
def scene(oracle: Oracle) -> bytes:
    return oracle.scene(320, 240, [((20, 30, 120, 200), 0), ((160, 40, 300, 220), 1)])


@pytest.fixture
def spare_triton(own_repo: Path, tmp_path: Path) -> Iterator[TritonServer]:
    """A Triton of this test's own, which it may kill."""
    server = start_triton(own_repo, tmp_path / "spare")
    try:
        yield server
    finally:
        server.stop()


def test_two_tritons_one_killed_under_load_no_call_fails(
    own_triton: TritonServer, spare_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    gateway = start_gateway([spare_triton.grpc_url, own_triton.grpc_url], tmp_path / "gw")
    try:
        gateway.wait_health(SERVING)
        before = served(spare_triton)
        with Load(gateway, scene) as load:
            time.sleep(1.5)
            # Both servers take calls (least outstanding spreads them).
            assert served(spare_triton) > before
            kill(spare_triton)
            killed_at = time.monotonic()
            time.sleep(2.0)
        assert load.failures() == []
        after_kill = [c for c in load.calls if c.started > killed_at]
        assert len(after_kill) >= 5, "the survivor kept serving"
        assert gateway.health() == SERVING
        assert "taken out" in gateway.log.read_text()
    finally:
        gateway.stop()


def test_a_hung_triton_is_ejected_after_a_few_timeouts_and_returns_after_a_canary(
    own_triton: TritonServer, spare_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    """Callers' deadlines (0.6 s) far shorter than the gateway's request timeout (30 s): the
    timeouts still count against the stopped server, and eject it (after two in a row)
    before its status probe, which waits 2 s for an answer, finds it out."""
    gateway = start_gateway(
        [spare_triton.grpc_url, own_triton.grpc_url],
        tmp_path / "gw",
        triton_eject_after_timeouts=2,
        triton_canary_backoff_seconds=0.5,
    )
    assert spare_triton.pid is not None
    try:
        gateway.wait_health(SERVING)
        with Load(gateway, scene, timeout=0.6) as load:
            time.sleep(1.0)
            assert served(spare_triton) > 0, "both servers take calls"
            # The server alone: stubs stopped too can find the python backend's shared-memory
            # locks broken on resume (Triton then aborts with boost's lock_exception).
            os.kill(spare_triton.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            time.sleep(5.0)
            os.kill(spare_triton.pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            time.sleep(1.0)  # its calls held at the stop are answered (to no one) by now
            resumed = served(spare_triton)
            time.sleep(3.0)
        failures = load.failures()
        assert failures, "calls were sent to the stopped server"
        # At most the calls of two rounds of batches hung on it (each round: every caller).
        assert len(failures) <= 2 * load.threads, "a few timeouts, then ejected"
        assert {c.code for c in failures} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        for call in failures:
            assert_names_no_triton(call.details, None, spare_triton, own_triton)
        later = [c for c in load.calls if stopped_at + 3.5 < c.started < resumed_at]
        assert len(later) >= 5 and all(c.code == grpc.StatusCode.OK for c in later)
        assert served(spare_triton) > resumed + 1, "back in the pool: its canary, then calls"
        log = gateway.log.read_text()
        taken_out = log.index(f"Triton endpoint {spare_triton.grpc_url} taken out")
        ejection = log[taken_out:].splitlines()[0]
        assert "2 calls in a row timed out" in ejection, ejection
        readmitted = f"Triton endpoint {spare_triton.grpc_url} is serving (its canary inference"
        assert readmitted in log[taken_out:]
        assert gateway.health() == SERVING
    finally:
        os.kill(spare_triton.pid, signal.SIGCONT)
        gateway.stop()


def test_a_dns_name_is_resolved_to_the_servers_behind_it(
    own_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    """As the Helm chart configures it (dns:/// of Triton's headless Service)."""
    gateway = start_gateway(f"dns:///localhost:{own_triton.grpc_port}", tmp_path / "gw")
    try:
        gateway.wait_health(SERVING)
        assert len(gateway.analyze(scene).garments) == 2
        assert f"Triton endpoint 127.0.0.1:{own_triton.grpc_port} is serving" in (
            gateway.log.read_text()
        )
    finally:
        gateway.stop()


def test_the_only_triton_killed_fails_fast_then_recovers(
    spare_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    gateway = start_gateway(spare_triton.grpc_url, tmp_path / "gw")
    restarted: TritonServer | None = None
    try:
        gateway.wait_health(SERVING)
        assert len(gateway.analyze(scene).garments) == 2
        kill(spare_triton)
        for _ in range(5):  # in flight at the kill, then refused: UNAVAILABLE, at once
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                gateway.stub.Analyze(
                    pb.AnalyzeRequest(image=pb.Image(data=scene)),
                    metadata=gateway.auth,
                    timeout=CALL_TIMEOUT,
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert time.monotonic() - started < 2.0, "no waiting for the deadline"
            assert_names_no_triton(info.value.details() or "", info.value, spare_triton)
        gateway.wait_health(NOT_SERVING, timeout=5)

        restarted = restart(spare_triton, tmp_path)
        back = time.monotonic()
        while True:
            try:
                assert len(gateway.analyze(scene).garments) == 2
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert_names_no_triton(err.details() or "", err, spare_triton)
                assert time.monotonic() - back < 5.0, "not serving again within 5 s"
                time.sleep(0.1)
        gateway.wait_health(SERVING, timeout=5)
    finally:
        gateway.stop()
        if restarted is not None:
            restarted.stop()


def test_sigterm_under_load_lets_every_call_in_flight_finish(
    own_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    # Batches wait 0.3 s to fill, and 3 callers never fill one of 4: at any moment calls
    # are in flight inside the gateway.
    gateway = start_gateway(
        own_triton.grpc_url,
        tmp_path / "gw",
        max_queue_delay_microseconds=300_000,
        shutdown_grace_seconds=10,
    )
    try:
        gateway.wait_health(SERVING)
        watch = health_pb2_grpc.HealthStub(gateway.channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=30
        )
        assert next(watch).status == SERVING
        with Load(gateway, scene) as load:
            time.sleep(1.0)
            sent = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING at once, while calls are still being finished.
            assert next(watch).status == NOT_SERVING
            assert time.monotonic() - sent < 1.0
            watch.cancel()
            assert gateway.process.wait(timeout=15) == 0
        in_flight = [c for c in load.calls if c.started < sent < c.ended]
        assert len(in_flight) >= 2, "calls were in flight at SIGTERM"
        # A call sent just before the signal may reach the gateway after it: allow 50 ms.
        before = [c for c in load.calls if c.started < sent - 0.05]
        assert [c for c in before if c.code != grpc.StatusCode.OK] == []
        # Once the signal is handled (well within 0.1 s), new calls are refused.
        after = [c for c in load.calls if c.started > sent + 0.1]
        assert after, "calls were made after SIGTERM"
        assert {c.code for c in after} <= {grpc.StatusCode.UNAVAILABLE}
        assert "gateway stopped" in gateway.log.read_text()
    finally:
        gateway.stop()


def test_a_call_whose_deadline_passes_in_the_queue_never_reaches_triton(
    own_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    # A lone call waits a whole second for its batch to fill; its caller gives it 0.3 s.
    gateway = start_gateway(
        own_triton.grpc_url, tmp_path / "gw", max_queue_delay_microseconds=1_000_000
    )
    try:
        gateway.wait_health(SERVING)
        before = served(own_triton)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            gateway.stub.Analyze(
                pb.AnalyzeRequest(image=pb.Image(data=scene)), metadata=gateway.auth, timeout=0.3
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.0
        time.sleep(1.2)  # past the batch's delay: had it been kept, it would have been sent
        assert served(own_triton) == before
        assert len(gateway.analyze(scene).garments) == 2
        assert served(own_triton) == before + 1
    finally:
        gateway.stop()
