"""The batched inference path: images from many calls, micro-batched into ensemble calls.

:class:`BatchedInference` is what the analyzer awaits for each image: it queues the image
in a :class:`~fashionserve.gateway.batcher.MicroBatcher` and sends each batch to the
:class:`~fashionserve.gateway.endpoints.EndpointPool`, which runs it on a Triton endpoint.
It knows nothing of decoding; it returns each image's raw ensemble output.

One ensemble call serves several requests, so its span ``triton_infer`` is the child of the
first request's span and links to every request's span; each recorded request gets a
``batch_wait`` span of its own for its time in the queue; and the call's failures are
logged with every request's id.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry import trace

from fashionserve.gateway.batcher import MicroBatcher
from fashionserve.gateway.endpoints import EndpointPool
from fashionserve.gateway.failures import batch_requests_var, request_id_var
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.settings import GatewaySettings
from fashionserve.gateway.telemetry import Telemetry, link_context


@dataclass(frozen=True)
class _Job:
    """One image in the micro-batcher, with the id and span of the request that sent it (the
    batch's span links to it) and when it was queued (wall clock, ns, for its span)."""

    image: bytes
    request_id: str
    span: trace.SpanContext
    queued_ns: int
    versions: str | None  # the model versions that must answer it (a stream's), None: any


class BatchedInference:
    """Images in, ensemble outputs out, batched across concurrent calls."""

    def __init__(self, settings: GatewaySettings, pool: EndpointPool, telemetry: Telemetry) -> None:
        self.pool = pool
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        self.batcher: MicroBatcher[_Job, ImageOutput] = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_microseconds=settings.max_queue_delay_microseconds,
            max_batches_in_flight=settings.max_batches_in_flight,
            batch_size=telemetry.metrics.batch_size,
            queue_wait_seconds=telemetry.metrics.batch_wait_seconds,
            # One ensemble call is answered by one endpoint: its images must accept the
            # same model versions.
            key=lambda job: job.versions,
        )

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self.batcher.queued

    def start(self) -> None:
        """Start batching (inside the event loop)."""
        self.batcher.start()

    async def close(self) -> None:
        """Take no more images and finish the batches in flight."""
        await self.batcher.close()

    async def infer(
        self, image: bytes, deadline: float | None, versions: str | None = None
    ) -> ImageOutput:
        """The ensemble's output for ``image``. ``deadline`` (``time.monotonic()`` seconds):
        past it the image is not sent (DEADLINE_EXCEEDED), and the Triton call ends by it.
        ``versions``: only endpoints serving these model versions answer it (see
        :meth:`EndpointPool.infer`). Raises UNAVAILABLE (SHUTTING_DOWN) once closing."""
        job = _Job(
            image,
            request_id_var.get(),
            trace.get_current_span().get_span_context(),
            time.time_ns(),
            versions,
        )
        return await self.batcher.submit(job, deadline)

    async def _run_batch(
        self, jobs: list[_Job], deadline: float | None
    ) -> Sequence[ImageOutput | BaseException]:
        """One ensemble call for a batch, traced and timed, bounded by the batch's latest
        deadline."""
        # Each batch runs in a task of its own: this is seen by its call only.
        batch_requests_var.set(",".join(job.request_id for job in jobs))
        metrics = self.telemetry.metrics
        with (
            self._batch_span(jobs),
            metrics.batches_in_flight.track_inprogress(),
            metrics.triton_seconds.time(),
        ):
            versions = next((job.versions for job in jobs if job.versions), None)
            return await self.pool.infer([job.image for job in jobs], deadline, versions)

    def _batch_span(self, jobs: list[_Job]) -> contextlib.AbstractContextManager[object]:
        """The batch's ``triton_infer`` span, and a ``batch_wait`` span per recorded request.

        When no request's trace is recorded no span is started: the first request's span
        is made current instead, so that the ``traceparent`` sent to Triton still carries
        its trace.
        """
        recorded = [job for job in jobs if job.span.trace_flags.sampled]
        if not recorded:
            return trace.use_span(trace.NonRecordingSpan(jobs[0].span))
        sent = time.time_ns()
        for job in recorded:
            wait = self.tracer.start_span(
                "batch_wait", context=link_context(job.span), start_time=job.queued_ns
            )
            wait.end(end_time=sent)
        return self.tracer.start_as_current_span(
            "triton_infer",
            context=link_context(jobs[0].span),
            links=[trace.Link(job.span) for job in jobs if job.span.is_valid],
            attributes={"fashionserve.batch_size": len(jobs)},
        )
