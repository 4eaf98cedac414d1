from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchSimilarRequest(_message.Message):
    __slots__ = ("image", "embedding", "k", "filter", "include_metadata")
    class FilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_METADATA_FIELD_NUMBER: _ClassVar[int]
    image: ImageQuery
    embedding: EmbeddingQuery
    k: int
    filter: _containers.ScalarMap[str, str]
    include_metadata: bool
    def __init__(self, image: _Optional[_Union[ImageQuery, _Mapping]] = ..., embedding: _Optional[_Union[EmbeddingQuery, _Mapping]] = ..., k: _Optional[int] = ..., filter: _Optional[_Mapping[str, str]] = ..., include_metadata: _Optional[bool] = ...) -> None: ...

class ImageQuery(_message.Message):
    __slots__ = ("image", "garment_index", "box")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    GARMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    image: Image
    garment_index: int
    box: Box
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., garment_index: _Optional[int] = ..., box: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class EmbeddingQuery(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchSimilarResponse(_message.Message):
    __slots__ = ("matches", "index", "query_garment")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    QUERY_GARMENT_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[SearchMatch]
    index: SearchIndexInfo
    query_garment: Garment
    def __init__(self, matches: _Optional[_Iterable[_Union[SearchMatch, _Mapping]]] = ..., index: _Optional[_Union[SearchIndexInfo, _Mapping]] = ..., query_garment: _Optional[_Union[Garment, _Mapping]] = ...) -> None: ...

class SearchMatch(_message.Message):
    __slots__ = ("product_id", "score", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    score: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, product_id: _Optional[str] = ..., score: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchIndexInfo(_message.Message):
    __slots__ = ("version", "size", "dimension", "kind", "embedder_version", "embedder_artifact_sha256", "metadata_keys")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    METADATA_KEYS_FIELD_NUMBER: _ClassVar[int]
    version: int
    size: int
    dimension: int
    kind: str
    embedder_version: str
    embedder_artifact_sha256: str
    metadata_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., size: _Optional[int] = ..., dimension: _Optional[int] = ..., kind: _Optional[str] = ..., embedder_version: _Optional[str] = ..., embedder_artifact_sha256: _Optional[str] = ..., metadata_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class AnalyzeOptions(_message.Message):
    __slots__ = ("min_score", "max_garments", "include_embeddings", "include_probability_tables")
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_GARMENTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROBABILITY_TABLES_FIELD_NUMBER: _ClassVar[int]
    min_score: float
    max_garments: int
    include_embeddings: bool
    include_probability_tables: bool
    def __init__(self, min_score: _Optional[float] = ..., max_garments: _Optional[int] = ..., include_embeddings: _Optional[bool] = ..., include_probability_tables: _Optional[bool] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("image", "options")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    image: Image
    options: AnalyzeOptions
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[AnalyzeOptions, _Mapping]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: ImageResult
    def __init__(self, result: _Optional[_Union[ImageResult, _Mapping]] = ...) -> None: ...

class BatchAnalyzeRequest(_message.Message):
    __slots__ = ("images", "options")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: AnalyzeOptions
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[AnalyzeOptions, _Mapping]] = ...) -> None: ...

class BatchAnalyzeResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[BatchAnalyzeEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[BatchAnalyzeEntry, _Mapping]]] = ...) -> None: ...

