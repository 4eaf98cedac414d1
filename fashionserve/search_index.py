"""The search index: the one owner of its files, its manifest, and of searching it.

A catalog's garment embeddings, built into a faiss index by ``fashionserve catalog build``
(:mod:`fashionserve.catalog`) and served by the gateway's ``SearchSimilar``. It is a numbered
version in the model repository, beside the embedder whose vectors it holds:

    <repository>/embedder/search_index/<N>/
        index.faiss        the faiss index (inner product over L2-normalised vectors = cosine)
        metadata.parquet   one row per vector, in index order: product_id, then the catalog's
                           metadata columns (strings)
        manifest.json      :class:`IndexManifest`: embedder version and artifact sha256,
                           dimension, count, index kind and build parameters, file hashes

Triton ignores it: it reads only the numbered directories of a model folder, and
``search_index`` is not a number (a folder at the repository's top level would make Triton
fail to start: it takes every top-level folder for a model). A version is published
atomically with :func:`fashionserve.repository.publish_version`; the served one is the
pinned one (``search_index/pinned.json``), else the newest
(:func:`fashionserve.repository.version_to_serve`), as for models.

The index kind follows the catalog's size: below :data:`EXACT_MAX_VECTORS` vectors an exact
``IndexFlatIP`` (a query costs ``count x dimension`` multiply-adds: 0.2 ms at 20k x 128 on
one core, ``loadtest/search_bench.py``), from there an ``IndexHNSWFlat`` graph (:data:`HNSW_M` links per vector), whose
recall@10 against exact search ``loadtest/search_bench.py`` measures.

An index answers only for the embedder it was built with: a vector of another embedder
version means nothing in its space. :meth:`IndexManifest.embedder` records which, and the
gateway refuses to search with an index whose embedder is not the one served.
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from fashionserve.checkpoint import file_sha256
from fashionserve.ensemble import EMBEDDER
from fashionserve.errors import FailedPrecondition, InvalidInput
from fashionserve.repository import (
    MANIFEST_FILE,
    Artifact,
    publish_version,
    version_to_serve,
    write_pin,
)

INDEX_DIR = "search_index"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
PRODUCT_ID = "product_id"
MANIFEST_FORMAT = "fashionserve-search-index"
FORMAT_VERSION = 1

IndexKind = Literal["flat", "hnsw"]
EXACT_MAX_VECTORS = 50_000
"""Catalogs smaller than this get an exact index; larger ones an HNSW graph."""
HNSW_M = 32
"""Links per vector of the HNSW graph (memory: about ``2 x M x 4`` bytes per vector on top
of the vector itself)."""
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 256
"""Candidates an HNSW search keeps: ``loadtest/search_bench.py`` measures its recall@10
against exact search (target >= 0.95; at 128 it measured 0.934 for 1M vectors); raise it
for recall, lower it for speed."""
FILTER_EXACT_MAX = 20_000
"""A filter leaving at most this many vectors is searched exactly over them: a graph search
restricted to a small subset walks mostly through excluded vectors and may return fewer
than ``k``."""
_CACHED_FILTERS = 64


class SearchIndexError(FailedPrecondition):
    """A search index version is missing, unreadable, or does not match its manifest."""

    reason = "INVALID_SEARCH_INDEX"


class SearchInputError(InvalidInput):
    """A catalog or a query that cannot be indexed or searched (wrong dimension, not
    finite, an unknown filter key)."""


# ---------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class EmbedderRef:
    """The embedder version whose vectors an index holds, and its artifact's sha256."""

    version: str
    artifact_sha256: str

    def describe(self) -> str:
        sha = self.artifact_sha256[:12] or "unknown"
        return f"embedder version {self.version or '?'} (artifact {sha})"

    def matches(self, served: EmbedderRef) -> bool:
        """Whether vectors of ``served`` belong in this index: the same version and, when
        both are known, the same artifact."""
        if self.version != served.version:
            return False
        return not (self.artifact_sha256 and served.artifact_sha256) or (
            self.artifact_sha256 == served.artifact_sha256
        )


@dataclass(frozen=True)
class IndexManifest:
    """The ``manifest.json`` of one search index version."""

    version: int
    embedder: EmbedderRef
    dimension: int
    count: int
    kind: IndexKind
    params: Mapping[str, int] = field(default_factory=dict)
    metadata_columns: tuple[str, ...] = ()
    created: str = ""
    source: Mapping[str, Any] = field(default_factory=dict)  # for people: what was indexed
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created": self.created,
            "embedder": {
                "model": EMBEDDER,
                "version": self.embedder.version,
                "artifact_sha256": self.embedder.artifact_sha256,
            },
            "dimension": self.dimension,
            "count": self.count,
            "index": {"kind": self.kind, "metric": "inner_product", **dict(self.params)},
            "metadata_columns": list(self.metadata_columns),
            "source": dict(self.source),
            "artifacts": {
                name: {"sha256": a.sha256, "bytes": a.size} for name, a in self.artifacts.items()
            },
        }


