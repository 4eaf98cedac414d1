"""Visual search (SearchSimilar) on plain data, free of gRPC.

:class:`ServedIndex` keeps the served search index loaded: the version
:func:`fashionserve.search_index.served_version` names in ``search_index_dir`` (pinned, else
newest), re-checked every ``search_index_check_seconds`` and swapped in without a restart
when it changes (loaded off the event loop; the old one serves meanwhile).

:class:`Searcher` answers one query: a garment of an image (analysed through the same path
as Analyze, so with the same admission, quotas and limits) or an embedding (admitted like
one image). It refuses an index built with another embedder version than the one served
(FAILED_PRECONDITION, SEARCH_INDEX_EMBEDDER_MISMATCH, naming both): vectors of two embedders
do not share a space, so its answers would be wrong without any error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashionserve import search_index
from fashionserve.ensemble import EMBEDDER
from fashionserve.errors import FailedPrecondition
from fashionserve.gateway.auth.identity import LOCAL_IDENTITY, current_identity
from fashionserve.gateway.core import FALLBACK_MAX_GARMENTS, Analyzer
from fashionserve.gateway.failures import InvalidArgument
from fashionserve.gateway.results import Box, GarmentResult
from fashionserve.gateway.validation import ValidatedOptions
from fashionserve.metrics import box_iou
from fashionserve.search_index import EmbedderRef, Match, SearchIndex

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the served index
class ServedIndex:
    """The search index the gateway serves from ``root`` (``None``: none configured)."""

    def __init__(self, root: Path | None, check_seconds: float) -> None:
        self.root = root
        self.check_seconds = check_seconds
        search_index.search_one_thread_each()
        self.index: SearchIndex | None = None
        self._checked = -float("inf")
        self._loading: asyncio.Task[None] | None = None

    async def current(self) -> SearchIndex | None:
        """The index to search, re-checked at most every ``check_seconds``."""
        if time.monotonic() - self._checked >= self.check_seconds:
            await self.refresh()
        return self.index

    async def refresh(self) -> None:
        """Load the served version if it is not the one loaded (concurrent callers share
        one load). A version that fails to load is logged; the loaded one keeps serving."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._loading)

    async def _refresh(self) -> None:
        self._checked = time.monotonic()
        if self.root is None:
            return
        try:
            version = search_index.served_version(self.root)
        except Exception as exc:  # a broken pin file: keep serving what is loaded
            log.error("search index folder %s: %s", self.root, exc)
            return
        loaded = self.index.manifest.version if self.index is not None else None
        if version is None or version == loaded:
            return
        try:
            index = await asyncio.to_thread(SearchIndex.load, self.root / str(version))
        except Exception as exc:
            log.error("search index version %d cannot be served: %s", version, exc)
            return
        m = index.manifest
        log.info(
            "serving search index version %d: %d vectors of %d (%s), built with %s%s",
            m.version,
            m.count,
            m.dimension,
            m.kind,
            m.embedder.describe(),
            f", was version {loaded}" if loaded is not None else "",
        )
        self.index = index


# ------------------------------------------------------------------ queries
@dataclass(frozen=True)
class ImageQuery:
    """A garment of an image: ``garment_index`` or the garment overlapping ``box`` most
    (neither: the highest detector score)."""

    image: bytes
    garment_index: int | None = None
    box: Box | None = None


@dataclass(frozen=True)
class SearchQuery:
    """One SearchSimilar request as plain data."""

    query: ImageQuery | np.ndarray | None
    k: int
    filter: Mapping[str, str] = field(default_factory=dict)
    include_metadata: bool = False


@dataclass(frozen=True)
class SearchOutcome:
    """The matches, the index they come from and, for an image query, its garment."""

    matches: list[Match]
    index: search_index.IndexManifest
    query_garment: GarmentResult | None = None


def _corners(box: Box) -> tuple[float, float, float, float]:
    return (box.x_min, box.y_min, box.x_max, box.y_max)


