"""The analyzer: the gateway's request flow on plain data, free of gRPC.

:class:`Analyzer` serves the three analysis calls: bytes and :class:`RawOptions` in, an
:class:`~fashionserve.gateway.results.ImageResult` or a :class:`fashionserve.errors.Error`
out. Each call is admitted, its images checked in the image-check pool
(:class:`~fashionserve.gateway.image_checks.ImageCheckPool`, off the event loop), then
awaited from the batched inference path
(:class:`~fashionserve.gateway.inference.BatchedInference`) and decoded with the taxonomy of
the tagger that produced it, which the serving monitor keeps track of.

:class:`Limits` and :class:`ServingInfo` are the server's side of GetServingInfo; the client
library has types of the same names and fields (``fashionserve.clients.types``) built from
the protobuf message. Both exist because the client may import only the protos: the
servicer converts these to the message, the client converts the message to its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from fashionserve.errors import Error, ErrorKind
from fashionserve.gateway import __version__
from fashionserve.gateway.auth.identity import LOCAL_IDENTITY, current_identity, require_scope
from fashionserve.gateway.batcher import bounded_map
from fashionserve.gateway.capture import Capture, Pending
from fashionserve.gateway.failures import ResourceExhausted, Unavailable, as_error, request_id_var
from fashionserve.gateway.image_checks import ImageCheckPool, cpu_limit
from fashionserve.gateway.inference import BatchedInference
from fashionserve.gateway.monitor import ServingMonitor
from fashionserve.gateway.quota import Admission
from fashionserve.gateway.results import ImageOutput, ImageResult, assemble_result
from fashionserve.gateway.served_state import ServedModel
from fashionserve.gateway.settings import GatewaySettings
from fashionserve.gateway.telemetry import Telemetry, child_span
from fashionserve.gateway.validation import (
    ACCEPTED_FORMATS,
    ImageInfo,
    ImageLimits,
    StreamLimit,
    ValidatedOptions,
    validate_image_count,
    validate_options,
    validate_request_id,
)
from fashionserve.taxonomy import Taxonomy
from fashionserve.thresholds import ThresholdSet

log = logging.getLogger(__name__)

# Until Triton has told us its cap (ensemble parameter max_crops_per_image), accept any
# max_garments up to this; the ensemble never returns more than its own cap anyway.
FALLBACK_MAX_GARMENTS = 1024
# The reason a stream ends with when its model versions are gone (EndpointPool says it too).
VERSION_CHANGED = "SERVED_VERSION_CHANGED"
# Problems of the service rather than of one image: in BatchAnalyze they fail the whole
# call, so that callers retry it as a whole.
_WHOLE_CALL_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED})


@dataclass(frozen=True)
class RawOptions:
    """Options as the caller sent them (zero values mean defaults)."""

    min_score: float = 0.0
    max_garments: int = 0
    include_embeddings: bool = False
    include_probability_tables: bool = False


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
    outcome: ImageResult | Error


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
    thresholds: ThresholdSet | None = None  # the calibrated set decisions use, if any


@dataclass
class StreamPin:
    """What keeps one stream's answers (or one BatchAnalyze call's) to one set of model
    versions, even mid-rollout.

    ``versions``: those most Triton endpoints served when the stream sent its first image
    (:meth:`EndpointPool.preferred_versions`); every image of the stream goes only to
    endpoints serving them. Endpoints are known by their last probe, so a Triton switched
    since then could still answer: ``taxonomy_hash`` (of the first answer decoded) catches
    the switches a caller would see, a tagger with another label layout. Either way the
    stream ends with UNAVAILABLE (SERVED_VERSION_CHANGED): the caller opens a new one.
    """

    versions: str | None = None
    taxonomy_hash: str | None = None

    def check(self, taxonomy: Taxonomy) -> None:
        """Raise unless ``taxonomy`` decoded this stream's answers so far."""
        if self.taxonomy_hash is None:
            self.taxonomy_hash = taxonomy.hash
        elif taxonomy.hash != self.taxonomy_hash:
            raise Unavailable(
                VERSION_CHANGED,
                "the model versions this stream started on are no longer served; open a new stream",
                {"streamVersions": self.versions or ""},
            )


