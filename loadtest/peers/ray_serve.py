"""The Ray Serve reference: the fashion pipeline served the way Ray's documentation shows.

What a team would build with the popular Python serving stack instead of fashionserve, on
the same machine, for ``fashionserve loadtest bench`` to measure side by side:

- the same work: the exported repository's ONNX files in ONNX Runtime and the project's
  own preprocess, crop and taxonomy decoding (:mod:`~fashionserve.loadtest.peers.pipeline`);
- the same API: ``fashion.v1.FashionAnalysisService/Analyze`` through Ray Serve's gRPC
  proxy (``gRPCOptions(grpc_servicer_functions=[...])``; a deployment method named like the
  RPC answers it), so the load generator drives it as it drives the gateway;
- the same batching: ``@serve.batch`` with the gateway's ``max_batch_size`` and wait;
- the same cores: replicas whose ``num_cpus`` add up to the cores given (2 by default), each
  running ONNX Runtime and the decoding with as many threads as its share.

Tuned as Ray's guides advise (and noted in BENCHMARKS.md): 4 replicas of half a core
each with one thread (faster than 2 x 1 and 1 x 2 on two cores: the Python parts of a
batch hold the GIL, so processes overlap better than threads); ``max_ongoing_requests`` of two
batches per replica so a batch can fill while the previous one runs (the default, 5, caps
batches below 8); the batch runs in a thread so the replica's event loop keeps accepting
requests; access logs off; no dashboard. The whole pipeline sits in one deployment rather
than one deployment per model: every step needs the same resource (CPU) and scales with
the others, and on two cores the hops between deployments (serialising the source
canvases and crops through Ray's object store) cost more than they give.

Not secure: Ray's gRPC proxy listens on every interface without TLS or authentication.
It is a local benchmark peer, never a deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.schema import LoggingConfig

from fashionserve.errors import Error
from fashionserve.gateway.errors import status_code
from fashionserve.loadtest.peers.pipeline import Pipeline, PipelineSpec
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc
from fashionserve.triton import free_port

log = logging.getLogger(__name__)

SERVICER_FUNCTION = (
    "fashionserve.protos.fashion.v1.analysis_service_pb2_grpc."
    "add_FashionAnalysisServiceServicer_to_server"
)
"""What Ray's gRPC proxy registers (an import path: the proxy is another process)."""

APP_NAME = "fashion"


@dataclass(frozen=True)
class RayServeSettings:
    """How the reference is served. ``max_batch_size`` and ``batch_wait_s`` are the gateway
    batcher's (``max_batch_size``, ``max_queue_delay_microseconds``)."""

    repository: Path
    port: int = 0
    cores: int = 2
    replicas: int = 4  # measured best on 2 cores: see BENCHMARKS.md, "Ray Serve reference"
    max_batch_size: int = 8
    batch_wait_s: float = 0.0

    @property
    def threads(self) -> int:
        """ONNX Runtime and decoding threads per replica: its share of the cores."""
        return max(1, self.cores // self.replicas)


class FashionPipeline:
    """``Analyze`` of ``fashion.v1.FashionAnalysisService``, batched across callers (the
    deployment: :func:`serve_ray` wraps it with ``serve.deployment``)."""

    def __init__(self, spec: PipelineSpec, threads: int, max_batch_size: int, wait_s: float):
        self.pipeline = Pipeline(spec, threads)
        # serve.batch's setters, Ray's documented way to size batches at run time (its
        # type hints do not show them).
        handler: Any = self.analyze_batch
        handler.set_max_batch_size(max_batch_size)
        handler.set_batch_wait_timeout_s(wait_s)

    async def Analyze(  # the RPC's name: Ray's gRPC proxy calls the method named like it
        self, request: pb.AnalyzeRequest, grpc_context: RayServegRPCContext
    ) -> pb.AnalyzeResponse:
        answer = await self.analyze_batch(request)
        if isinstance(answer, Error):
            grpc_context.set_code(status_code(answer))
            grpc_context.set_details(f"{answer.reason}: {answer.message}")
            return pb.AnalyzeResponse()
        return answer

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def analyze_batch(
        self, requests: list[pb.AnalyzeRequest]
    ) -> list[pb.AnalyzeResponse | Error]:
        # In a thread: ONNX Runtime and PIL release the GIL, and the event loop keeps
        # taking requests for the next batch meanwhile.
        return await asyncio.to_thread(self.pipeline.analyze, requests)


def _probe_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "JPEG")
    return buf.getvalue()


def _wait_answering(address: str, timeout: float) -> None:
    """Until an ``Analyze`` through the proxy succeeds: the proxy learns of the
    application's route a moment after ``serve.run`` returns."""
    request = pb.AnalyzeRequest(image=pb.Image(data=_probe_image()))
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FashionAnalysisServiceStub(channel)
        while True:
            try:
                stub.Analyze(request, timeout=10)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def serve_ray(settings: RayServeSettings, ready_file: Path | None = None) -> int:
    """Start a local Ray cluster of ``settings.cores`` CPUs, serve the reference through
    the gRPC proxy, and serve until SIGTERM or SIGINT. Writes ``127.0.0.1:PORT`` to
    ``ready_file`` once an Analyze call has been answered."""
    spec = PipelineSpec.from_repository(settings.repository)
    port = settings.port or free_port()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls home
    ray.init(
        num_cpus=settings.cores,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 1024 * 1024,  # requests and answers only: no models
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": free_port()},
            grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER_FUNCTION]),
        )
        deployment = serve.deployment(
            num_replicas=settings.replicas,
            ray_actor_options={"num_cpus": settings.cores / settings.replicas},
            max_ongoing_requests=2 * settings.max_batch_size,
        )(FashionPipeline)
        app = deployment.bind(
            spec, settings.threads, settings.max_batch_size, settings.batch_wait_s
        )
        serve.run(
            app,
            name=APP_NAME,
            logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        )
        address = f"127.0.0.1:{port}"
        _wait_answering(address, timeout=120)
        log.info(
            "Ray Serve reference on %s: %d replicas x %d threads",
            address,
            settings.replicas,
            settings.threads,
        )
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(address + "\n")
            tmp.replace(ready_file)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        with contextlib.suppress(Exception):  # shutting down what may not have started
            serve.shutdown()
        ray.shutdown()
    return 0
