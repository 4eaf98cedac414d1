"""Validation of a training run, measured the way the served ensemble computes it.

The served path runs here in PyTorch with the serving steps' own functions
(:mod:`fashionserve.model_repository.python_models.steps`): each image, as stored, is
decoded and letterboxed by the preprocess step; the detector decodes its boxes in the
graph, as the exported model does; the crop step keeps the detections at or above the
score floor (at most its cap per image), maps them to original-image pixels and cuts each
crop from the source canvas; the tagger's logits are decoded with ``Taxonomy.decode``.
The step settings are the repository's (by default what ``fashionserve repo build``
builds), so a gap between these figures and ``fashionserve evaluate`` through Triton is a
serving bug, not a difference of method.

* :func:`validate_pipeline`: the acceptance figures without Triton (detection, category
  and tag accuracy over the garments found, retrieval);
* :func:`validate_on_gt`: tagger and embedder on ground-truth crops (no detector).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fashionserve import metrics
from fashionserve.model_repository.python_models import steps
from fashionserve.model_repository.settings import RepositorySettings
from fashionserve.taxonomy import Taxonomy
from fashionserve.train.data import CropData, Split
from fashionserve.train.loops import CROP_SIZE, DETECTOR_SIZE


@dataclass
class Served:
    """The served path over a list of images, per image: every detection the detector
    emits (``all_k``) and those the crop step keeps (``kept``), both in original-image
    pixels, best first; and the crops of the kept ones ``[m, 3, C, C]`` float32 0..255."""

    all_k: list[metrics.Detections] = field(default_factory=list)
    kept: list[metrics.Detections] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)


@torch.no_grad()
def serve_images(
    detector: nn.Module,
    images: Sequence[bytes],
    crop_size: int | None,
    settings: RepositorySettings | None = None,
    batch: int = 32,
) -> Served:
    """Encoded ``images`` through preprocess, ``detector`` and the crop step (no crops cut
    when ``crop_size`` is None)."""
    settings = settings or RepositorySettings()
    det_size = int(getattr(detector, "input_size", DETECTOR_SIZE))
    served = Served()
    for start in range(0, len(images), batch):
        pre = steps.preprocess_images(images[start : start + batch], det_size, settings.source_size)
        boxes, scores, classes = (t.numpy() for t in detector(torch.from_numpy(pre.det_input)))
        top_k = boxes.shape[1]  # the detector's constant K
        every = steps.select_detections(
            boxes, scores, classes, pre.image_sizes, det_size, 0.0, top_k
        )
        kept = steps.select_detections(
            boxes,
            scores,
            classes,
            pre.image_sizes,
            det_size,
            settings.min_score,
            settings.max_crops_per_image,
        )
        crops = (
            steps.cut_crops(pre.source, pre.image_sizes, kept, crop_size, settings.crop_margin)
            if crop_size is not None
            else None
        )
        for i in range(len(pre.image_sizes)):
            served.all_k.append(_of_image(every, i))
            served.kept.append(_of_image(kept, i))
            if crops is not None:
                served.crops.append(crops[kept.image_index == i])
    return served


def _of_image(garments: steps.Garments, image: int) -> metrics.Detections:
    rows = garments.image_index == image
    return garments.boxes[rows], garments.scores[rows], garments.classes[rows]


@torch.no_grad()
def run_crops(model: nn.Module, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """A crop model over ``crops [N, 3, C, C]`` float32 0..255."""
    outs = []
    for start in range(0, len(crops), batch):
        x = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch], np.float32))
        outs.append(model(x).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def truth(split: Split, taxonomy: Taxonomy) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, the ground-truth boxes (x1, y1, x2, y2) and root-category indices."""
    return [
        (
            np.array([g.box for g in gs], np.float64).reshape(-1, 4),
            np.array([taxonomy.roots.index(g.path[0]) for g in gs], np.int64),
        )
        for gs in split.by_image()
    ]


