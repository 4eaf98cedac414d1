"""Typed results of the fashion.v1 API, and their conversion from and to protobuf.

Callers work with these frozen dataclasses instead of generated protobuf messages: they
are immutable, hashable where their fields allow it, print readably, and convert to plain
JSON-ready dicts with :func:`to_jsonable`. The sync and asyncio clients share this module,
so both return exactly the same types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from fashionserve.clients.errors import FashionServeError
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb

# ------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class AnalyzeOptions:
    """What to return for each image. Zero values ask for the server's defaults.

    ``min_score`` below the served floor is raised to it by the server; ``max_garments``
    of 0 means the served cap.
    """

    min_score: float = 0.0
    max_garments: int = 0
    include_embeddings: bool = False
    include_probability_tables: bool = False

    def __post_init__(self) -> None:
        # Checked here so a typo fails before a network round trip.
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.max_garments < 0:
            raise ValueError(f"max_garments must be >= 0, got {self.max_garments}")

    def to_proto(self) -> pb.AnalyzeOptions:
        """The protobuf form sent on the wire."""
        return pb.AnalyzeOptions(
            min_score=self.min_score,
            max_garments=self.max_garments,
            include_embeddings=self.include_embeddings,
            include_probability_tables=self.include_probability_tables,
        )


@dataclass(frozen=True)
class StreamRequest:
    """One image of a :meth:`FashionClient.stream_analyze` stream.

    ``request_id`` is chosen by the caller (at most 128 characters) and echoed on the
    matching :class:`StreamEntry`; responses may arrive out of order.
    """

    request_id: str
    image: bytes
    options: AnalyzeOptions | None = None

    def to_proto(self, default: AnalyzeOptions | None = None) -> pb.StreamAnalyzeRequest:
        """The protobuf form; ``default`` applies when the request has no options."""
        options = self.options or default or AnalyzeOptions()
        return pb.StreamAnalyzeRequest(
            request_id=self.request_id,
            image=pb.Image(data=self.image),
            options=options.to_proto(),
        )


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle: pixels of the upright image, or normalised to [0, 1]."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def width(self) -> float:
        return self.x_max - self.x_min

    @property
    def height(self) -> float:
        return self.y_max - self.y_min

    def as_tuple(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)``, the order PIL and most tools expect."""
        return (self.x_min, self.y_min, self.x_max, self.y_max)


@dataclass(frozen=True)
class ScoredLabel:
    """A category or tag label with its probability in [0, 1]."""

    name: str
    probability: float


@dataclass(frozen=True)
class TagGroupResult:
    """The labels of one tag group that passed their thresholds (at most one if exclusive)."""

    group: str
    labels: tuple[ScoredLabel, ...]


@dataclass(frozen=True)
class ProbabilityTable:
    """The full distribution of one decision (``category:<parent>`` or a tag group)."""

    name: str
    labels: tuple[ScoredLabel, ...]


@dataclass(frozen=True)
class GarmentResult:
    """One garment found in an image.

    ``category_path`` runs from the top level down as deep as the model was confident,
    each probability being the product of the conditional ones along the path.
    ``embedding`` is ``None`` unless embeddings were requested.
    """

    box: Box
    normalized_box: Box
    detector_score: float
    detector_class: str
    category_path: tuple[ScoredLabel, ...]
    tag_groups: tuple[TagGroupResult, ...]
    embedding: tuple[float, ...] | None = None
    probability_tables: tuple[ProbabilityTable, ...] = ()

    @property
    def category(self) -> str:
        """The deepest confident category, or the detector's class when the path is empty."""
        return self.category_path[-1].name if self.category_path else self.detector_class

    @property
    def tags(self) -> dict[str, list[ScoredLabel]]:
        """The tag groups as a dict, group name to labels."""
        return {g.group: list(g.labels) for g in self.tag_groups}


@dataclass(frozen=True)
class ImageResult:
    """Everything found in one image; ``width`` and ``height`` are after EXIF orientation."""

    width: int
    height: int
    garments: tuple[GarmentResult, ...]


@dataclass(frozen=True)
class ItemError:
    """Why one image of a batch or a stream could not be analysed.

    Shaped like ``google.rpc.Status`` with its ``ErrorInfo`` flattened in: ``code`` is the
    gRPC status code, ``reason`` the UPPER_SNAKE reason, ``metadata`` lowerCamel details.
    """

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def code_name(self) -> str:
        """The status code's name, for example ``INVALID_ARGUMENT``."""
        return str(self.code.name)

    def __str__(self) -> str:
        return f"{self.code_name} ({self.reason or 'no reason'}): {self.message}"


@dataclass(frozen=True)
class BatchEntry:
    """The outcome for one image of a batch: exactly one of ``result`` and ``error`` is set."""

    result: ImageResult | None = None
    error: ItemError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> ImageResult:
        """The result, or raise the entry's error as a :class:`FashionServeError`."""
        if self.error is not None:
            error = self.error
            raise FashionServeError(
                error.code,
                error.message,
                error.reason,
                domain="fashionserve",
                metadata=error.metadata,
            )
        assert self.result is not None, "an entry has either a result or an error"
        return self.result


