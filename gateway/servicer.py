"""The gRPC servicer: protobuf in, domain call, protobuf out. Nothing else lives here.

Validation, batching and decoding are in :mod:`fashionserve.gateway.core` and the modules it
uses; errors raised there are mapped to ``google.rpc.Status`` by
:class:`fashionserve.gateway.errors.ErrorInterceptor`, or become ``ItemError`` entries here
(with the same status code, :func:`fashionserve.gateway.errors.status_code`).

(KServe: ``protocol/grpc/servicer.py`` over ``protocol/dataplane.py``.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import overload

import grpc
import numpy as np
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from fashionserve.errors import Error
from fashionserve.gateway.core import Analyzer, RawOptions, ServingInfo, StreamItem, StreamOutcome
from fashionserve.gateway.errors import status_code
from fashionserve.gateway.results import Box, GarmentResult, ImageResult
from fashionserve.gateway.search import ImageQuery, Searcher, SearchOutcome, SearchQuery
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc
from fashionserve.search_index import IndexManifest
from fashionserve.taxonomy import ScoredLabel, Taxonomy
from fashionserve.thresholds import ThresholdSet

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FashionAnalysisService"].full_name


# ------------------------------------------------------------------ protobuf -> domain
def options_from_pb(options: pb.AnalyzeOptions) -> RawOptions:
    """The caller's options as plain data."""
    return RawOptions(
        min_score=options.min_score,
        max_garments=options.max_garments,
        include_embeddings=options.include_embeddings,
        include_probability_tables=options.include_probability_tables,
    )


def search_query_from_pb(request: pb.SearchSimilarRequest) -> SearchQuery:
    """A SearchSimilar request as plain data."""
    query: ImageQuery | np.ndarray | None = None
    which = request.WhichOneof("query")
    if which == "image":
        image = request.image
        selected = image.WhichOneof("garment")
        query = ImageQuery(
            image.image.data,
            garment_index=image.garment_index if selected == "garment_index" else None,
            box=_box_from_pb(image.box) if selected == "box" else None,
        )
    elif which == "embedding":
        query = np.asarray(request.embedding.values, np.float32)
    return SearchQuery(query, request.k, dict(request.filter), request.include_metadata)


def _box_from_pb(box: pb.Box) -> Box:
    return Box(box.x_min, box.y_min, box.x_max, box.y_max)


class ImageBytes(Sequence[bytes]):
    """The bytes of a request's repeated ``Image``, read on access. Its length is known at
    once, so the image count is checked before anything is copied: a message within the
    size limit can hold millions of empty images."""

    def __init__(self, images: RepeatedCompositeFieldContainer[pb.Image]) -> None:
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [image.data for image in self._images[index]]
        return self._images[index].data


# ------------------------------------------------------------------ domain -> protobuf
def _box(box: Box) -> pb.Box:
    return pb.Box(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)


def _labels(labels: list[ScoredLabel]) -> list[pb.ScoredLabel]:
    return [pb.ScoredLabel(name=s.name, probability=s.probability) for s in labels]


def garment_to_pb(g: GarmentResult) -> pb.Garment:
    """One garment as the API describes it."""
    return pb.Garment(
        box=_box(g.box),
        normalized_box=_box(g.normalized_box),
        detector_score=g.detector_score,
        detector_class=g.detector_class,
        category_path=_labels(g.category_path),
        tag_groups=[pb.TagGroupResult(group=n, labels=_labels(ls)) for n, ls in g.tag_groups],
        embedding=g.embedding or [],
        probability_tables=[
            pb.ProbabilityTable(name=n, labels=_labels(ls)) for n, ls in g.probability_tables
        ],
    )


def result_to_pb(result: ImageResult) -> pb.ImageResult:
    """One image's result."""
    return pb.ImageResult(
        width=result.width,
        height=result.height,
        garments=[garment_to_pb(g) for g in result.garments],
    )


def item_error_to_pb(err: Error) -> pb.ItemError:
    """A per-item error, shaped like google.rpc.Status with its one ErrorInfo flattened."""
    return pb.ItemError(
        code=status_code(err).value[0],
        message=err.message,
        reason=err.reason,
        metadata=err.metadata,
    )


def threshold_set_to_pb(thresholds: ThresholdSet | None) -> pb.ThresholdSetInfo | None:
    if thresholds is None:
        return None
    return pb.ThresholdSetInfo(
        name=thresholds.name,
        hash=thresholds.hash,
        target_recall=float(thresholds.calibration.get("target_recall", 0.0)),
    )


def taxonomy_to_pb(
    taxonomy: Taxonomy, thresholds: ThresholdSet | None = None
) -> pb.GetTaxonomyResponse:
    """The taxonomy: categories parents first, then the tag groups; the threshold of every
    decision ``taxonomy`` takes, and the calibrated set they come from (if any)."""
    order = sorted(taxonomy.nodes.values(), key=lambda n: len(n.path))  # stable: parents first
    calibrated = thresholds.thresholds if thresholds is not None else {}
    in_effect = []
    for key, kind in taxonomy.threshold_keys():
        group, _, label = key.rpartition("/")
        entry = calibrated.get(key)
        in_effect.append(
            pb.DecisionThreshold(
                name=key,
                threshold=taxonomy.threshold(kind, label, group or None),
                calibrated=entry is not None and entry.calibrated,
            )
        )
    return pb.GetTaxonomyResponse(
        thresholds=in_effect,
        threshold_set=threshold_set_to_pb(thresholds),
        version=taxonomy.version,
        hash=taxonomy.hash,
        categories=[
            pb.Category(name=n.name, parent=n.parent or "", path=list(n.path)) for n in order
        ],
        tag_groups=[
            pb.TagGroup(
                name=g.name,
                exclusive=g.exclusive,
                labels=list(g.labels),
                applies_to=list(g.applies_to or ()),
            )
            for g in taxonomy.groups
        ],
    )