def validate_pipeline(
    detector: nn.Module,
    tagger: nn.Module,
    embedder: nn.Module,
    taxonomy: Taxonomy,
    val: Split,
    query: Split,
    gallery: Split,
    settings: RepositorySettings | None = None,
) -> dict[str, Any]:
    """The served path's figures on ``val`` (and retrieval on ``query`` / ``gallery``).

    Category and tag accuracy count ground-truth garments matched by a kept detection at
    IoU >= 0.5, tagged from that detection's crop. ``map50_all_k`` scores every detection
    the detector emits, before the crop step's score floor and cap.
    """
    crop_size = int(getattr(tagger, "input_size", CROP_SIZE))
    num_classes = len(taxonomy.roots)
    exclusive = [g.name for g in taxonomy.groups if g.exclusive]

    served = serve_images(detector, val.encoded, crop_size, settings)
    expected = truth(val, taxonomy)
    result: dict[str, Any] = {
        "map50_all_k": metrics.detection_map50(served.all_k, expected, num_classes)["map50"],
    }
    det_map = metrics.detection_map50(served.kept, expected, num_classes)
    result["map50"] = det_map["map50"]
    result["ap50_per_class"] = dict(zip(taxonomy.roots, det_map["ap"], strict=True))

    crops, matched_gt = [], []
    for i, gs in enumerate(val.by_image()):
        boxes, scores, _ = served.kept[i]
        match = metrics.match_detections(boxes, scores, expected[i][0])
        for g, p in zip(gs, match, strict=True):
            if p >= 0:
                crops.append(served.crops[i][p])
                matched_gt.append(g)
    result["matched_garments"] = len(matched_gt)
    result["recall50"] = len(matched_gt) / max(1, len(val.garments))
    logits = run_crops(tagger, np.stack(crops)) if crops else np.zeros((0, taxonomy.num_logits))
    decoded = [taxonomy.decode(row) for row in logits]
    result["category_accuracy"] = metrics.category_accuracy(
        [d.leaf for d in decoded], [g.path[-1] for g in matched_gt]
    )
    pred_tags = [{k: (v[0].name if v else None) for k, v in d.tags.items()} for d in decoded]
    result["exclusive_tag_accuracy"] = metrics.exclusive_tag_accuracy(
        pred_tags, [g.tags for g in matched_gt], exclusive
    )
    result["retrieval"] = validate_retrieval(detector, embedder, query, gallery, settings)
    return result


def validate_retrieval(
    detector: nn.Module,
    embedder: nn.Module,
    query: Split,
    gallery: Split,
    settings: RepositorySettings | None = None,
) -> dict[str, float]:
    """Query garments (matched detections in street scenes) against gallery images (their
    best detection), cosine similarity. Unmatched query garments count as misses."""
    crop_size = int(getattr(embedder, "input_size", CROP_SIZE))
    shop = serve_images(detector, gallery.encoded, crop_size, settings)
    g_crops, g_ids = [], []
    for i, gs in enumerate(gallery.by_image()):
        if len(shop.crops[i]) and gs:
            g_crops.append(shop.crops[i][0])
            g_ids.append(gs[0].product_id)
    street = serve_images(detector, query.encoded, crop_size, settings)
    q_crops, q_ids = [], []
    total = 0
    for i, gs in enumerate(query.by_image()):
        boxes, scores, _ = street.kept[i]
        match = metrics.match_detections(
            boxes, scores, np.array([g.box for g in gs]).reshape(-1, 4)
        )
        for g, p in zip(gs, match, strict=True):
            total += 1
            if p >= 0:
                q_crops.append(street.crops[i][p])
                q_ids.append(g.product_id)
    if not q_crops or not g_crops:
        return {"acc@1": float("nan"), "acc@10": float("nan")}
    acc = metrics.retrieval_accuracy(
        run_crops(embedder, np.stack(q_crops)), q_ids, run_crops(embedder, np.stack(g_crops)), g_ids
    )
    # Queries the detector missed are failures of the served path too.
    found = len(q_ids) / max(1, total)
    return {**{k: v * found for k, v in acc.items()}, "matched_queries": found}


def validate_detector(detector: nn.Module, taxonomy: Taxonomy, val: Split) -> float:
    """The served path's detection mAP@0.5 on ``val`` (the detector alone)."""
    served = serve_images(detector, val.encoded, None)
    return float(
        metrics.detection_map50(served.kept, truth(val, taxonomy), len(taxonomy.roots))["map50"]
    )


def validate_on_gt(
    tagger: nn.Module | None,
    embedder: nn.Module | None,
    taxonomy: Taxonomy,
    val: Split,
    query: Split,
    gallery: Split,
) -> dict[str, Any]:
    """Tagger and embedder on ground-truth crops (no detector involved)."""
    result: dict[str, Any] = {}
    if tagger is not None:
        crops = CropData(val, int(getattr(tagger, "input_size", CROP_SIZE)))
        x = crops.crops(range(len(val.garments)), None).numpy()
        decoded = [taxonomy.decode(row) for row in run_crops(tagger, x)]
        exclusive = [g.name for g in taxonomy.groups if g.exclusive]
        result["category_accuracy"] = metrics.category_accuracy(
            [d.leaf for d in decoded], [g.path[-1] for g in val.garments]
        )
        result["exclusive_tag_accuracy"] = metrics.exclusive_tag_accuracy(
            [{k: (v[0].name if v else None) for k, v in d.tags.items()} for d in decoded],
            [g.tags for g in val.garments],
            exclusive,
        )
    if embedder is not None:
        size = int(getattr(embedder, "input_size", CROP_SIZE))

        def embed(split: Split) -> np.ndarray:
            x = CropData(split, size).crops(range(len(split.garments)), None)
            return run_crops(embedder, x.numpy())

        result["retrieval"] = metrics.retrieval_accuracy(
            embed(query),
            [g.product_id for g in query.garments],
            embed(gallery),
            [g.product_id for g in gallery.garments],
        )
    return result
