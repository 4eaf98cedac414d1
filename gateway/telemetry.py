"""Observability: OpenTelemetry traces, Prometheus metrics, request context on log lines.

Traces. Each call of our service is one SERVER span named ``fashion.v1.FashionAnalysisService/
<Method>``, continuing the caller's trace when its metadata carries W3C ``traceparent`` /
``tracestate``. Its children are ``validate`` (options and image headers), ``batch_wait``
(time in the micro-batcher's queue) and ``decode`` (taxonomy decoding), one set per image.
One ensemble call serves the images of many requests, so its span, ``triton_infer``, cannot
be the child of each: it is the child of the first request of its batch and *links* to the
span of every request it serves (the OpenTelemetry way to say "this work was done for those
traces"). The Triton call carries ``traceparent`` from ``triton_infer``, so a Triton started
with OpenTelemetry tracing joins that trace. Spans are exported over OTLP/gRPC when
``otlp_traces_endpoint`` or the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; the sampler is then the SDK's, so
``OTEL_TRACES_SAMPLER`` tunes it. Otherwise spans go nowhere and are recorded only for
callers whose own trace is sampled: the trace context is still passed on, with the caller's
sampling decision.

Metrics (:class:`Metrics`, served on ``metrics_port`` at ``/metrics``): requests by method,
tenant and status code, request latency, batch size and batch wait, Triton latency, work in
flight, rejections by reason and failures of the shared quota backend. Labels are bounded sets: method names, status codes, error
reasons, and tenants, which come from the configured keys; never request ids.

Logs. :class:`RequestContextFilter` adds the request id, the tenant and the trace and span
ids to every record emitted while serving a request; the JSON log format writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import DEFAULT_OFF, Sampler, SamplingResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from fashionserve.gateway import __version__
from fashionserve.gateway.auth.identity import identity_var
from fashionserve.gateway.failures import request_id_var
from fashionserve.gateway.handlers import SERVICE_PREFIX, wrap_handler

log = logging.getLogger(__name__)

TRACER_NAME = "fashionserve.gateway"
DEFAULT_SERVICE_NAME = "fashionserve-gateway"
OTLP_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
REQUEST_FIELDS = ("request_id", "tenant", "trace_id", "span_id")
"""What :class:`RequestContextFilter` adds to the log records of a request."""
NO_TENANT = "unauthenticated"
"""The tenant label of calls refused before an identity was established."""

# Seconds. A whole call: a cached answer takes milliseconds, a big batch on a busy GPU seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Queue waits are bounded by max_queue_delay_microseconds plus waiting for a free slot.
WAIT_BUCKETS = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
# The settings cap max_batch_size at 256.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Server-side failures mark a SERVER span as an error (OpenTelemetry's gRPC conventions);
# a caller's mistake (INVALID_ARGUMENT, UNAUTHENTICATED...) leaves its status unset.
_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_PROPAGATOR = TraceContextTextMapPropagator()


# ------------------------------------------------------------------------- metrics
class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (so that several
    gateways in one process, as in tests, do not collide), with the process, platform and
    garbage-collector collectors beside them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "fashionserve_requests",
            "Calls of FashionAnalysisService by method, tenant and gRPC status code.",
            ["method", "tenant", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fashionserve_request_duration_seconds",
            "Time to answer a call (a stream: until it ends), by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "fashionserve_requests_in_flight", "Calls being served now.", registry=r
        )
        self.images_queued = Gauge(
            "fashionserve_images_queued",
            "Images waiting in the micro-batcher for a batch.",
            registry=r,
        )
        self.batches_in_flight = Gauge(
            "fashionserve_triton_batches_in_flight",
            "Ensemble calls to Triton outstanding now (at most max_batches_in_flight).",
            registry=r,
        )
        self.batch_size = Histogram(
            "fashionserve_batch_size",
            "Images per ensemble call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_wait_seconds = Histogram(
            "fashionserve_batch_wait_seconds",
            "Time an image waited in the micro-batcher before its batch was sent.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.triton_seconds = Histogram(
            "fashionserve_triton_request_duration_seconds",
            "Time of one batch's ensemble call to Triton (retries isolating a bad image included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "fashionserve_rejections",
            "Errors reported to callers, by reason (the ErrorInfo reason): whole calls, and "
            "single images of BatchAnalyze and StreamAnalyze.",
            ["reason"],
            registry=r,
        )
        self.quota_backend_errors = Counter(
            "fashionserve_quota_backend_errors",
            "Failed or unanswered calls to the shared quota backend (quota_backend_url); "
            "quota_backend_failure_policy decides what the calls concerned get.",
            registry=r,
        )

        self.capture_records = Counter(
            "fashionserve_capture_records",
            "Served results sampled for capture, by outcome: written to a capture file, "
            "dropped (the writer's queue was full) or failed (the write failed).",
            ["outcome"],
            registry=r,
        )

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it has not been recorded yet)."""
        return self.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- traces
class _RecordWhenExported(Sampler):
    """The SDK's configured sampler once spans are exported; until then, spans are recorded
    only for a caller whose own trace is sampled, so that the ``traceparent`` passed on to
    Triton keeps the caller's sampling decision.

    Recording spans that go nowhere costs CPU on every call (several spans per image);
    a span that is not recorded still has its ids, so traces and log lines stay joined.
    """

    def __init__(self, configured: Sampler) -> None:
        self.configured = configured
        self.exporting = False

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        """The configured decision while exporting, else the caller's."""
        sampler = self.configured if self.exporting else DEFAULT_OFF
        return sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """Names the sampler in use."""
        if self.exporting:
            return self.configured.get_description()
        return f"RecordWhenExported{{{DEFAULT_OFF.get_description()}}}"


