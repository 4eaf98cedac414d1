"""From the ensemble's raw outputs to what a caller gets for each garment.

The ensemble returns, per garment, a box in original-image pixels, a detector score and
class, a row of tagger logits and an embedding. Here each garment is filtered (minimum
score, maximum count), its box clipped and normalised, and its logits decoded with the
taxonomy (:meth:`fashionserve.taxonomy.Taxonomy.decode`: coarse to fine, ``applies_to``,
exclusive groups, thresholds). Plain data in, plain data out: nothing here knows gRPC.

The client library has types of the same names (``Box``, ``GarmentResult``,
``ImageResult`` in ``fashionserve.clients.types``) for the same data as a caller receives
it. Both exist because the client may import only the protos: the servicer turns these into
the protobuf message, the client turns the message into its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fashionserve.ensemble import Garment
from fashionserve.gateway.validation import ValidatedOptions
from fashionserve.taxonomy import ScoredLabel, Taxonomy


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle (left, top, right, bottom)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class ImageOutput:
    """What the ensemble returned for one image: its upright size and its garments."""

    width: int
    height: int
    garments: list[Garment]


@dataclass
class GarmentResult:
    """One garment as a caller sees it."""

    box: Box
    normalized_box: Box
    detector_score: float
    detector_class: str
    category_path: list[ScoredLabel]
    tag_groups: list[tuple[str, list[ScoredLabel]]]
    embedding: list[float] | None = None
    probability_tables: list[tuple[str, list[ScoredLabel]]] = field(default_factory=list)


@dataclass
class ImageResult:
    """Everything found in one image; garments best score first."""

    width: int
    height: int
    garments: list[GarmentResult]


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[Box, Box]:
    """The box clipped to the image, in pixels and normalised to [0, 1]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(width, 1), max(height, 1)
    x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
    y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
    return Box(x1, y1, x2, y2), Box(x1 / w, y1 / h, x2 / w, y2 / h)


def decode_garment(
    garment: Garment, taxonomy: Taxonomy, width: int, height: int, options: ValidatedOptions
) -> GarmentResult:
    """Decode one garment's logits and shape it for the caller."""
    decoded = taxonomy.decode(garment.logits, full_tables=options.include_probability_tables)
    box, normalized = clip_box(garment.box, width, height)
    cls = garment.detector_class
    detector_class = taxonomy.roots[cls] if 0 <= cls < len(taxonomy.roots) else f"class-{cls}"
    tags = [
        (group.name, decoded.tags[group.name])
        for group in taxonomy.groups
        if group.name in decoded.tags
    ]
    tables = [
        (name, [ScoredLabel(label, p) for label, p in table.items()])
        for name, table in decoded.tables.items()
    ]
    embedding: list[float] | None = None
    if options.include_embeddings:
        embedding = np.asarray(garment.embedding, dtype=np.float32).reshape(-1).tolist()
    return GarmentResult(
        box=box,
        normalized_box=normalized,
        detector_score=float(garment.score),
        detector_class=detector_class,
        category_path=list(decoded.category_path),
        tag_groups=tags,
        embedding=embedding,
        probability_tables=tables,
    )


def assemble_result(
    output: ImageOutput, taxonomy: Taxonomy, options: ValidatedOptions
) -> ImageResult:
    """Filter (``min_score``, ``max_garments``) and decode the garments of one image.

    Garments come back highest detector score first; an image with none gets an empty list.
    """
    kept = sorted(
        (g for g in output.garments if g.score >= options.min_score),
        key=lambda g: g.score,
        reverse=True,
    )[: options.max_garments]
    return ImageResult(
        width=output.width,
        height=output.height,
        garments=[decode_garment(g, taxonomy, output.width, output.height, options) for g in kept],
    )