@dataclass(frozen=True)
class StreamEntry(BatchEntry):
    """A :class:`BatchEntry` answering the stream request with this ``request_id``."""

    request_id: str = ""


@dataclass(frozen=True)
class CategoryInfo:
    """One node of the served category tree; ``parent`` is empty for a top-level one."""

    name: str
    parent: str
    path: tuple[str, ...]


@dataclass(frozen=True)
class TagGroupInfo:
    """One served attribute tag group; empty ``applies_to`` means every category."""

    name: str
    exclusive: bool
    labels: tuple[str, ...]
    applies_to: tuple[str, ...]


@dataclass(frozen=True)
class DecisionThreshold:
    """The probability at which one decision says yes: a category (``"shirt"``, given its
    parent) or a tag label (``"colour/red"``); ``calibrated``: set by the threshold set."""

    name: str
    threshold: float
    calibrated: bool


@dataclass(frozen=True)
class ThresholdSetInfo:
    """The calibrated threshold set decisions use: its name, content hash and target."""

    name: str
    hash: str
    target_recall: float


@dataclass(frozen=True)
class TaxonomyInfo:
    """The taxonomy the served models decode with (categories parents-first), the
    threshold of every decision, and the calibrated set they come from (``None``: the
    taxonomy's own)."""

    version: str
    hash: str
    categories: tuple[CategoryInfo, ...]
    tag_groups: tuple[TagGroupInfo, ...]
    thresholds: tuple[DecisionThreshold, ...] = ()
    threshold_set: ThresholdSetInfo | None = None

    @property
    def roots(self) -> tuple[str, ...]:
        """The top-level category names."""
        return tuple(c.name for c in self.categories if not c.parent)

    @property
    def threshold_values(self) -> dict[str, float]:
        """Decision name -> threshold."""
        return {t.name: t.threshold for t in self.thresholds}


@dataclass(frozen=True)
class ServedModel:
    """One model of the pipeline with its served version and artifact hash."""

    name: str
    version: str
    artifact_sha256: str


@dataclass(frozen=True)
class Limits:
    """What a caller may send; going over one is INVALID_ARGUMENT."""

    max_image_bytes: int
    max_image_pixels: int
    max_images_per_batch: int
    max_message_bytes: int
    accepted_formats: tuple[str, ...]
    max_garments_per_image: int
    embedding_dimension: int
    max_search_k: int = 0


@dataclass(frozen=True)
class SearchIndexInfo:
    """The search index SearchSimilar uses: its version, size, and the embedder it was
    built with."""

    version: int
    size: int
    dimension: int
    kind: str
    embedder_version: str
    embedder_artifact_sha256: str
    metadata_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchMatch:
    """One catalog entry found: its product id, cosine similarity and metadata."""

    product_id: str
    score: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """SearchSimilar's answer: matches best first, the index they come from and, for an
    image query, the garment searched with."""

    matches: tuple[SearchMatch, ...]
    index: SearchIndexInfo
    query_garment: GarmentResult | None = None


@dataclass(frozen=True)
class ServingInfo:
    """What the gateway serves: model versions, taxonomy identity and limits."""

    models: tuple[ServedModel, ...]
    taxonomy_version: str
    taxonomy_hash: str
    limits: Limits
    gateway_version: str
    threshold_set: ThresholdSetInfo | None = None
    search_index: SearchIndexInfo | None = None


# --------------------------------------------------------------------------- conversion


def _labels(items: Any) -> tuple[ScoredLabel, ...]:
    return tuple(ScoredLabel(name=s.name, probability=float(s.probability)) for s in items)


def _box(b: pb.Box) -> Box:
    return Box(float(b.x_min), float(b.y_min), float(b.x_max), float(b.y_max))


def garment_from_proto(g: pb.Garment) -> GarmentResult:
    """Convert one ``fashion.v1.Garment``."""
    return GarmentResult(
        box=_box(g.box),
        normalized_box=_box(g.normalized_box),
        detector_score=float(g.detector_score),
        detector_class=g.detector_class,
        category_path=_labels(g.category_path),
        tag_groups=tuple(
            TagGroupResult(group=t.group, labels=_labels(t.labels)) for t in g.tag_groups
        ),
        # An empty repeated field means "not requested": proto3 cannot tell it from [].
        embedding=tuple(float(v) for v in g.embedding) if len(g.embedding) else None,
        probability_tables=tuple(
            ProbabilityTable(name=t.name, labels=_labels(t.labels)) for t in g.probability_tables
        ),
    )