def otlp_endpoint(otlp_traces_endpoint: str | None = None) -> str | None:
    """``otlp_traces_endpoint``, else the endpoint of the standard environment variables."""
    return otlp_traces_endpoint or next(
        (os.environ[k] for k in OTLP_ENDPOINT_ENV if os.environ.get(k)), None
    )


def trace_headers() -> dict[str, str]:
    """W3C ``traceparent``/``tracestate`` of the current span, for an outgoing call."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def link_context(span_context: trace.SpanContext) -> Context:
    """An OpenTelemetry context whose current span is ``span_context`` (to parent a span
    to a span started elsewhere, e.g. in a request's task)."""
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def child_span(tracer: trace.Tracer, name: str) -> contextlib.AbstractContextManager[object]:
    """A span ``name`` under the current one, started only when the current one is recorded:
    under an unrecorded span a child would not be recorded either (the sampler follows the
    parent), so starting one would cost CPU on every image for nothing."""
    if not trace.get_current_span().is_recording():
        return contextlib.nullcontext()
    return tracer.start_as_current_span(name)


# ------------------------------------------------------------------------- telemetry
class Telemetry:
    """The tracer and the metrics of one gateway, and its ``/metrics`` HTTP server."""

    def __init__(self, otlp_traces_endpoint: str | None = None) -> None:
        attributes: dict[str, str] = {SERVICE_VERSION: __version__}
        if not os.environ.get("OTEL_SERVICE_NAME"):  # the standard variable wins when set
            attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
        self.tracer_provider = TracerProvider(resource=Resource.create(attributes))
        # The provider reads the configured sampler (OTEL_TRACES_SAMPLER); its tracers take
        # the switch instead, which defers to it once spans are exported.
        self._sampler = _RecordWhenExported(self.tracer_provider.sampler)
        self.tracer_provider.sampler = self._sampler
        self.tracer = self.tracer_provider.get_tracer(TRACER_NAME, __version__)
        self.metrics = Metrics()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        endpoint = otlp_endpoint(otlp_traces_endpoint)
        if endpoint:
            # Imported here: the exporter pulls in its own gRPC stubs, needed only when used.
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # http:// is plaintext, https:// is TLS (the exporter reads the scheme).
            self.export_spans(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            log.info("exporting traces over OTLP to %s", endpoint)

    def export_spans(self, processor: SpanProcessor) -> None:
        """Send finished spans to ``processor`` (and record them from now on)."""
        self.tracer_provider.add_span_processor(processor)
        self._sampler.exporting = True

    def serve_metrics(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (port 0 picks one); returns the port.
        Raises OSError when the port cannot be bound."""
        try:
            self._http = start_http_server(
                port, addr=host.strip("[]"), registry=self.metrics.registry
            )
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        bound: int = self._http[0].server_port
        return bound

    def close(self) -> None:
        """Stop the metrics server and flush the spans not exported yet."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
        self.tracer_provider.shutdown()

    def count_rejection(self, reason: str) -> None:
        """Count one error reported to a caller (a call's, or one image's)."""
        self.metrics.rejections.labels(reason).inc()

    @contextlib.asynccontextmanager
    async def observe_rpc(
        self, method: str, metadata: Sequence[tuple[str, Any]], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """The span and the metrics of one call, around its handler (errors already mapped
        to statuses by the interceptors inside)."""
        carrier = {k: v for k, v in metadata if k in ("traceparent", "tracestate")}
        service, _, name = method.lstrip("/").rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        m = self.metrics
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        m.requests_in_flight.inc()
        with self.tracer.start_as_current_span(
            method.lstrip("/"),
            context=_PROPAGATOR.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except grpc.aio.AbortError:  # how a mapped error leaves: the code is set
                code = _status_code(context.code())
                raise
            except BaseException as exc:
                cancelled = isinstance(exc, asyncio.CancelledError)  # the caller went away
                code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
                raise
            finally:
                identity = identity_var.get()
                tenant = identity.tenant if identity is not None else NO_TENANT
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_attribute("fashionserve.request_id", request_id_var.get())
                span.set_attribute("fashionserve.tenant", tenant)
                if code in _ERROR_CODES:
                    span.set_status(trace.StatusCode.ERROR, code.name)
                m.requests_in_flight.dec()
                m.requests.labels(name, tenant, code.name).inc()
                m.request_seconds.labels(name).observe(time.perf_counter() - start)


def _status_code(value: object) -> grpc.StatusCode:
    """grpc.aio reports the code set by ``abort`` as a StatusCode or as its number."""
    if isinstance(value, grpc.StatusCode):
        return value
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Traces and measures every call of our service; health and reflection pass through.

    It must be the first (outermost) interceptor, so that it sees the status every call
    ends with, including refusals by the interceptors after it.
    """

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap our service's handlers in :meth:`Telemetry.observe_rpc`."""
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata = tuple(handler_call_details.invocation_metadata or ())

        def around(
            context: grpc.aio.ServicerContext,
        ) -> contextlib.AbstractAsyncContextManager[None]:
            return self.telemetry.observe_rpc(method, metadata, context)

        return wrap_handler(handler, around=around)


# ------------------------------------------------------------------------------ logs
class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``tenant``, ``trace_id`` and ``span_id`` to the records emitted
    while serving a request (read from the request's context variables when the record is
    made, so they are right whatever thread formats it later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; never drops it."""
        request_id = request_id_var.get(None)  # None outside a request
        if request_id is not None:
            record.request_id = request_id
        identity = identity_var.get()
        if identity is not None:
            record.tenant = identity.tenant
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        return True
