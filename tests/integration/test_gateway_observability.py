"""Observability as an operator meets it: a call's trace, the metrics endpoint, the logs.

Real Triton (the conftest's ``triton``, serving the trained demo models) behind a small
recording gRPC proxy, so the test sees the metadata Triton is sent; the gateway runs in
this process (``fashionserve.gateway.server.create_server`` on its own event loop thread) so that an
in-memory span exporter can be added to its tracer provider; calls and scrapes go over
real sockets.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from conftest import error_reason, start_gateway
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fashionserve.gateway.auth.keys import create_key
from fashionserve.gateway.server import GatewayServer, create_server
from fashionserve.gateway.settings import load_settings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc
from fashionserve.triton import TritonServer

T = TypeVar("T")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
MIB = 1024 * 1024
LIMITS = [("grpc.max_send_message_length", 64 * MIB), ("grpc.max_receive_message_length", 64 * MIB)]
RPC = "fashion.v1.FashionAnalysisService/Analyze"


# ------------------------------------------------------------------- recording proxy
class RecordingProxy(grpc.GenericRpcHandler):
    """Forwards every unary call to Triton as raw bytes, keeping the metadata it got."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=LIMITS)
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=LIMITS)
        self.server.add_generic_rpc_handlers([self])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            self.calls.append((method, metadata))
            passed = [(k, v) for k, v in metadata.items() if k in ("traceparent", "tracestate")]
            try:
                reply: bytes = self.channel.unary_unary(method)(
                    request, metadata=passed, timeout=context.time_remaining()
                )
            except grpc.RpcError as err:
                context.abort(err.code(), err.details() or "")
            return reply

        return grpc.unary_unary_rpc_method_handler(forward)

    def infer_metadata(self) -> list[dict[str, str]]:
        return [md for method, md in self.calls if method.endswith("/ModelInfer")]

    def stop(self) -> None:
        self.server.stop(0)
        self.channel.close()


# ----------------------------------------------------------------- in-process gateway
@dataclass
class InProcessGateway:
    loop: asyncio.AbstractEventLoop
    server: GatewayServer
    channel: grpc.Channel
    key: str
    spans: InMemorySpanExporter

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    @property
    def stub(self) -> pb_grpc.FashionAnalysisServiceStub:
        return pb_grpc.FashionAnalysisServiceStub(self.channel)

    def analyze(self, data: bytes, *metadata: tuple[str, str], key: str | None = None) -> Any:
        request = pb.AnalyzeRequest(image=pb.Image(data=data))
        md = (("x-api-key", key or self.key), *metadata)
        return self.stub.Analyze.with_call(request, metadata=md, timeout=60)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]


@pytest.fixture(scope="module")
def proxy(triton: TritonServer) -> Iterator[RecordingProxy]:
    recorder = RecordingProxy(triton.grpc_url)
    try:
        yield recorder
    finally:
        recorder.stop()