def search_index_to_pb(manifest: IndexManifest) -> pb.SearchIndexInfo:
    """The served search index."""
    return pb.SearchIndexInfo(
        version=manifest.version,
        size=manifest.count,
        dimension=manifest.dimension,
        kind=manifest.kind,
        embedder_version=manifest.embedder.version,
        embedder_artifact_sha256=manifest.embedder.artifact_sha256,
        metadata_keys=list(manifest.metadata_columns),
    )


def search_outcome_to_pb(outcome: SearchOutcome) -> pb.SearchSimilarResponse:
    """The matches, best first, with the index they come from."""
    return pb.SearchSimilarResponse(
        matches=[
            pb.SearchMatch(product_id=m.product_id, score=m.score, metadata=dict(m.metadata))
            for m in outcome.matches
        ],
        index=search_index_to_pb(outcome.index),
        query_garment=garment_to_pb(outcome.query_garment) if outcome.query_garment else None,
    )


def serving_info_to_pb(
    info: ServingInfo, search_index: IndexManifest | None = None, max_search_k: int = 0
) -> pb.GetServingInfoResponse:
    """What is served and the limits."""
    lim = info.limits
    return pb.GetServingInfoResponse(
        search_index=search_index_to_pb(search_index) if search_index is not None else None,
        models=[
            pb.ServedModel(name=m.name, version=m.version, artifact_sha256=m.artifact_sha256)
            for m in info.models
        ],
        taxonomy_version=info.taxonomy_version,
        taxonomy_hash=info.taxonomy_hash,
        limits=pb.Limits(
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            max_images_per_batch=lim.max_images_per_batch,
            max_message_bytes=lim.max_message_bytes,
            accepted_formats=list(lim.accepted_formats),
            max_garments_per_image=lim.max_garments_per_image,
            embedding_dimension=lim.embedding_dimension,
            max_search_k=max_search_k,
        ),
        gateway_version=info.gateway_version,
        threshold_set=threshold_set_to_pb(info.thresholds),
    )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as ``time.monotonic()`` seconds (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class FashionAnalysisServicer(pb_grpc.FashionAnalysisServiceServicer):
    """fashion.v1.FashionAnalysisService over :class:`fashionserve.gateway.core.Analyzer`."""

    def __init__(self, analyzer: Analyzer, searcher: Searcher) -> None:
        self.analyzer = analyzer
        self.searcher = searcher

    async def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeResponse:
        """One image."""
        result = await self.analyzer.analyze(
            request.image.data, options_from_pb(request.options), deadline_of(context)
        )
        return pb.AnalyzeResponse(result=result_to_pb(result))

    async def BatchAnalyze(
        self, request: pb.BatchAnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchAnalyzeResponse:
        """Several images; per-image errors are entries, not a failed call."""
        outcomes = await self.analyzer.analyze_batch(
            ImageBytes(request.images), options_from_pb(request.options), deadline_of(context)
        )
        return pb.BatchAnalyzeResponse(
            entries=[
                pb.BatchAnalyzeEntry(error=item_error_to_pb(o))
                if isinstance(o, Error)
                else pb.BatchAnalyzeEntry(result=result_to_pb(o))
                for o in outcomes
            ]
        )

    async def StreamAnalyze(
        self,
        request_iterator: AsyncIterator[pb.StreamAnalyzeRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """A stream of images; responses out of order, each with its request id. Written
        with ``context.write`` so that the core's stream duration limit covers the writes."""

        async def items() -> AsyncIterator[StreamItem]:
            async for request in request_iterator:
                yield StreamItem(
                    request.request_id, request.image.data, options_from_pb(request.options)
                )

        async def emit(answer: StreamOutcome) -> None:
            if isinstance(answer.outcome, Error):
                response = pb.StreamAnalyzeResponse(
                    request_id=answer.request_id, error=item_error_to_pb(answer.outcome)
                )
            else:
                response = pb.StreamAnalyzeResponse(
                    request_id=answer.request_id, result=result_to_pb(answer.outcome)
                )
            await context.write(response)

        await self.analyzer.analyze_stream(items(), emit, deadline_of(context))

    async def GetTaxonomy(
        self, request: pb.GetTaxonomyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTaxonomyResponse:
        """The taxonomy the gateway decodes with (equal to the served one when SERVING) and
        the thresholds in effect."""
        return taxonomy_to_pb(self.analyzer.taxonomy, self.analyzer.thresholds)

    async def GetServingInfo(
        self, request: pb.GetServingInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServingInfoResponse:
        """Served models, the search index and limits."""
        index = await self.searcher.served.current()
        return serving_info_to_pb(
            await self.analyzer.serving_info(),
            index.manifest if index is not None else None,
            self.searcher.max_k,
        )

    async def SearchSimilar(
        self, request: pb.SearchSimilarRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchSimilarResponse:
        """Visual search: the catalog entries most like a garment or an embedding."""
        outcome = await self.searcher.search(search_query_from_pb(request), deadline_of(context))
        return search_outcome_to_pb(outcome)