def choose_garment(garments: list[GarmentResult], query: ImageQuery) -> int:
    """The position of the garment ``query`` names among ``garments`` (highest score
    first); raises INVALID_ARGUMENT when there is none."""
    if not garments:
        raise InvalidArgument("NO_GARMENT", "no garment was found in the image")
    if query.box is not None:
        overlaps = box_iou(
            np.array([_corners(query.box)]), np.array([_corners(g.box) for g in garments])
        )[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] <= 0:
            raise InvalidArgument(
                "GARMENT_NOT_FOUND",
                f"the box overlaps none of the {len(garments)} garment(s) found",
                {"garments": len(garments)},
            )
        return best
    index = query.garment_index or 0
    if index >= len(garments):
        raise InvalidArgument(
            "GARMENT_NOT_FOUND",
            f"garment_index {index}: the image has {len(garments)} garment(s)",
            {"garmentIndex": index, "garments": len(garments)},
        )
    return index


class Searcher:
    """SearchSimilar over the served index and the analysis path of ``analyzer``."""

    def __init__(self, analyzer: Analyzer, served: ServedIndex, max_k: int) -> None:
        self.analyzer = analyzer
        self.served = served
        self.max_k = max_k
        self._warned: tuple[int, EmbedderRef] | None = None

    def served_embedder(self) -> EmbedderRef | None:
        """The embedder version Triton serves, as far as the gateway knows."""
        for model in self.analyzer.monitor.state.models:
            if model.name == EMBEDDER:
                return EmbedderRef(model.version, model.artifact_sha256)
        return None

    def check_binding(self, index: SearchIndex, served: EmbedderRef | None) -> None:
        """Raise FAILED_PRECONDITION unless ``index`` was built with ``served``."""
        built = index.manifest.embedder
        if served is not None and built.matches(served):
            return
        now = served or EmbedderRef("", "")
        if self._warned != (index.manifest.version, now):
            self._warned = (index.manifest.version, now)
            log.warning(
                "search index version %d was built with %s, the served one is %s: rebuild it "
                "(fashionserve catalog build)",
                index.manifest.version,
                built.describe(),
                now.describe(),
            )
        raise FailedPrecondition(
            f"the search index (version {index.manifest.version}) was built with "
            f"{built.describe()}, the served one is {now.describe()}: the index must be "
            "rebuilt with the served embedder",
            reason="SEARCH_INDEX_EMBEDDER_MISMATCH",
            metadata={
                "indexVersion": index.manifest.version,
                "indexEmbedderVersion": built.version,
                "servedEmbedderVersion": now.version,
            },
        )

    async def search(self, query: SearchQuery, deadline: float | None = None) -> SearchOutcome:
        """Answer one query; raises :class:`fashionserve.errors.Error`."""
        if not 1 <= query.k <= self.max_k:
            raise InvalidArgument(
                "INVALID_K",
                f"k must be between 1 and {self.max_k}, got {query.k}",
                {"k": query.k, "maxSearchK": self.max_k},
            )
        if query.query is None:
            raise InvalidArgument("NO_QUERY", "set the query: an image or an embedding")
        index = await self.served.current()
        if index is None:
            raise FailedPrecondition(
                "the gateway serves no search index: build one with `fashionserve catalog "
                "build` and set search_index_dir",
                reason="NO_SEARCH_INDEX",
            )
        garment = None
        if isinstance(query.query, ImageQuery):
            vector, garment = await self._embed(query.query, deadline)
        else:
            vector = search_index.normalised(query.query, index.dimension)
            tenant = (current_identity() or LOCAL_IDENTITY).tenant
            async with self.analyzer.admission.admit(tenant, 1):
                await self.analyzer.monitor.require_serving()
        self.check_binding(index, self.served_embedder())
        (matches,) = await asyncio.to_thread(
            index.search, vector, query.k, query.filter, query.include_metadata
        )
        return SearchOutcome(matches, index.manifest, garment)

    async def _embed(
        self, query: ImageQuery, deadline: float | None
    ) -> tuple[np.ndarray, GarmentResult]:
        """The embedding of the garment ``query`` names, through the analysis path."""
        options = ValidatedOptions(
            min_score=0.0,
            max_garments=self.analyzer.monitor.state.max_crops_per_image or FALLBACK_MAX_GARMENTS,
            include_embeddings=True,
        )
        result = await self.analyzer.analyze_validated(query.image, options, deadline)
        garment = result.garments[choose_garment(result.garments, query)]
        assert garment.embedding is not None  # asked for
        vector = np.asarray(garment.embedding, np.float32)
        garment.embedding = None  # the caller asked for matches, not for the vector
        return vector, garment