@pytest.fixture(scope="module")
def gateway(
    proxy: RecordingProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessGateway]:
    workdir: Path = tmp_path_factory.mktemp("observability")
    keys = workdir / "keys.yaml"
    key = create_key(keys, "shop", tenant="shop-eu")
    settings = load_settings(
        listen_address="127.0.0.1:0",
        triton_urls=[proxy.address],
        api_keys_file=keys,
        metrics_port=0,
        health_check_interval_seconds=0.2,
        # A batch of 3 is sent as soon as it is full; a lone call waits 0.3 s for company.
        max_batch_size=3,
        max_queue_delay_microseconds=300_000,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(create_server(settings), loop).result(60)
    spans = InMemorySpanExporter()
    server.telemetry.export_spans(SimpleSpanProcessor(spans))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=LIMITS)
    gw = InProcessGateway(loop, server, channel, key, spans)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != 1:
            assert time.monotonic() < deadline, "the gateway did not become SERVING"
            time.sleep(0.1)
        yield gw
    finally:
        channel.close()
        gw.run(server.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (180, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ tests
def test_a_call_is_traced_from_the_caller_through_triton(
    gateway: InProcessGateway, proxy: RecordingProxy, photo: bytes
) -> None:
    gateway.spans.clear()
    sent_before = len(proxy.infer_metadata())
    _, call = gateway.analyze(
        photo, ("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"), ("x-request-id", "trace-1")
    )
    assert ("x-request-id", "trace-1") in call.trailing_metadata()

    (rpc,) = gateway.finished(RPC)
    assert format(rpc.context.trace_id, "032x") == TRACE_ID  # the caller's trace, kept
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == CALLER_SPAN
    assert rpc.attributes is not None
    assert rpc.attributes["fashionserve.request_id"] == "trace-1"
    assert rpc.attributes["fashionserve.tenant"] == "shop-eu"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    children = {}
    for name in ("validate", "batch_wait", "triton_infer", "decode"):
        (span,) = gateway.finished(name)
        assert span.context.trace_id == rpc.context.trace_id, name
        assert span.parent is not None and span.parent.span_id == rpc.context.span_id, name
        assert span.end_time is not None and rpc.end_time is not None
        assert rpc.start_time is not None and span.start_time is not None
        assert rpc.start_time <= span.start_time <= span.end_time <= rpc.end_time, name
        children[name] = span
    triton_span = children["triton_infer"]
    assert [link.context.span_id for link in triton_span.links] == [rpc.context.span_id]
    assert children["batch_wait"].end_time <= triton_span.start_time  # type: ignore[operator]

    # Triton was sent the trace: same trace id, the triton_infer span as parent.
    sent = proxy.infer_metadata()[sent_before:]
    assert len(sent) == 1
    assert sent[0]["traceparent"] == (
        f"00-{TRACE_ID}-{format(triton_span.context.span_id, '016x')}-01"
    )


def test_one_triton_call_for_three_callers_links_to_each_callers_span(
    gateway: InProcessGateway, photo: bytes
) -> None:
    gateway.spans.clear()
    trace_ids = [f"{n:032x}" for n in (0xA1, 0xB2, 0xC3)]
    request = pb.AnalyzeRequest(image=pb.Image(data=photo))
    calls = [
        gateway.stub.Analyze.future(
            request,
            metadata=(("x-api-key", gateway.key), ("traceparent", f"00-{t}-{CALLER_SPAN}-01")),
            timeout=60,
        )
        for t in trace_ids
    ]
    for call in calls:
        call.result()

    rpcs = gateway.finished(RPC)
    assert sorted(format(s.context.trace_id, "032x") for s in rpcs) == trace_ids
    (batch,) = gateway.finished("triton_infer")  # the three filled one batch
    assert batch.attributes is not None and batch.attributes["fashionserve.batch_size"] == 3
    linked = {link.context.span_id for link in batch.links}
    assert linked == {s.context.span_id for s in rpcs}
    # The batch's span belongs to one caller's trace; every caller has its own queue wait.
    assert batch.parent is not None and batch.parent.span_id in linked
    waits = gateway.finished("batch_wait")
    assert sorted(w.context.trace_id for w in waits) == sorted(s.context.trace_id for s in rpcs)


def test_the_metrics_endpoint_shows_the_counters_moving(
    gateway: InProcessGateway, photo: bytes
) -> None:
    def requests(code: str, tenant: str = "shop-eu") -> tuple[str, tuple[tuple[str, str], ...]]:
        labels = {"method": "Analyze", "tenant": tenant, "code": code}
        return ("fashionserve_requests_total", tuple(sorted(labels.items())))

    def rejections(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return ("fashionserve_rejections_total", (("reason", reason),))

    batches = ("fashionserve_batch_size_count", ())
    triton_calls = ("fashionserve_triton_request_duration_seconds_count", ())
    latency = ("fashionserve_request_duration_seconds_count", (("method", "Analyze"),))

    before = gateway.scrape()
    gateway.analyze(photo)
    with pytest.raises(grpc.RpcError) as bad:
        gateway.analyze(b"this is not an image", ("x-request-id", "bad-1"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        gateway.analyze(photo, key="shop.not-the-secret")
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = gateway.scrape()

    def moved(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved(requests("OK")) == 1
    assert moved(requests("INVALID_ARGUMENT")) == 1
    assert moved(requests("UNAUTHENTICATED", tenant="unauthenticated")) == 1
    assert moved(rejections("NOT_AN_IMAGE")) == 1
    assert moved(rejections("API_KEY_INVALID")) == 1
    assert moved(latency) == 3
    assert moved(batches) == 1 and moved(triton_calls) == 1  # only the good image reached it
    assert after[("fashionserve_requests_in_flight", ())] == 0
    assert after[("fashionserve_images_queued", ())] == 0


def test_a_gateway_process_serves_metrics_and_writes_json_log_lines(
    triton: TritonServer, tmp_path: Path, photo: bytes
) -> None:
    """The deployed path: ``fashionserve gateway`` with metrics_port and JSON logs set in
    its config file."""
    gw = start_gateway(triton.grpc_url, tmp_path, metrics_port=0, log_format="json")
    try:
        gw.wait_health(health_pb2.HealthCheckResponse.SERVING)
        metrics_port = json.loads((tmp_path / "ready.json").read_text())["metrics_port"]
        gw.analyze(photo)
        with pytest.raises(grpc.RpcError) as bad:
            gw.stub.Analyze(
                pb.AnalyzeRequest(image=pb.Image(data=b"\x89PNG\r\n\x1a\n")),
                metadata=(*gw.auth, ("x-request-id", "proc-bad")),
                timeout=30,
            )
        assert ("x-request-id", "proc-bad") in bad.value.trailing_metadata()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        assert (
            'fashionserve_requests_total{code="OK",method="Analyze",tenant="default"} 1.0' in text
        )
        reason = error_reason(bad.value)
        assert f'fashionserve_rejections_total{{reason="{reason}"}} 1.0' in text, text
    finally:
        gw.stop()
    lines = [json.loads(line) for line in gw.log.read_text().splitlines() if line.startswith("{")]
    refusal = [line for line in lines if line.get("request_id") == "proc-bad"]
    assert refusal, "the refusal was logged with its request id"
    assert all(line["tenant"] == "default" and len(line["trace_id"]) == 32 for line in refusal)
    # Lines outside any request (start, stop) carry no request fields.
    assert any("request_id" not in line for line in lines)
