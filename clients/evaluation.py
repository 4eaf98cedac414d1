"""The gateway as a backend of ``fashionserve evaluate``.

``fashionserve evaluate --triton`` scores the ensemble's raw outputs, decoding the tagger
logits itself; ``fashionserve evaluate --gateway`` scores what a caller of the public API
gets: the gateway's micro-batching, validation and taxonomy decoding included. Both feed
the same scoring code, so any gap between the two figures is lost in the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fashionserve.clients.errors import FashionServeError
from fashionserve.clients.sync_client import FashionClient
from fashionserve.clients.types import AnalyzeOptions, GarmentResult
from fashionserve.taxonomy import Decoded, ScoredLabel

InferFn = Callable[[list[bytes]], list[list[Any]]]
"""Encoded images in; per image, the garments found (highest score first)."""


@dataclass
class DecodedGarment:
    """A garment as the gateway returns it, shaped for the evaluation's scoring.

    It has the fields of ``fashionserve.ensemble.Garment`` that scoring reads, except that
    ``decoded`` replaces the logits: the gateway has already decoded them.
    """

    box: tuple[float, float, float, float]
    score: float
    detector_class: int  # index into Taxonomy.roots
    decoded: Decoded
    embedding: np.ndarray = field(repr=False)


def decoded_garment(g: GarmentResult, roots: Sequence[str]) -> DecodedGarment:
    """Convert one gateway garment; ``roots`` (the top-level categories, in taxonomy
    order) turns its detector class name back into the index the scoring expects."""
    if g.embedding is None:
        raise ValueError("the evaluation needs embeddings: ask for include_embeddings")
    return DecodedGarment(
        box=g.box.as_tuple(),
        score=g.detector_score,
        detector_class=list(roots).index(g.detector_class),
        decoded=Decoded(
            category_path=[ScoredLabel(s.name, s.probability) for s in g.category_path],
            tags={
                t.group: [ScoredLabel(s.name, s.probability) for s in t.labels]
                for t in g.tag_groups
            },
        ),
        embedding=np.asarray(g.embedding, np.float32),
    )


def gateway_backend(
    address: str, api_key: str | None, timeout: float = 300.0
) -> tuple[InferFn, dict[str, str]]:
    """``(infer, served)`` for evaluating through the gateway at ``address``.

    ``served`` mirrors the ensemble parameters the Triton backend reports (taxonomy
    version and hash, ``max_images_per_request`` = the gateway's BatchAnalyze limit,
    model versions); ``infer`` sends one ``BatchAnalyze`` call (thread-safe) and raises
    ``RuntimeError`` naming the image if any image of it fails.
    """
    client = FashionClient(address, api_key, timeout=timeout)
    try:
        info = client.get_serving_info()
        roots = client.get_taxonomy().roots
    except FashionServeError as exc:
        client.close()
        raise RuntimeError(f"the gateway at {address} cannot be used: {exc}") from exc
    served = {
        "taxonomy_version": info.taxonomy_version,
        "taxonomy_hash": info.taxonomy_hash,
        "max_images_per_request": str(info.limits.max_images_per_batch),
        "gateway_version": info.gateway_version,
        **{f"{m.name}_version": m.version for m in info.models},
    }
    # Server defaults for score floor and cap: the same as the ensemble applies.
    options = AnalyzeOptions(include_embeddings=True)

    def infer(images: list[bytes]) -> list[list[Any]]:
        try:
            entries = client.batch_analyze(images, options)
        except FashionServeError as exc:
            raise RuntimeError(f"BatchAnalyze failed at {address}: {exc}") from exc
        out: list[list[Any]] = []
        for i, entry in enumerate(entries):
            if entry.error is not None:
                raise RuntimeError(f"image {i} of a batch failed: {entry.error}")
            assert entry.result is not None
            out.append([decoded_garment(g, roots) for g in entry.result.garments])
        return out

    return infer, served
