"""Telemetry: the span of each call continues the caller's trace, metrics count calls by
method, tenant and code, log lines carry the request's context, ``/metrics`` is served over
HTTP and spans reach an OTLP collector.

The interceptors run on a real grpc.aio server over a real socket; the OTLP collector is a
real gRPC server implementing OpenTelemetry's TraceService.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fashionserve.gateway.auth.identity import Identity, identity_var
from fashionserve.gateway.errors import ErrorInterceptor
from fashionserve.gateway.failures import InvalidArgument
from fashionserve.gateway.server import JsonFormatter
from fashionserve.gateway.telemetry import (
    RequestContextFilter,
    Telemetry,
    TelemetryInterceptor,
    trace_headers,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
log = logging.getLogger(__name__)


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return run


# ------------------------------------------------------------------ a served test service
class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"bad":
            raise InvalidArgument("NOT_AN_IMAGE", "the bytes are not an image")
        if request == b"crash":
            raise RuntimeError("a bug")
        # What AuthInterceptor does for a valid key (the identity lives for the call).
        identity_var.set(Identity("k1", "acme", frozenset({"analyze"})))
        with self.tracer.start_as_current_span("work"):
            log.info("working on it")
            return json.dumps(trace_headers()).encode()

    async def stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method == "/fashion.v1.Test/Unary":
            return grpc.unary_unary_rpc_method_handler(self.unary)
        if details.method == "/fashion.v1.Test/Stream":
            return grpc.stream_stream_rpc_method_handler(self.stream)
        return None


class Served:
    def __init__(self) -> None:
        self.telemetry = Telemetry()
        self.spans = InMemorySpanExporter()
        self.telemetry.export_spans(SimpleSpanProcessor(self.spans))
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        """Serve the test service (inside the test's event loop, as grpc.aio requires)."""
        self.server = grpc.aio.server(
            interceptors=[
                TelemetryInterceptor(self.telemetry),
                ErrorInterceptor(on_reported=lambda e: self.telemetry.count_rejection(e.reason)),
            ]
        )
        self.server.add_generic_rpc_handlers([_Handlers(self.telemetry.tracer)])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def stop(self) -> None:
        assert self.server is not None
        await self.server.stop(0)

    def value(self, name: str, **labels: str) -> float:
        return self.telemetry.metrics.value(name, **labels)

    def span(self, name: str) -> ReadableSpan:
        matches = [s for s in self.spans.get_finished_spans() if s.name == name]
        assert len(matches) == 1, [s.name for s in self.spans.get_finished_spans()]
        return matches[0]


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.telemetry.close()


async def _call(
    address: str, method: str, request: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[bytes | None, grpc.aio.AioRpcError | None, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)(request, metadata=metadata)
        try:
            reply = await call
        except grpc.aio.AioRpcError as err:
            return None, err, err.trailing_metadata()
        return reply, None, await call.trailing_metadata()


# ------------------------------------------------------------------------------ traces
@aio
async def test_the_call_span_continues_the_callers_trace_and_passes_it_on(
    served: Served,
) -> None:
    await served.start()
    try:
        metadata = (("traceparent", TRACEPARENT), ("x-request-id", "req-7"))
        reply, err, trailers = await _call(
            served.address, "/fashion.v1.Test/Unary", b"ok", metadata
        )
    finally:
        await served.stop()
    assert err is None and reply is not None
    assert ("x-request-id", "req-7") in tuple(trailers)  # echoed back

    rpc = served.span("fashion.v1.Test/Unary")
    assert rpc.kind == trace.SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID  # the caller's trace, kept
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == CALLER_SPAN
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.method"] == "Unary"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert rpc.attributes["fashionserve.request_id"] == "req-7"
    assert rpc.attributes["fashionserve.tenant"] == "acme"
    work = served.span("work")
    assert work.parent is not None and work.parent.span_id == rpc.context.span_id
    # What an outgoing call (to Triton) is given: the same trace, the current span.
    sent = json.loads(reply)
    assert sent["traceparent"] == f"00-{TRACE_ID}-{format(work.context.span_id, '016x')}-01"


@aio
async def test_without_a_traceparent_the_call_starts_a_trace(served: Served) -> None:
    await served.start()
    try:
        await _call(served.address, "/fashion.v1.Test/Unary", b"ok", (("traceparent", "junk"),))
    finally:
        await served.stop()
    rpc = served.span("fashion.v1.Test/Unary")
    assert rpc.parent is None and rpc.context.trace_id != int(TRACE_ID, 16)


def test_trace_headers_are_empty_outside_a_span() -> None:
    assert trace_headers() == {}


# ----------------------------------------------------------------------------- metrics
@aio
async def test_metrics_count_calls_by_method_tenant_code_and_rejections_by_reason(
    served: Served,
) -> None:
    await served.start()
    try:
        for request in (b"ok", b"ok", b"bad", b"crash"):
            await _call(served.address, "/fashion.v1.Test/Unary", request)
        async with grpc.aio.insecure_channel(served.address) as channel:
            call = channel.stream_stream("/fashion.v1.Test/Stream")(iter([b"a", b"b"]))
            assert [r async for r in call] == [b"a", b"b"]
    finally:
        await served.stop()
    total = "fashionserve_requests_total"
    assert served.value(total, method="Unary", tenant="acme", code="OK") == 2
    # Refused before any identity: the tenant is not known.
    assert (
        served.value(total, method="Unary", tenant="unauthenticated", code="INVALID_ARGUMENT") == 1
    )
    assert served.value(total, method="Unary", tenant="unauthenticated", code="INTERNAL") == 1
    assert served.value(total, method="Stream", tenant="unauthenticated", code="OK") == 1
    assert served.value("fashionserve_rejections_total", reason="NOT_AN_IMAGE") == 1
    assert served.value("fashionserve_rejections_total", reason="INTERNAL") == 1
    assert served.value("fashionserve_request_duration_seconds_count", method="Unary") == 4
    assert served.value("fashionserve_requests_in_flight") == 0
    # A caller's mistake is not a server error; a crash is.
    spans = [s for s in served.spans.get_finished_spans() if s.name.endswith("/Unary")]
    statuses = sorted(s.status.status_code.name for s in spans)
    assert statuses == ["ERROR", "UNSET", "UNSET", "UNSET"]


def test_metrics_are_served_over_http_and_a_taken_port_is_named() -> None:
    telemetry = Telemetry()
    other = Telemetry()
    try:
        port = telemetry.serve_metrics("127.0.0.1", 0)
        telemetry.metrics.requests.labels("Analyze", "acme", "OK").inc()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        assert 'fashionserve_requests_total{code="OK",method="Analyze",tenant="acme"} 1.0' in text
        assert "process_cpu_seconds_total" in text
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            other.serve_metrics("127.0.0.1", port)
    finally:
        telemetry.close()
        other.close()


def test_two_gateways_in_one_process_keep_their_own_metrics() -> None:
    a, b = Telemetry(), Telemetry()
    a.count_rejection("NOT_AN_IMAGE")
    assert a.metrics.value("fashionserve_rejections_total", reason="NOT_AN_IMAGE") == 1
    assert b.metrics.value("fashionserve_rejections_total", reason="NOT_AN_IMAGE") == 0


# -------------------------------------------------------------------------------- logs
@aio
async def test_log_lines_of_a_request_carry_its_id_tenant_and_trace(served: Served) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    await served.start()
    try:
        metadata = (("traceparent", TRACEPARENT), ("x-request-id", "req-9"))
        await _call(served.address, "/fashion.v1.Test/Unary", b"ok", metadata)
    finally:
        await served.stop()
        log.removeHandler(handler)
    log.info("outside any request")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["message"] == "working on it"
    assert (line["request_id"], line["tenant"], line["trace_id"]) == ("req-9", "acme", TRACE_ID)
    assert line["span_id"] == format(served.span("work").context.span_id, "016x")


def test_a_line_outside_a_request_has_no_request_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "idle", None, None)
    assert RequestContextFilter().filter(record)
    doc = json.loads(JsonFormatter().format(record))
    assert not {"request_id", "tenant", "trace_id", "span_id"} & set(doc)


# ------------------------------------------------------------------------------- OTLP
class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_to_the_configured_otlp_collector() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        telemetry = Telemetry(otlp_traces_endpoint=f"http://127.0.0.1:{port}")
        with telemetry.tracer.start_as_current_span("fashion.v1.Test/Unary"):
            pass
        telemetry.close()  # flushes the batch processor
    finally:
        server.stop(0)
    exported = [
        (resource_spans.resource, span.name)
        for request in collector.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert [name for _, name in exported] == ["fashion.v1.Test/Unary"]
    attributes = {a.key: a.value.string_value for a in exported[0][0].attributes}
    assert attributes["service.name"] == "fashionserve-gateway"


def test_without_an_exporter_only_a_sampled_callers_trace_is_recorded() -> None:
    """Spans that go nowhere are not recorded; a caller's sampled trace still is, so the
    trace context passed on to Triton carries the caller's decision."""
    telemetry = Telemetry()
    try:
        with telemetry.tracer.start_as_current_span("untraced") as span:
            assert not span.is_recording() and span.get_span_context().is_valid
            assert not _sampled(trace_headers()["traceparent"])
        caller = TraceContextTextMapPropagator().extract({"traceparent": TRACEPARENT})
        with telemetry.tracer.start_as_current_span("traced", context=caller) as span:
            assert span.is_recording()
            assert trace_headers()["traceparent"].startswith(f"00-{TRACE_ID}-")
            assert _sampled(trace_headers()["traceparent"])
        spans = InMemorySpanExporter()
        telemetry.export_spans(SimpleSpanProcessor(spans))
        with telemetry.tracer.start_as_current_span("exported") as span:
            assert span.is_recording()
        assert [s.name for s in spans.get_finished_spans()] == ["exported"]
    finally:
        telemetry.close()


def _sampled(traceparent: str) -> bool:
    """The sampled bit of a W3C traceparent's flags."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)