def manifest_from_dict(doc: Any, source: str) -> IndexManifest:
    """Validate a search index manifest; errors name ``source`` and the field."""

    def fail(what: str) -> SearchIndexError:
        return SearchIndexError(f"{source}: {what}")

    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise fail(f"not a {MANIFEST_FORMAT} manifest")
    if not isinstance(doc.get("format_version"), int) or doc["format_version"] > FORMAT_VERSION:
        raise fail(
            f"format_version {doc.get('format_version')!r} is not one this fashionserve reads "
            f"(up to {FORMAT_VERSION}): upgrade fashionserve"
        )
    try:
        embedder = doc["embedder"]
        index = doc["index"]
        kind = index["kind"]
        if kind not in ("flat", "hnsw"):
            raise fail(f"index.kind must be flat or hnsw, got {kind!r}")
        artifacts = {
            name: Artifact(str(a["sha256"]), int(a["bytes"]))
            for name, a in doc["artifacts"].items()
        }
        return IndexManifest(
            version=int(doc["version"]),
            embedder=EmbedderRef(str(embedder["version"]), str(embedder["artifact_sha256"])),
            dimension=int(doc["dimension"]),
            count=int(doc["count"]),
            kind=cast(IndexKind, kind),
            params={k: int(v) for k, v in index.items() if k not in ("kind", "metric")},
            metadata_columns=tuple(str(c) for c in doc["metadata_columns"]),
            created=str(doc.get("created", "")),
            source=dict(doc.get("source", {})),
            artifacts=artifacts,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise fail(f"missing or invalid field ({exc!r})") from exc


def read_manifest(version_dir: Path) -> IndexManifest:
    """The manifest of an index version directory."""
    path = version_dir / MANIFEST_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise SearchIndexError(f"{path} cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise SearchIndexError(f"{path} is not valid JSON: {exc}") from exc
    return manifest_from_dict(doc, str(path))


# ---------------------------------------------------------------------------- layout
def index_root(repository: Path) -> Path:
    """Where a model repository keeps its search index versions."""
    return Path(repository) / EMBEDDER / INDEX_DIR


def served_version(root: Path) -> int | None:
    """The index version to serve from ``root`` (pinned, else newest; ``None``: none)."""
    return version_to_serve(root)


def pin(root: Path, version: int | None) -> None:
    """Serve ``version`` of ``root`` whatever is published later (``None``: the newest)."""
    if version is not None and not (root / str(version) / MANIFEST_FILE).is_file():
        raise SearchIndexError(f"{root} has no search index version {version}")
    write_pin(root, version)


def rebuild_notice(repository: Path, embedder_version: str) -> str | None:
    """What to say when ``embedder_version`` becomes the served embedder of
    ``repository``: the served search index, built with another version, must be rebuilt
    (``None`` when there is no index or it matches)."""
    root = index_root(repository)
    version = served_version(root)
    if version is None:
        return None
    built = read_manifest(root / str(version)).embedder
    if built.version == embedder_version:
        return None
    return (
        f"the served search index (version {version}) was built with {built.describe()}: "
        f"SearchSimilar fails until it is rebuilt with embedder version {embedder_version} "
        f"(fashionserve catalog build --repository {repository} ...)"
    )


# ---------------------------------------------------------------------------- building
def normalised(vectors: np.ndarray, dimension: int | None = None) -> np.ndarray:
    """``vectors`` ([n, d] or [d]) as float32 rows of unit length; refuses a wrong
    dimension, non-finite values and zero vectors (they have no direction)."""
    rows = np.asarray(vectors, np.float32)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise SearchInputError(f"expected vectors of shape [n, d], got {list(rows.shape)}")
    if dimension is not None and rows.shape[1] != dimension:
        raise SearchInputError(
            f"an embedding of {rows.shape[1]} values, the index holds {dimension}",
            reason="WRONG_EMBEDDING_DIMENSION",
            metadata={"dimension": rows.shape[1], "expectedDimension": dimension},
        )
    if not np.isfinite(rows).all():
        raise SearchInputError("an embedding holds NaN or infinite values", reason="BAD_EMBEDDING")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms == 0).any():
        raise SearchInputError("an embedding is all zeros", reason="BAD_EMBEDDING")
    return np.ascontiguousarray(rows / norms, np.float32)


def choose_kind(count: int) -> IndexKind:
    """Exact below :data:`EXACT_MAX_VECTORS` vectors, HNSW from there."""
    return "flat" if count < EXACT_MAX_VECTORS else "hnsw"


def build_index(
    vectors: np.ndarray,
    kind: IndexKind | None = None,
    *,
    m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
) -> tuple[Any, IndexKind, dict[str, int]]:
    """A faiss index over ``vectors`` (normalised here): ``(index, kind, params)``."""
    import faiss

    rows = normalised(vectors)
    kind = kind or choose_kind(len(rows))
    dimension = rows.shape[1]
    index: Any  # faiss's stubs type the two index classes apart
    if kind == "flat":
        index = faiss.IndexFlatIP(dimension)
        params: dict[str, int] = {}
    else:
        index = faiss.IndexHNSWFlat(dimension, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        params = {"m": m, "ef_construction": ef_construction, "ef_search": ef_search}
    index.add(rows)
    return index, kind, params


def publish(
    root: Path,
    vectors: np.ndarray,
    product_ids: Sequence[str],
    metadata: Mapping[str, Sequence[str]],
    embedder: EmbedderRef,
    *,
    kind: IndexKind | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Build the index of ``vectors`` (row i is ``product_ids[i]``, with ``metadata``
    column values i) and publish it as the next version of ``root``; returns its folder."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = len(product_ids)
    if count == 0:
        raise SearchInputError("the catalog is empty: nothing to index")
    if len(vectors) != count:
        raise SearchInputError(f"{len(vectors)} vectors for {count} product ids")
    for name, values in metadata.items():
        if name == PRODUCT_ID or not name:
            raise SearchInputError(f"invalid metadata column name {name!r}")
        if len(values) != count:
            raise SearchInputError(
                f"metadata column {name!r} has {len(values)} values, not {count}"
            )
    index, kind, params = build_index(vectors, kind)
    columns = {PRODUCT_ID: [str(p) for p in product_ids]}
    columns.update({name: [str(v) for v in values] for name, values in metadata.items()})
    created = datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="search-index-") as tmp:
        files = {INDEX_FILE: Path(tmp) / INDEX_FILE, METADATA_FILE: Path(tmp) / METADATA_FILE}
        faiss.write_index(index, str(files[INDEX_FILE]))
        pq.write_table(pa.table(columns), files[METADATA_FILE])

        def factory(version: int, artifacts: Mapping[str, Artifact]) -> IndexManifest:
            return IndexManifest(
                version=version,
                embedder=embedder,
                dimension=int(index.d),
                count=count,
                kind=kind,
                params=params,
                metadata_columns=tuple(metadata),
                created=created,
                source=dict(source or {}),
                artifacts=artifacts,
            )

        return publish_version(Path(root), files, factory)


# ---------------------------------------------------------------------------- searching
def search_one_thread_each() -> None:
    """Make every faiss search run on the calling thread alone.

    A server searches one query per call, from many threads at once. faiss's OpenMP team
    would otherwise split each search across every core, and on a busy machine each call
    waits for cores the others hold: a 20k x 128 exact search took 24 ms with 2 OpenMP
    threads against 0.4 ms with 1 on the shared 2-core machine (load average 6).
    Concurrency comes from the callers' threads instead. Index builds are unaffected when
    they run in another process (``fashionserve catalog build``).
    """
    import faiss

    faiss.omp_set_num_threads(1)


@dataclass(frozen=True)
class Match:
    """One catalog entry found: its product, cosine similarity, and metadata."""

    product_id: str
    score: float
    metadata: Mapping[str, str] = field(default_factory=dict)


class SearchIndex:
    """One loaded index version: search it with :meth:`search` (thread-safe: faiss
    searches may run concurrently; the filter cache is only a cache)."""

    def __init__(self, manifest: IndexManifest, index: Any, table: Mapping[str, np.ndarray]):
        self.manifest = manifest
        self.index = index
        self.product_ids = table[PRODUCT_ID]
        self.columns = {k: v for k, v in table.items() if k != PRODUCT_ID}
        self._filters: OrderedDict[tuple[tuple[str, str], ...], np.ndarray] = OrderedDict()

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    @classmethod
    def load(cls, version_dir: Path) -> SearchIndex:
        """Read a published version, checking its files against the manifest."""
        import faiss
        import pyarrow.parquet as pq

        manifest = read_manifest(version_dir)
        for name in (INDEX_FILE, METADATA_FILE):
            recorded = manifest.artifacts.get(name)
            path = version_dir / name
            if recorded is None or not path.is_file():
                raise SearchIndexError(f"{version_dir}: {name} missing or not in the manifest")
            if file_sha256(path) != recorded.sha256:
                raise SearchIndexError(f"{path} does not match the sha256 its manifest records")
        index: Any = faiss.read_index(str(version_dir / INDEX_FILE))
        table = pq.read_table(version_dir / METADATA_FILE)
        if index.ntotal != manifest.count or index.d != manifest.dimension:
            raise SearchIndexError(
                f"{version_dir}: the index holds {index.ntotal} x {index.d}, the manifest says "
                f"{manifest.count} x {manifest.dimension}"
            )
        if table.num_rows != manifest.count or PRODUCT_ID not in table.column_names:
            raise SearchIndexError(
                f"{version_dir}: {METADATA_FILE} has {table.num_rows} rows (and columns "
                f"{table.column_names}), expected {manifest.count} with {PRODUCT_ID}"
            )
        if manifest.kind == "hnsw":
            index.hnsw.efSearch = manifest.params.get("ef_search", HNSW_EF_SEARCH)
        columns = {
            name: np.asarray(table.column(name).to_pylist(), dtype=object)
            for name in table.column_names
        }
        return cls(manifest, index, columns)

    def _eligible(self, where: Mapping[str, str]) -> np.ndarray | None:
        """Ids of the rows whose metadata equal every ``where`` value (``None``: all)."""
        if not where:
            return None
        key = tuple(sorted(where.items()))
        found = self._filters.get(key)
        if found is not None:
            self._filters.move_to_end(key)
            return found
        unknown = sorted(set(where) - set(self.columns))
        if unknown:
            raise SearchInputError(
                f"filter on {', '.join(unknown)}: the index's metadata has "
                f"{', '.join(sorted(self.columns)) or 'no columns'}",
                reason="UNKNOWN_FILTER_KEY",
                metadata={"key": unknown[0], "available": ",".join(sorted(self.columns))},
            )
        mask = np.ones(self.size, bool)
        for name, value in where.items():
            mask &= self.columns[name] == value
        found = np.flatnonzero(mask).astype(np.int64)
        self._filters[key] = found
        while len(self._filters) > _CACHED_FILTERS:
            self._filters.popitem(last=False)
        return found

    def search(
        self,
        queries: np.ndarray,
        k: int,
        where: Mapping[str, str] | None = None,
        include_metadata: bool = False,
    ) -> list[list[Match]]:
        """The ``k`` most similar entries to each query ([n, d] or [d]), best first,
        among the rows whose metadata equal ``where``'s values."""
        rows = normalised(queries, self.dimension)
        eligible = self._eligible(where or {})
        if eligible is not None and len(eligible) == 0:
            return [[] for _ in rows]
        if eligible is not None and len(eligible) <= FILTER_EXACT_MAX:
            subset = self.index.reconstruct_batch(eligible)
            scores = rows @ subset.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            ids = eligible[top]
            sims = np.take_along_axis(scores, top, axis=1)
        else:
            sims, ids = self._search(rows, k, eligible)
        return [
            [
                self._match(int(i), float(s), include_metadata)
                for s, i in zip(srow, irow, strict=True)
                if i >= 0
            ]
            for srow, irow in zip(sims, ids, strict=True)
        ]

    def _search(
        self, rows: np.ndarray, k: int, eligible: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if eligible is None:
            return cast(tuple[np.ndarray, np.ndarray], self.index.search(rows, k))
        selector = faiss.IDSelectorBatch(eligible)
        if self.manifest.kind == "hnsw":
            ef = max(int(self.index.hnsw.efSearch), 2 * k)
            # faiss's stubs lack the search parameter classes' keyword constructors.
            params: Any = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)  # type: ignore[attr-defined]
        else:
            params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        return cast(tuple[np.ndarray, np.ndarray], self.index.search(rows, k, params=params))

    def _match(self, i: int, score: float, include_metadata: bool) -> Match:
        metadata = (
            {name: str(values[i]) for name, values in self.columns.items()}
            if include_metadata
            else {}
        )
        # Rounding can put a unit vector's product with itself a hair above 1.
        return Match(str(self.product_ids[i]), min(1.0, max(-1.0, score)), metadata)


def memory_bytes(index: Any) -> int:
    """The bytes an index takes in memory (its serialised size: what faiss holds)."""
    import faiss

    return int(faiss.serialize_index(index).nbytes)
