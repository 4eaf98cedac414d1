"""The fingerprint of a synthetic data set: what a checkpoint records of the data it was
trained on, so that a test can tell when the renderer no longer makes that data.

A fingerprint names the seed, the number of train images, the trend if the set was drawn
with one, and the taxonomy, and holds two
hashes: one of the *plan* (the catalog and which products every scene of every split
shows) and one of a fixed *sample* of train scenes (their JPEG bytes and labels). The
sample is small enough to re-render in a second, and any change to the catalog, the scene
composition, the drawing or the encoder changes one of the two.

:func:`written_fingerprint` reads it from a data set on disk (what training does);
:func:`rendered_fingerprint` makes it again from the seed and the size alone (what the
test of the committed checkpoints does). The two agree exactly when the current renderer
reproduces the data set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fashionserve.data.dataset import Plan, plan_data_set, render_specs
from fashionserve.data.reader import GroundTruth, Sample, read_split
from fashionserve.errors import InvalidInput
from fashionserve.taxonomy import Taxonomy, load_taxonomy

SAMPLE_SIZE = 16
"""Train scenes hashed into the fingerprint, spread evenly over the split."""


class NotSynthetic(InvalidInput):
    """A data set that does not name the seed it was rendered from."""

    reason = "NOT_SYNTHETIC"


def sample_indices(images: int) -> list[int]:
    """The 1-based train indices the fingerprint hashes."""
    count = min(SAMPLE_SIZE, images)
    return sorted({1 + (k * images) // count for k in range(count)})


def written_fingerprint(data: Path, taxonomy: Taxonomy | None = None) -> dict[str, Any]:
    """The fingerprint of the data set written in ``data`` by ``data synth``."""
    train = read_split(data, "train")
    if "seed" not in train.info:
        raise NotSynthetic(f"{data}/train/labels.json names no seed: not a `data synth` set")
    images = len(train.samples)
    seed, trend = int(train.info["seed"]), train.info.get("trend")
    plan = plan_data_set(images, seed, taxonomy or load_taxonomy(), trend)
    wanted = set(sample_indices(images))
    return _fingerprint(plan, images, [s for s in train.samples if s.index in wanted])


def rendered_fingerprint(
    images: int, seed: int, taxonomy: Taxonomy | None = None, trend: str | None = None
) -> dict[str, Any]:
    """The fingerprint of the data set ``images``/``seed`` (and ``trend``), rendered now."""
    plan = plan_data_set(images, seed, taxonomy or load_taxonomy(), trend)
    wanted = set(sample_indices(images))
    specs = [s for s in plan.scenes if s.split == "train" and s.index in wanted]
    return _fingerprint(plan, images, list(render_specs(plan, specs)))


def _fingerprint(plan: Plan, images: int, samples: Iterable[Sample]) -> dict[str, Any]:
    plan_hash = hashlib.sha256()
    for product in plan.products:
        plan_hash.update(_canonical(dataclasses.asdict(product)))
    for spec in plan.scenes:
        plan_hash.update(_canonical(dataclasses.asdict(spec)))
    sample_hash = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: s.index):
        sample_hash.update(sample.image)
        sample_hash.update(_canonical([_label(g) for g in sample.garments]))
    fingerprint: dict[str, Any] = {
        "seed": plan.seed,
        "images": images,
        "plan_sha256": plan_hash.hexdigest(),
        "sample_indices": sample_indices(images),
        "sample_sha256": sample_hash.hexdigest(),
    }
    if plan.trend is not None:  # absent otherwise: fingerprints made before trends still match
        fingerprint["trend"] = plan.trend
    return fingerprint


def _label(garment: GroundTruth) -> dict[str, Any]:
    return {
        "bbox": [float(v) for v in garment.bbox],
        "path": list(garment.category_path),
        "tags": garment.tags,
        "product_id": garment.product_id,
    }


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=float).encode()
