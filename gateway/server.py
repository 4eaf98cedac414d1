"""The gateway process: a grpc.aio server with our service, health and reflection.

``create_server(settings)`` builds everything and returns it with the bound port (bind
port 0 in tests); ``serve(settings)`` runs it until SIGINT/SIGTERM and shuts down
gracefully: health turns NOT_SERVING, new calls are refused, calls in flight get
``shutdown_grace_seconds`` to finish, then the batcher and the Triton channel close.

Health (``grpc.health.v1`` on the main port, and alone on ``health_port`` when it is set):
the services ``""`` and ``fashion.v1.FashionAnalysisService`` are SERVING while at least one
Triton endpoint is ready with a served tagger whose taxonomy hash equals the gateway's; a
background task re-checks every endpoint every ``health_check_interval_seconds``. The health
port is a second grpc.aio server on the same event loop, plaintext and with call budgets of
its own, so that no caller of the main port can starve the readiness probe.

Connections (both ports): HTTP/2 streams per connection are capped, silent connections are
pinged and closed when the ping goes unanswered, clients that ping too often are
disconnected, and idle or old connections are closed (the settings
:func:`connection_options` reads). Calls open at once are counted by
:class:`~fashionserve.gateway.call_budget.CallBudgetInterceptor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fashionserve.errors import Error
from fashionserve.gateway import __version__
from fashionserve.gateway.auth.interceptor import Authenticator, AuthInterceptor
from fashionserve.gateway.auth.tls import server_credentials
from fashionserve.gateway.call_budget import CallBudgetInterceptor
from fashionserve.gateway.core import Analyzer
from fashionserve.gateway.endpoints import EndpointPool, RetryBudget
from fashionserve.gateway.errors import ErrorInterceptor
from fashionserve.gateway.inference import BatchedInference
from fashionserve.gateway.monitor import ServingMonitor
from fashionserve.gateway.search import Searcher, ServedIndex
from fashionserve.gateway.servicer import SERVICE_NAME, FashionAnalysisServicer
from fashionserve.gateway.settings import GatewaySettings
from fashionserve.gateway.telemetry import (
    REQUEST_FIELDS,
    RequestContextFilter,
    Telemetry,
    TelemetryInterceptor,
)
from fashionserve.gateway.triton_client import EnsembleClient
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc
from fashionserve.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)


class GatewayServer:
    """The running parts of one gateway: the grpc.aio server (:attr:`grpc_server`), the
    health server (:attr:`health_server` on :attr:`health_port`, when ``health_port`` is
    set), the analyzer with its batched inference path, the Triton endpoint pool, the
    serving monitor and the telemetry
    (``/metrics`` on :attr:`metrics_port` once started, when ``metrics_port`` is set)."""

    def __init__(
        self,
        settings: GatewaySettings,
        grpc_server: grpc.aio.Server,
        analyzer: Analyzer,
        monitor: ServingMonitor,
        pool: EndpointPool,
        health_servicer: health.aio.HealthServicer,
        port: int,
        health_server: grpc.aio.Server | None = None,
        health_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.grpc_server = grpc_server
        self.health_server = health_server
        self.health_port = health_port
        self.analyzer = analyzer
        self.monitor = monitor
        self.pool = pool
        self.health = health_servicer
        self.port = port
        self.telemetry = analyzer.telemetry
        self.metrics_port: int | None = None
        self._monitor_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """host:port actually bound."""
        return f"{self.settings.bind_host}:{self.port}"

    async def start(self) -> None:
        """Start serving, the health monitor and the metrics endpoint."""
        if self.settings.metrics_port is not None:
            self.metrics_port = self.telemetry.serve_metrics(
                self.settings.bind_host, self.settings.metrics_port
            )
        self.analyzer.start()
        if self.health_server is not None:
            await self.health_server.start()
        await self.grpc_server.start()
        self._monitor_task = asyncio.get_running_loop().create_task(
            self.monitor.run(), name="serving-monitor"
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let calls in flight finish."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace)
        if self.health_server is not None:  # answered NOT_SERVING through the grace period
            await self.health_server.stop(0)
        await self.analyzer.close()
        await self.pool.close()
        metrics = self.telemetry.metrics
        batches = metrics.value("fashionserve_batch_size_count")
        images = metrics.value("fashionserve_batch_wait_seconds_count")
        log.info(
            "served %d image(s) in %d batch(es): mean batch size %.2f, mean queue wait %.2f ms",
            images,
            batches,
            metrics.value("fashionserve_batch_size_sum") / max(batches, 1),
            metrics.value("fashionserve_batch_wait_seconds_sum") / max(images, 1) * 1e3,
        )
        self.telemetry.close()

    async def wait_for_termination(self) -> None:
        """Block until the server stops."""
        await self.grpc_server.wait_for_termination()


async def create_server(
    settings: GatewaySettings, taxonomy: Taxonomy | None = None
) -> tuple[GatewayServer, int]:
    """Build the gateway and bind its port; returns ``(server, port)``. Call
    ``await server.start()`` to serve. Must run inside the event loop that will serve."""
    taxonomy = taxonomy or load_taxonomy(settings.taxonomy_file)
    authenticator: Authenticator | None = None
    if settings.auth_enabled:
        authenticator = Authenticator.from_settings(settings)
    else:
        log.warning(
            "!!! AUTHENTICATION IS OFF (--no-auth / auth_enabled=false): anyone who can reach "
            "%s can use the service. Use this for local development only. !!!",
            settings.listen_address,
        )
    credentials = server_credentials(settings)  # None: plaintext

    def connect(address: str) -> EnsembleClient:
        return EnsembleClient(
            address,
            max_batch_size=settings.max_batch_size,
            max_image_bytes=settings.max_image_bytes,
            request_timeout_seconds=settings.request_timeout_seconds,
        )

    pool = EndpointPool(
        settings.triton_urls,
        taxonomy,
        connect,
        request_timeout_seconds=settings.request_timeout_seconds,
        retry_budget=RetryBudget(
            settings.triton_retry_budget_ratio, settings.triton_retry_budget_burst
        ),
        dns_refresh_seconds=settings.triton_dns_refresh_seconds,
        eject_after_timeouts=settings.triton_eject_after_timeouts,
        canary_backoff_seconds=settings.triton_canary_backoff_seconds,
    )
    health_servicer = health.aio.HealthServicer()
    for service in HEALTH_SERVICES:  # NOT_SERVING until the monitor has seen Triton ready
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def on_change(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, status)

    monitor = ServingMonitor(
        pool, taxonomy, settings.health_check_interval_seconds, on_change=on_change
    )
    telemetry = Telemetry(settings.otlp_traces_endpoint)
    inference = BatchedInference(settings, pool, telemetry)
    analyzer = Analyzer(settings, inference, monitor, telemetry)
    telemetry.metrics.images_queued.set_function(lambda: inference.queued)

    server = grpc.aio.server(
        # TelemetryInterceptor outermost, to see every call's final status; then
        # ErrorInterceptor, which maps what AuthInterceptor raises; CallBudgetInterceptor
        # before AuthInterceptor, so that a call past its budget is not even authenticated.
        interceptors=[
            TelemetryInterceptor(telemetry),
            ErrorInterceptor(on_reported=lambda err: telemetry.count_rejection(err.reason)),
            CallBudgetInterceptor(settings),
            AuthInterceptor(authenticator),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            *connection_options(settings),
        ],
    )
    searcher = Searcher(
        analyzer,
        ServedIndex(settings.search_index_dir, settings.search_index_check_seconds),
        settings.max_search_k,
    )
    await searcher.served.refresh()  # loaded before the first call, not by it
    pb_grpc.add_FashionAnalysisServiceServicer_to_server(
        FashionAnalysisServicer(analyzer, searcher), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection_enabled:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    try:
        port = _listen(server, settings.listen_address, credentials)
        if settings.health_port is not None:
            # Health alone, plaintext (probes send no credentials and reveal nothing), with
            # call budgets of its own; the same servicer, so both ports tell the same.
            health_server = grpc.aio.server(
                interceptors=[CallBudgetInterceptor(settings)],
                options=connection_options(settings),
            )
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
            health_port = _listen(health_server, f"{settings.bind_host}:{settings.health_port}")
    except OSError:
        await pool.close()
        raise
    gateway = GatewayServer(
        settings, server, analyzer, monitor, pool, health_servicer, port, health_server, health_port
    )
    return gateway, port


def connection_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """gRPC server options that bound connections: streams per connection, keepalive
    (dead peers are reaped, clients that ping too often are refused), idle and age limits."""

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    return [
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        # Client pings on a connection without calls are accepted at the interval below
        # (otherwise gRPC allows one every two hours); idle connections are closed anyway.
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            ms(settings.min_client_ping_interval_seconds),
        ),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_seconds)),
        # Without this a second gateway on the same port would start and silently share
        # the port (gRPC sets SO_REUSEPORT by default on Linux).
        ("grpc.so_reuseport", 0),
    ]


def _listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind ``server`` to ``address`` (TLS with ``credentials``); returns the port."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use?)")
    return port


# ------------------------------------------------------------------------ logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line (for log collectors)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON: time, level, logger, message and any exception."""
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in REQUEST_FIELDS:  # set by RequestContextFilter while serving a request
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(log_format: str, verbose: bool = False) -> None:
    """Send logs to stderr as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


# ------------------------------------------------------------------------ serve
async def serve_async(
    settings: GatewaySettings, on_ready: Callable[[GatewayServer], None] | None = None
) -> None:
    """Run the gateway until SIGINT or SIGTERM, then shut down gracefully."""
    gateway, _ = await create_server(settings)
    await gateway.start()
    log.info(
        "fashionserve gateway %s listening on %s (Triton %s, auth %s, health port %s)",
        __version__,
        gateway.address,
        ", ".join(settings.triton_urls),
        "on" if settings.auth_enabled else "OFF",
        gateway.health_port or "off",
    )
    if on_ready is not None:
        on_ready(gateway)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down (grace %.1f s)", settings.shutdown_grace_seconds)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await gateway.stop()
    log.info("gateway stopped")


def serve(settings: GatewaySettings, ready_file: Path | None = None) -> int:
    """Blocking entry point of ``fashionserve gateway``; returns the exit code.

    With ``ready_file``, writes ``{"address": "HOST:PORT", "port": N, "metrics_port": M,
    "health_port": H}`` there once listening (for scripts and tests that bind port 0;
    ``metrics_port`` and ``health_port`` are null when off).
    """

    def on_ready(gateway: GatewayServer) -> None:
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            ready = {
                "address": gateway.address,
                "port": gateway.port,
                "metrics_port": gateway.metrics_port,
                "health_port": gateway.health_port,
            }
            tmp.write_text(json.dumps(ready))
            tmp.replace(ready_file)

    try:
        asyncio.run(serve_async(settings, on_ready))
    except (OSError, Error) as exc:  # a port, key, JWKS or TLS file
        log.error("%s", exc)
        return 1
    return 0