class BatchAnalyzeEntry(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: ImageResult
    error: ItemError
    def __init__(self, result: _Optional[_Union[ImageResult, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class StreamAnalyzeRequest(_message.Message):
    __slots__ = ("request_id", "image", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    image: Image
    options: AnalyzeOptions
    def __init__(self, request_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[AnalyzeOptions, _Mapping]] = ...) -> None: ...

class StreamAnalyzeResponse(_message.Message):
    __slots__ = ("request_id", "result", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: ImageResult
    error: ItemError
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[ImageResult, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "reason", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("width", "height", "garments")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GARMENTS_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    garments: _containers.RepeatedCompositeFieldContainer[Garment]
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., garments: _Optional[_Iterable[_Union[Garment, _Mapping]]] = ...) -> None: ...

class Garment(_message.Message):
    __slots__ = ("box", "normalized_box", "detector_score", "detector_class", "category_path", "tag_groups", "embedding", "probability_tables")
    BOX_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_BOX_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SCORE_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_CLASS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_PATH_FIELD_NUMBER: _ClassVar[int]
    TAG_GROUPS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_TABLES_FIELD_NUMBER: _ClassVar[int]
    box: Box
    normalized_box: Box
    detector_score: float
    detector_class: str
    category_path: _containers.RepeatedCompositeFieldContainer[ScoredLabel]
    tag_groups: _containers.RepeatedCompositeFieldContainer[TagGroupResult]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    probability_tables: _containers.RepeatedCompositeFieldContainer[ProbabilityTable]
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., normalized_box: _Optional[_Union[Box, _Mapping]] = ..., detector_score: _Optional[float] = ..., detector_class: _Optional[str] = ..., category_path: _Optional[_Iterable[_Union[ScoredLabel, _Mapping]]] = ..., tag_groups: _Optional[_Iterable[_Union[TagGroupResult, _Mapping]]] = ..., embedding: _Optional[_Iterable[float]] = ..., probability_tables: _Optional[_Iterable[_Union[ProbabilityTable, _Mapping]]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class ScoredLabel(_message.Message):
    __slots__ = ("name", "probability")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    probability: float
    def __init__(self, name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class TagGroupResult(_message.Message):
    __slots__ = ("group", "labels")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    group: str
    labels: _containers.RepeatedCompositeFieldContainer[ScoredLabel]
    def __init__(self, group: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[ScoredLabel, _Mapping]]] = ...) -> None: ...

class ProbabilityTable(_message.Message):
    __slots__ = ("name", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedCompositeFieldContainer[ScoredLabel]
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[ScoredLabel, _Mapping]]] = ...) -> None: ...

class GetTaxonomyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTaxonomyResponse(_message.Message):
    __slots__ = ("version", "hash", "categories", "tag_groups", "thresholds", "threshold_set")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    TAG_GROUPS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SET_FIELD_NUMBER: _ClassVar[int]
    version: str
    hash: str
    categories: _containers.RepeatedCompositeFieldContainer[Category]
    tag_groups: _containers.RepeatedCompositeFieldContainer[TagGroup]
    thresholds: _containers.RepeatedCompositeFieldContainer[DecisionThreshold]
    threshold_set: ThresholdSetInfo
    def __init__(self, version: _Optional[str] = ..., hash: _Optional[str] = ..., categories: _Optional[_Iterable[_Union[Category, _Mapping]]] = ..., tag_groups: _Optional[_Iterable[_Union[TagGroup, _Mapping]]] = ..., thresholds: _Optional[_Iterable[_Union[DecisionThreshold, _Mapping]]] = ..., threshold_set: _Optional[_Union[ThresholdSetInfo, _Mapping]] = ...) -> None: ...

class DecisionThreshold(_message.Message):
    __slots__ = ("name", "threshold", "calibrated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    threshold: float
    calibrated: bool
    def __init__(self, name: _Optional[str] = ..., threshold: _Optional[float] = ..., calibrated: _Optional[bool] = ...) -> None: ...

class ThresholdSetInfo(_message.Message):
    __slots__ = ("name", "hash", "target_recall")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    TARGET_RECALL_FIELD_NUMBER: _ClassVar[int]
    name: str
    hash: str
    target_recall: float
    def __init__(self, name: _Optional[str] = ..., hash: _Optional[str] = ..., target_recall: _Optional[float] = ...) -> None: ...

class Category(_message.Message):
    __slots__ = ("name", "parent", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    parent: str
    path: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., parent: _Optional[str] = ..., path: _Optional[_Iterable[str]] = ...) -> None: ...

class TagGroup(_message.Message):
    __slots__ = ("name", "exclusive", "labels", "applies_to")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    APPLIES_TO_FIELD_NUMBER: _ClassVar[int]
    name: str
    exclusive: bool
    labels: _containers.RepeatedScalarFieldContainer[str]
    applies_to: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., exclusive: _Optional[bool] = ..., labels: _Optional[_Iterable[str]] = ..., applies_to: _Optional[_Iterable[str]] = ...) -> None: ...

class GetServingInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServingInfoResponse(_message.Message):
    __slots__ = ("models", "taxonomy_version", "taxonomy_hash", "limits", "gateway_version", "threshold_set", "search_index")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAXONOMY_HASH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_VERSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SET_FIELD_NUMBER: _ClassVar[int]
    SEARCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    taxonomy_version: str
    taxonomy_hash: str
    limits: Limits
    gateway_version: str
    threshold_set: ThresholdSetInfo
    search_index: SearchIndexInfo
    def __init__(self, models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ..., taxonomy_version: _Optional[str] = ..., taxonomy_hash: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., gateway_version: _Optional[str] = ..., threshold_set: _Optional[_Union[ThresholdSetInfo, _Mapping]] = ..., search_index: _Optional[_Union[SearchIndexInfo, _Mapping]] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "version", "artifact_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    artifact_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_image_bytes", "max_image_pixels", "max_images_per_batch", "max_message_bytes", "accepted_formats", "max_garments_per_image", "embedding_dimension", "max_search_k")
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_GARMENTS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SEARCH_K_FIELD_NUMBER: _ClassVar[int]
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_batch: int
    max_message_bytes: int
    accepted_formats: _containers.RepeatedScalarFieldContainer[str]
    max_garments_per_image: int
    embedding_dimension: int
    max_search_k: int
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_images_per_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., accepted_formats: _Optional[_Iterable[str]] = ..., max_garments_per_image: _Optional[int] = ..., embedding_dimension: _Optional[int] = ..., max_search_k: _Optional[int] = ...) -> None: ...