class IdleLimit:
    """Stops reading a stream whose caller sends nothing for ``seconds`` while a request is
    awaited; :attr:`exceeded` is then the error to end the call with, once the requests read
    are answered. Time the gateway spends not reading (flow control) does not count."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.exceeded: ResourceExhausted | None = None

    async def read(self, items: AsyncIterator[StreamItem]) -> AsyncIterator[StreamItem]:
        """``items`` until they end or one is awaited for longer than ``seconds``."""
        iterator = aiter(items)
        while True:
            try:
                async with asyncio.timeout(self.seconds):
                    item = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self.exceeded = ResourceExhausted(
                    "STREAM_IDLE",
                    f"no request came for {self.seconds:g} s; open a new stream when there "
                    "is work to send",
                    {"streamIdleTimeoutSeconds": f"{self.seconds:g}"},
                )
                return
            yield item


def _tenant() -> str:
    """The tenant of the request being served (quotas are kept per tenant)."""
    identity = current_identity()
    return (identity or LOCAL_IDENTITY).tenant


class Analyzer:
    """Validate, micro-batch, infer and decode: the three analysis calls on plain data."""

    def __init__(
        self,
        settings: GatewaySettings,
        inference: BatchedInference,
        monitor: ServingMonitor,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.inference = inference
        self.monitor = monitor
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        self.limits = ImageLimits(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_png_chunks=settings.max_png_chunks,
            max_png_metadata_bytes=settings.max_png_metadata_bytes,
        )
        self.image_checks = ImageCheckPool(
            self.limits,
            workers=settings.image_check_workers or cpu_limit(),
            max_queued=settings.max_queued_image_checks,
        )
        self.admission = Admission(
            settings,
            queued=lambda: self.inference.queued,
            on_backend_error=telemetry.metrics.quota_backend_errors.inc,
        )
        self.capture = Capture.from_settings(settings.capture, telemetry.metrics.capture_records)

    @property
    def taxonomy(self) -> Taxonomy:
        """The taxonomy results are decoded with (GetTaxonomy, GetServingInfo)."""
        return self.monitor.served_taxonomy

    @property
    def thresholds(self) -> ThresholdSet | None:
        """The calibrated threshold set :attr:`taxonomy` decides with (None: its own)."""
        return self.monitor.served_thresholds

    def start(self) -> None:
        """Start the batched inference path (inside the event loop)."""
        self.inference.start()
        if self.capture is not None:
            self.capture.start()

    async def close(self) -> None:
        """Stop taking requests and finish the batches in flight."""
        await self.inference.close()
        self.image_checks.close()
        await self.admission.close()
        if self.capture is not None:  # writes what is queued: joins a thread, off the loop
            await asyncio.to_thread(self.capture.close)

    # ------------------------------------------------------------------ options
    def resolve_options(self, raw: RawOptions) -> ValidatedOptions:
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
        self,
        image: bytes,
        raw: RawOptions,
        deadline: float | None = None,
        pin: StreamPin | None = None,
    ) -> ImageResult:
        """Analyze one image; raises :class:`fashionserve.errors.Error`.

        ``deadline`` (``time.monotonic()`` seconds, the caller's) travels with the image:
        past it, the image is not sent to Triton, and the Triton call ends by it. ``pin``:
        the model versions of the stream it belongs to.
        """
        return await self.analyze_validated(image, self.resolve_options(raw), deadline, pin)

    async def analyze_validated(
        self,
        image: bytes,
        options: ValidatedOptions,
        deadline: float | None = None,
        pin: StreamPin | None = None,
    ) -> ImageResult:
        """:meth:`analyze` with options already validated: visual search asks for the
        embedding it needs itself, which a caller without the "embed" scope may not."""
        async with self.admission.admit(_tenant(), 1):
            (checked,) = await self._check([image])
            if isinstance(checked, Error):
                raise checked
            await self.monitor.require_serving()
            if pin is not None and pin.versions is None:
                pin.versions = self.inference.pool.preferred_versions()
            return await self._infer(image, options, deadline, pin)

    async def analyze_batch(
        self, images: Sequence[bytes], raw: RawOptions, deadline: float | None = None
    ) -> list[ImageResult | Error]:
        """Analyze several images; one outcome per image, in order.

        An image's own problem (bad bytes, refused by the ensemble) is that entry's error.
        A problem of the service (not serving, Triton unreachable, too slow, no room to
        check every image) fails the whole call, so that callers retry it as a whole.
        Its images are answered by one set of model versions (:class:`StreamPin`), or the
        call fails with UNAVAILABLE (SERVED_VERSION_CHANGED).
        """
        validate_image_count(len(images), self.settings.max_images_per_batch_request)
        options = self.resolve_options(raw)
        async with self.admission.admit(_tenant(), len(images)):
            await self.monitor.require_serving()
            checked = await self._check(images)
            # The images may be batched apart, hence sent to different Tritons.
            pin = StreamPin(self.inference.pool.preferred_versions())
            outcomes = await asyncio.gather(
                *(
                    self._infer_checked(image, info, options, deadline, pin)
                    for image, info in zip(images, checked, strict=True)
                )
            )
        for outcome in outcomes:
            if isinstance(outcome, Error) and outcome.kind in _WHOLE_CALL_KINDS:
                raise outcome
        for outcome in outcomes:
            if isinstance(outcome, Error):
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
        including an unavailable ensemble, is the error of the request it concerns; the
        stream goes on, up to its length limits, which raise RESOURCE_EXHAUSTED
        (STREAM_TOO_LONG): past ``max_stream_requests`` reading stops and the requests read
        are answered first; past ``max_stream_duration_seconds`` the call ends at once.
        ``emit`` (the write to the caller) runs inside the duration limit, so a caller that
        stops reading answers cannot hold the call open either. A caller that sends nothing
        for ``stream_idle_timeout_seconds`` while a request is awaited has its stream
        ended the same way, after its answers (STREAM_IDLE). A tenant has at most
        ``max_streams_per_tenant`` streams open (TENANT_STREAM_LIMITED). All answers come
        from one set of model versions (:class:`StreamPin`); once those are no longer
        served the call ends with UNAVAILABLE (SERVED_VERSION_CHANGED).
        """
        limit = StreamLimit(
            self.settings.max_stream_requests, self.settings.max_stream_duration_seconds
        )
        idle = IdleLimit(self.settings.stream_idle_timeout_seconds)

        pin = StreamPin()

        async def answer(item: StreamItem) -> StreamOutcome:
            try:
                validate_request_id(item.request_id)
                result = await self.analyze(item.image, item.options, deadline, pin)
            except Exception as exc:
                err = as_error(exc)
                if err.reason == VERSION_CHANGED:
                    raise  # ends the call: no answer of other versions on this stream
                self.telemetry.count_rejection(err.reason)
                return StreamOutcome(item.request_id, err)
            return StreamOutcome(item.request_id, result)

        with self.admission.open_stream(_tenant()):
            async with (
                limit.deadline(),
                contextlib.aclosing(
                    bounded_map(
                        limit.read(idle.read(items)), answer, self.settings.max_stream_in_flight
                    )
                ) as outcomes,
            ):
                async for outcome in outcomes:
                    await emit(outcome)
        if limit.exceeded is not None:
            raise limit.exceeded
        if idle.exceeded is not None:
            raise idle.exceeded

    async def _infer_checked(
        self,
        image: bytes,
        checked: ImageInfo | Error,
        options: ValidatedOptions,
        deadline: float | None,
        pin: StreamPin,
    ) -> ImageResult | Error:
        if isinstance(checked, Error):
            return checked
        try:
            return await self._infer(image, options, deadline, pin)
        except Exception as exc:
            return as_error(exc)

    async def _check(self, images: Sequence[bytes]) -> list[ImageInfo | Error]:
        """Each image's checks, in the image-check pool: they are work a caller controls
        (a crafted JPEG can take 0.2 s to tell whole from cut), which must not stall the
        event loop that serves every other call."""
        with child_span(self.tracer, "validate"):
            return await self.image_checks.check(images)

    async def _infer(
        self,
        image: bytes,
        options: ValidatedOptions,
        deadline: float | None,
        pin: StreamPin | None = None,
    ) -> ImageResult:
        output = await self.inference.infer(image, deadline, pin.versions if pin else None)
        with child_span(self.tracer, "decode"):
            # The served model may have changed while the batch ran (a reload).
            self.monitor.check_taxonomy()
            taxonomy = await self._taxonomy_for(output)
            if pin is not None and output.garments:  # no logits: nothing tells versions apart
                pin.check(taxonomy)
            result = assemble_result(output, taxonomy, options)
        self._capture(image, output, taxonomy)
        return result

    def _capture(self, image: bytes, output: ImageOutput, taxonomy: Taxonomy) -> None:
        """Hand a sampled result to capture: references only, the rest is the writer's."""
        tenant = _tenant()
        if self.capture is None or not self.capture.sampled(tenant):
            return
        self.capture.offer(
            Pending(
                request_id_var.get(),
                tenant,
                time.time_ns() // 1_000_000,
                image,
                output,
                taxonomy,
                self.monitor.state.models,
            )
        )

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
            thresholds=self.thresholds,
        )
