"""The gateway's request flow, free of gRPC: validate, batch, infer, decode.

:class:`Analyzer` serves the three analysis calls on plain data (bytes and
:class:`~gateway.validation.AnalyzeOptions` in, :class:`~gateway.results.ImageResult` or a
:class:`~gateway.errors.GatewayError` out). :class:`ServingMonitor` keeps track of what
Triton serves: the health service and every request consult it, so the gateway never
decodes logits with a taxonomy other than the one the served tagger was exported with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from fashionserve.gateway import __version__
from fashionserve.gateway.auth import LOCAL_IDENTITY, current_identity, require_scope
from fashionserve.gateway.batcher import BatcherClosed, DeadlineExpired, MicroBatcher, bounded_map
from fashionserve.gateway.endpoints import EndpointPool
from fashionserve.gateway.errors import (
    DeadlineExceeded,
    GatewayError,
    Unavailable,
    as_gateway_error,
)
from fashionserve.gateway.quota import Admission
from fashionserve.gateway.results import ImageOutput, ImageResult, assemble_result
from fashionserve.gateway.settings import GatewaySettings
from fashionserve.gateway.telemetry import Telemetry, link_context
from fashionserve.gateway.triton_client import ServedModel, ServedState, serving_problem
from fashionserve.gateway.validation import (
    ACCEPTED_FORMATS,
    AnalyzeOptions,
    ImageLimits,
    StreamLimit,
    has_end_marker,
    inspect_image,
    validate_image_count,
    validate_options,
    validate_request_id,
)
from fashionserve.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# Until Triton has told us its cap (ensemble parameter max_crops_per_image), accept any
# max_garments up to this; the ensemble never returns more than its own cap anyway.
FALLBACK_MAX_GARMENTS = 1024
# Taxonomies of recently served taggers kept for decoding results still in flight.
_RECENT_TAXONOMIES = 4
# A request that finds the pipeline not serving re-checks Triton at most this often.
_RECHECK_SECONDS = 0.5
# A whole JPEG or PNG up to this size is checked on the event loop in about 0.2 ms, less
# than the hop to a worker thread costs.
INLINE_INSPECT_BYTES = 256 * 1024


@dataclass(frozen=True)
class RawOptions:
    """Options as the caller sent them (zero values mean defaults)."""

    min_score: float = 0.0
    max_garments: int = 0
    include_embeddings: bool = False
    include_probability_tables: bool = False


@dataclass(frozen=True)
class _Job:
    """One image in the micro-batcher, with the span of the request that sent it (the
    batch's span links to it) and when it was queued (wall clock, ns, for its span)."""

    image: bytes
    span: trace.SpanContext
    queued_ns: int


@dataclass(frozen=True)
class StreamItem:
    """One request of a stream."""

    request_id: str
    image: bytes
    options: RawOptions


@dataclass(frozen=True)
class StreamOutcome:
    """The answer to one stream request: a result or an error, with its id."""

    request_id: str
    outcome: ImageResult | GatewayError


@dataclass(frozen=True)
class Limits:
    """What a caller may send (GetServingInfo)."""

    max_image_bytes: int
    max_image_pixels: int
    max_images_per_batch: int
    max_message_bytes: int
    accepted_formats: tuple[str, ...]
    max_garments_per_image: int
    embedding_dimension: int


@dataclass(frozen=True)
class ServingInfo:
    """What is served and the limits (GetServingInfo)."""

    models: tuple[ServedModel, ...]
    taxonomy_version: str
    taxonomy_hash: str
    limits: Limits
    gateway_version: str


class ServingMonitor:
    """Whether the pipeline can serve: at least one Triton endpoint ready with a served
    taxonomy hash equal to the gateway's. :meth:`run` re-checks every endpoint every
    ``interval`` seconds and reports changes to ``on_change(serving)``."""

    def __init__(
        self,
        pipeline: EndpointPool,
        taxonomy: Taxonomy,
        interval: float,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.taxonomy = taxonomy
        self.interval = interval
        self.on_change = on_change
        self.state = ServedState(False, "not checked yet")
        self.serving = False
        self.problem = "not checked yet"
        self._refreshing: asyncio.Task[bool] | None = None
        self._last_refresh = 0.0
        # Taxonomies served lately, newest last: results of a tagger version that was just
        # switched away from may still arrive, and are decoded with its own taxonomy.
        self._recent: dict[str, Taxonomy] = {}

    @property
    def served_taxonomy(self) -> Taxonomy:
        """The taxonomy callers get results in: the served tagger's own when the ensemble
        publishes it (a rollout that adds labels needs no gateway restart), else the
        gateway's ``taxonomy_file``, which then must match the served hash."""
        return self.state.taxonomy or self.taxonomy

    def decoding_taxonomy(self, width: int) -> Taxonomy | None:
        """The taxonomy whose logit layout is ``width`` wide: the served one first, then
        those of the other endpoints and of recent versions (a rollout in progress)."""
        endpoint_states = [e.state for e in self.pipeline.endpoints.values()]
        candidates = [
            self.served_taxonomy,
            *(s.taxonomy for s in endpoint_states if s.taxonomy is not None),
            *reversed(self._recent.values()),
        ]
        return next((t for t in candidates if t.num_logits == width), None)

    async def refresh(self) -> bool:
        """Check Triton now (concurrent callers share one check); return ``serving``."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> bool:
        self._last_refresh = time.monotonic()
        state = await self.pipeline.describe()
        problem = serving_problem(state, self.taxonomy)
        serving = not problem
        before = self.served_taxonomy
        if state.taxonomy is not None and state.taxonomy.hash != before.hash:
            log.info(
                "decoding with the served taxonomy %s (%s), was %s (%s)",
                state.taxonomy.version,
                state.taxonomy.hash[:12],
                before.version,
                before.hash[:12],
            )
        if state.taxonomy is not None:
            self._recent.pop(state.taxonomy.hash, None)
            self._recent[state.taxonomy.hash] = state.taxonomy
            while len(self._recent) > _RECENT_TAXONOMIES:
                self._recent.pop(next(iter(self._recent)))
        self.state = state
        changed = serving != self.serving or problem != self.problem
        self.serving, self.problem = serving, problem
        if changed:
            if serving:
                log.info(
                    "pipeline SERVING (Triton %s: %d endpoint(s) ready, taxonomy matches)",
                    self.pipeline.url,
                    len(self.pipeline.admitted),
                )
            else:
                log.warning("pipeline NOT_SERVING: %s", problem)
            if self.on_change is not None:
                await self.on_change(serving)
        return serving

    async def run(self) -> None:
        """Re-check forever (cancel to stop)."""
        while True:
            try:
                await self.refresh()
            except Exception:  # the monitor must survive anything a check throws
                log.exception("serving check failed")
            await asyncio.sleep(self.interval)

    async def require_serving(self) -> None:
        """Raise UNAVAILABLE unless serving (re-checking at most every half second)."""
        if self.serving:
            return
        if time.monotonic() - self._last_refresh >= _RECHECK_SECONDS and await self.refresh():
            return
        self.check_taxonomy()
        raise Unavailable("NOT_SERVING", f"the pipeline is not serving: {self.problem}")

    def check_taxonomy(self) -> None:
        """Raise UNAVAILABLE (TAXONOMY_MISMATCH) if the served tagger is known to have been
        exported with another taxonomy than the gateway's, one the ensemble does not
        publish: its logits cannot be decoded."""
        if (
            self.state.ready
            and self.state.taxonomy is None
            and self.state.taxonomy_hash != self.taxonomy.hash
        ):
            raise Unavailable(
                "TAXONOMY_MISMATCH",
                self.problem,
                {
                    "servedTaxonomyHash": self.state.taxonomy_hash,
                    "gatewayTaxonomyHash": self.taxonomy.hash,
                },
            )


def _tenant() -> str:
    """The tenant of the request being served (quotas are kept per tenant)."""
    identity = current_identity()
    return (identity or LOCAL_IDENTITY).tenant


class Analyzer:
    """Validate, micro-batch, infer and decode: the three analysis calls on plain data."""

    def __init__(
        self,
        settings: GatewaySettings,
        taxonomy: Taxonomy,
        pipeline: EndpointPool,
        monitor: ServingMonitor,
        telemetry: Telemetry,
    ) -> None:
        del taxonomy  # the monitor's: it follows the served tagger (see ServingMonitor)
        self.settings = settings
        self.pipeline = pipeline
        self.monitor = monitor
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        self.limits = ImageLimits(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_png_chunks=settings.max_png_chunks,
        )
        self.batcher: MicroBatcher[_Job, ImageOutput] = MicroBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_microseconds=settings.max_queue_delay_microseconds,
            max_batches_in_flight=settings.max_batches_in_flight,
            batch_size=telemetry.metrics.batch_size,
            queue_wait_seconds=telemetry.metrics.batch_wait_seconds,
        )
        self.admission = Admission(settings, queued=lambda: self.batcher.queued)

    @property
    def taxonomy(self) -> Taxonomy:
        """The taxonomy results are decoded with (GetTaxonomy, GetServingInfo)."""
        return self.monitor.served_taxonomy

    def start(self) -> None:
        """Start the batcher (inside the event loop)."""
        self.batcher.start()

    async def close(self) -> None:
        """Stop taking requests and finish the batches in flight."""
        await self.batcher.close()

    # ------------------------------------------------------------------ options
    def resolve_options(self, raw: RawOptions) -> AnalyzeOptions:
        """Validate the caller's options against the served caps and the caller's scopes."""
        cap = self.monitor.state.max_crops_per_image or FALLBACK_MAX_GARMENTS
        options = validate_options(
            raw.min_score,
            raw.max_garments,
            raw.include_embeddings,
            raw.include_probability_tables,
            max_garments_cap=cap,
        )
        if options.include_embeddings:
            require_scope("embed")
        return options

    # ------------------------------------------------------------------ analysis
    async def analyze(
        self, image: bytes, raw: RawOptions, deadline: float | None = None
    ) -> ImageResult:
        """Analyze one image; raises :class:`GatewayError`.

        ``deadline`` (``time.monotonic()`` seconds, the caller's) travels with the image:
        past it, the image is not sent to Triton, and the Triton call ends by it.
        """
        options = self.resolve_options(raw)
        with self.admission.admit(_tenant(), 1):
            await self._inspect(image)
            await self.monitor.require_serving()
            return await self._infer(image, options, deadline)

    async def analyze_batch(
        self, images: Sequence[bytes], raw: RawOptions, deadline: float | None = None
    ) -> list[ImageResult | GatewayError]:
        """Analyze several images; one outcome per image, in order.

        An image's own problem (bad bytes, refused by the pipeline) is that entry's error.
        A problem of the service (not serving, Triton unreachable, too slow) fails the
        whole call, so that callers retry it as a whole.
        """
        validate_image_count(len(images), self.settings.max_images_per_batch_request)
        options = self.resolve_options(raw)
        with self.admission.admit(_tenant(), len(images)):
            await self.monitor.require_serving()
            outcomes = await asyncio.gather(
                *(self._analyze_safe(i, options, deadline) for i in images)
            )
        for outcome in outcomes:
            if isinstance(outcome, Unavailable | DeadlineExceeded):
                raise outcome
        for outcome in outcomes:
            if isinstance(outcome, GatewayError):
                self.telemetry.count_rejection(outcome.reason)
        return list(outcomes)

    async def analyze_stream(
        self,
        items: AsyncIterator[StreamItem],
        emit: Callable[[StreamOutcome], Awaitable[None]],
        deadline: float | None = None,
    ) -> None:
        """Answer a stream of requests, out of order, each with its id, through ``emit``.

        At most ``max_stream_in_flight`` requests are read but not yet answered: the next
        request is read only when one has been answered (flow control). Every problem,
        including an unavailable pipeline, is the error of the request it concerns; the
        stream goes on, up to its length limits, which raise RESOURCE_EXHAUSTED
        (STREAM_TOO_LONG): past ``max_stream_requests`` reading stops and the requests read
        are answered first; past ``max_stream_duration_seconds`` the call ends at once.
        ``emit`` (the write to the caller) runs inside the duration limit, so a caller that
        stops reading answers cannot hold the call open either.
        """
        limit = StreamLimit(
            self.settings.max_stream_requests, self.settings.max_stream_duration_seconds
        )

        async def answer(item: StreamItem) -> StreamOutcome:
            try:
                validate_request_id(item.request_id)
                result = await self.analyze(item.image, item.options, deadline)
            except Exception as exc:
                err = as_gateway_error(exc)
                self.telemetry.count_rejection(err.reason)
                return StreamOutcome(item.request_id, err)
            return StreamOutcome(item.request_id, result)

        async with (
            limit.deadline(),
            contextlib.aclosing(
                bounded_map(limit.read(items), answer, self.settings.max_stream_in_flight)
            ) as outcomes,
        ):
            async for outcome in outcomes:
                await emit(outcome)
        if limit.exceeded is not None:
            raise limit.exceeded

    async def _analyze_safe(
        self, image: bytes, options: AnalyzeOptions, deadline: float | None
    ) -> ImageResult | GatewayError:
        try:
            await self._inspect(image)
            return await self._infer(image, options, deadline)
        except Exception as exc:
            return as_gateway_error(exc)

    async def _inspect(self, image: bytes) -> None:
        # Anything but a small image with its end marker goes to a worker thread: telling a
        # truncated JPEG from one with trailing data means a reduced decode (0.1 s for a
        # 17 MB photo), which must not stall the event loop that serves every other call;
        # PIL releases the GIL while it decodes.
        if len(image) <= INLINE_INSPECT_BYTES and has_end_marker(image):
            self._inspect_now(image)
        else:
            await asyncio.to_thread(self._inspect_now, image)

    def _inspect_now(self, image: bytes) -> None:
        with self.tracer.start_as_current_span("validate"):
            inspect_image(image, self.limits)

    async def _infer(
        self, image: bytes, options: AnalyzeOptions, deadline: float | None
    ) -> ImageResult:
        job = _Job(image, trace.get_current_span().get_span_context(), time.time_ns())
        try:
            output = await self.batcher.submit(job, deadline)
        except BatcherClosed as exc:
            raise Unavailable("SHUTTING_DOWN", "the gateway is shutting down; retry") from exc
        except DeadlineExpired as exc:
            raise DeadlineExceeded(
                "DEADLINE_EXCEEDED", "the call's deadline passed before the image was sent"
            ) from exc
        with self.tracer.start_as_current_span("decode"):
            # The served model may have changed while the batch ran (a reload).
            self.monitor.check_taxonomy()
            return assemble_result(output, await self._taxonomy_for(output), options)

    async def _taxonomy_for(self, output: ImageOutput) -> Taxonomy:
        """The taxonomy of the tagger that produced ``output``, told by its logit width.

        A rollout switches the served tagger between two health checks, so a result may
        come from a tagger the gateway has not described yet (re-check once), or from the
        one just switched away from (still known). A rollout that renames labels without
        changing the logit count cannot be told apart this way: the compatibility check
        refuses it unless forced (see README, "Versions and rollouts").
        """
        if not output.garments:
            return self.taxonomy
        width = int(output.garments[0].logits.shape[-1])
        found = self.monitor.decoding_taxonomy(width)
        if found is None:
            await self.monitor.refresh()
            found = self.monitor.decoding_taxonomy(width)
        if found is None:
            raise Unavailable(
                "TAXONOMY_MISMATCH",
                f"the served tagger returned {width} logits; no known taxonomy has that layout",
                {"logits": str(width), "gatewayTaxonomyHash": self.taxonomy.hash},
            )
        return found

    async def _run_batch(
        self, jobs: list[_Job], deadline: float | None
    ) -> Sequence[ImageOutput | BaseException]:
        """The batcher's backend: one ensemble call for a batch, traced and timed, bounded
        by the batch's latest deadline.

        One call serves several requests, so its span ``triton_infer`` is the child of the
        first request's span and links to every request's span; each request gets a
        ``batch_wait`` span of its own for its time in the queue.
        """
        sent = time.time_ns()
        for job in jobs:
            wait = self.tracer.start_span(
                "batch_wait", context=link_context(job.span), start_time=job.queued_ns
            )
            wait.end(end_time=sent)
        metrics = self.telemetry.metrics
        with (
            self.tracer.start_as_current_span(
                "triton_infer",
                context=link_context(jobs[0].span),
                links=[trace.Link(job.span) for job in jobs if job.span.is_valid],
                attributes={"fashionserve.batch_size": len(jobs)},
            ),
            metrics.batches_in_flight.track_inprogress(),
            metrics.triton_seconds.time(),
        ):
            return await self.pipeline.infer([job.image for job in jobs], deadline)

    # ------------------------------------------------------------------ info
    async def serving_info(self) -> ServingInfo:
        """Served model versions, taxonomy and the limits a caller must respect."""
        if not self.monitor.state.ready:
            await self.monitor.refresh()
        state = self.monitor.state
        return ServingInfo(
            models=state.models,
            taxonomy_version=self.taxonomy.version,
            taxonomy_hash=self.taxonomy.hash,
            limits=Limits(
                max_image_bytes=self.settings.max_image_bytes,
                max_image_pixels=self.settings.max_image_pixels,
                max_images_per_batch=self.settings.max_images_per_batch_request,
                max_message_bytes=self.settings.max_message_bytes,
                accepted_formats=ACCEPTED_FORMATS,
                max_garments_per_image=state.max_crops_per_image,
                embedding_dimension=state.embedding_dimension,
            ),
            gateway_version=__version__,
        )