def image_result_from_proto(r: pb.ImageResult) -> ImageResult:
    """Convert one ``fashion.v1.ImageResult``."""
    return ImageResult(
        width=int(r.width),
        height=int(r.height),
        garments=tuple(garment_from_proto(g) for g in r.garments),
    )


def status_code(value: int) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` for a numeric ``google.rpc.Code`` (UNKNOWN if unheard of)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


def item_error_from_proto(e: pb.ItemError) -> ItemError:
    """Convert one ``fashion.v1.ItemError``."""
    return ItemError(
        code=status_code(e.code), message=e.message, reason=e.reason, metadata=dict(e.metadata)
    )


def batch_entry_from_proto(e: pb.BatchAnalyzeEntry) -> BatchEntry:
    """Convert one ``fashion.v1.BatchAnalyzeEntry``."""
    if e.WhichOneof("outcome") == "error":
        return BatchEntry(error=item_error_from_proto(e.error))
    return BatchEntry(result=image_result_from_proto(e.result))


def stream_entry_from_proto(r: pb.StreamAnalyzeResponse) -> StreamEntry:
    """Convert one ``fashion.v1.StreamAnalyzeResponse``."""
    if r.WhichOneof("outcome") == "error":
        return StreamEntry(request_id=r.request_id, error=item_error_from_proto(r.error))
    return StreamEntry(request_id=r.request_id, result=image_result_from_proto(r.result))


def taxonomy_from_proto(t: pb.GetTaxonomyResponse) -> TaxonomyInfo:
    """Convert a ``fashion.v1.GetTaxonomyResponse``."""
    return TaxonomyInfo(
        version=t.version,
        hash=t.hash,
        categories=tuple(
            CategoryInfo(name=c.name, parent=c.parent, path=tuple(c.path)) for c in t.categories
        ),
        tag_groups=tuple(
            TagGroupInfo(
                name=g.name,
                exclusive=g.exclusive,
                labels=tuple(g.labels),
                applies_to=tuple(g.applies_to),
            )
            for g in t.tag_groups
        ),
        thresholds=tuple(
            DecisionThreshold(name=d.name, threshold=float(d.threshold), calibrated=d.calibrated)
            for d in t.thresholds
        ),
        threshold_set=_threshold_set(t),
    )


def _threshold_set(
    message: pb.GetTaxonomyResponse | pb.GetServingInfoResponse,
) -> ThresholdSetInfo | None:
    if not message.HasField("threshold_set"):
        return None
    info = message.threshold_set
    return ThresholdSetInfo(
        name=info.name, hash=info.hash, target_recall=round(float(info.target_recall), 6)
    )


def serving_info_from_proto(s: pb.GetServingInfoResponse) -> ServingInfo:
    """Convert a ``fashion.v1.GetServingInfoResponse``."""
    lim = s.limits
    return ServingInfo(
        models=tuple(
            ServedModel(name=m.name, version=m.version, artifact_sha256=m.artifact_sha256)
            for m in s.models
        ),
        taxonomy_version=s.taxonomy_version,
        taxonomy_hash=s.taxonomy_hash,
        limits=Limits(
            max_image_bytes=int(lim.max_image_bytes),
            max_image_pixels=int(lim.max_image_pixels),
            max_images_per_batch=int(lim.max_images_per_batch),
            max_message_bytes=int(lim.max_message_bytes),
            accepted_formats=tuple(lim.accepted_formats),
            max_garments_per_image=int(lim.max_garments_per_image),
            embedding_dimension=int(lim.embedding_dimension),
            max_search_k=int(lim.max_search_k),
        ),
        gateway_version=s.gateway_version,
        threshold_set=_threshold_set(s),
        search_index=search_index_from_proto(s.search_index)
        if s.HasField("search_index")
        else None,
    )


def search_index_from_proto(i: pb.SearchIndexInfo) -> SearchIndexInfo:
    """Convert a ``fashion.v1.SearchIndexInfo``."""
    return SearchIndexInfo(
        version=int(i.version),
        size=int(i.size),
        dimension=int(i.dimension),
        kind=i.kind,
        embedder_version=i.embedder_version,
        embedder_artifact_sha256=i.embedder_artifact_sha256,
        metadata_keys=tuple(i.metadata_keys),
    )


def search_result_from_proto(r: pb.SearchSimilarResponse) -> SearchResult:
    """Convert a ``fashion.v1.SearchSimilarResponse``."""
    return SearchResult(
        matches=tuple(
            SearchMatch(m.product_id, float(m.score), dict(m.metadata)) for m in r.matches
        ),
        index=search_index_from_proto(r.index),
        query_garment=garment_from_proto(r.query_garment) if r.HasField("query_garment") else None,
    )


def to_jsonable(value: Any) -> Any:
    """A plain JSON-ready form of any result type (dicts, lists, numbers, strings).

    Status codes become their names; ``None`` embeddings are left out.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.name in ("embedding", "result", "error"):
                continue
            out[f.name] = to_jsonable(v)
        return out
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value
