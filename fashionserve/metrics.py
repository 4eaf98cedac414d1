"""Quality metrics (pure numpy): detection mAP, category and tag accuracy, retrieval.

Used by training (PyTorch-side validation) and by ``fashionserve evaluate`` (through the
served ensemble), so both report the same figures the same way.

Boxes are ``x1, y1, x2, y2`` in one common coordinate frame (original-image pixels).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Detections = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One image's detections: ``(boxes [n, 4], scores [n], classes [n])``."""
GroundTruth = tuple[np.ndarray, np.ndarray]
"""One image's ground truth: ``(boxes [m, 4], classes [m])``."""


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``a [n, 4]`` and ``b [m, 4]`` -> ``[n, m]``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(
    pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5
) -> np.ndarray:
    """Greedy one-to-one matching, highest score first.

    Each prediction, in descending score order, takes the still-unmatched ground-truth box
    it overlaps most, if that IoU reaches ``iou``. Returns, for each ground-truth box, the
    index of its prediction or -1 (``int64 [m]``).
    """
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    matched = np.full(len(gt_boxes), -1, np.int64)
    if len(gt_boxes) == 0 or len(pred_boxes) == 0:
        return matched
    overlaps = box_iou(pred_boxes, gt_boxes)
    for p in np.argsort(-np.asarray(pred_scores, np.float64), kind="stable"):
        row = np.where(matched < 0, overlaps[p], -1.0)
        g = int(np.argmax(row))
        if row[g] >= iou:
            matched[g] = p
    return matched


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point AP: area under the precision envelope (max precision to the right)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def detection_map50(
    predictions: Sequence[Detections],
    ground_truth: Sequence[GroundTruth],
    num_classes: int,
    iou: float = 0.5,
) -> dict[str, Any]:
    """Per-class VOC-style all-point AP at IoU ``iou`` and their mean.

    ``predictions[i]`` and ``ground_truth[i]`` describe image ``i``. Within a class,
    detections over all images are ranked by score; one is a true positive when its best
    overlapping same-class ground truth box (IoU >= ``iou``) is not yet taken, otherwise a
    false positive (VOC). A class without ground truth has AP ``nan`` and is left out of
    the mean. Returns ``{"map50", "ap" (list per class), "num_gt" (list), "num_det" (list)}``.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} images")
    aps: list[float] = []
    num_gt: list[int] = []
    num_det: list[int] = []
    for c in range(num_classes):
        records: list[tuple[float, int, int]] = []  # (score, image, detection)
        gts: list[np.ndarray] = []
        for i, ((_, scores, classes), (gt_boxes, gt_classes)) in enumerate(
            zip(predictions, ground_truth, strict=True)
        ):
            cls = np.asarray(classes).reshape(-1)
            sc = np.asarray(scores, np.float64).reshape(-1)
            records += [(float(sc[d]), i, int(d)) for d in np.nonzero(cls == c)[0]]
            gcls = np.asarray(gt_classes).reshape(-1)
            gts.append(np.asarray(gt_boxes, np.float64).reshape(-1, 4)[gcls == c])
        total = sum(len(g) for g in gts)
        num_gt.append(total)
        num_det.append(len(records))
        if total == 0:
            aps.append(float("nan"))
            continue
        records.sort(key=lambda r: -r[0])
        taken = [np.zeros(len(g), bool) for g in gts]
        tp = np.zeros(len(records))
        for k, (_, i, d) in enumerate(records):
            if len(gts[i]) == 0:
                continue
            box = np.asarray(predictions[i][0], np.float64).reshape(-1, 4)[d]
            overlaps = box_iou(box[None], gts[i])[0]
            g = int(np.argmax(overlaps))
            if overlaps[g] >= iou and not taken[i][g]:
                taken[i][g] = True
                tp[k] = 1
        ctp = np.cumsum(tp)
        recall = ctp / total
        precision = ctp / np.arange(1, len(records) + 1)
        aps.append(average_precision(recall, precision) if len(records) else 0.0)
    valid = [a for a in aps if not np.isnan(a)]
    return {
        "map50": float(np.mean(valid)) if valid else float("nan"),
        "ap": aps,
        "num_gt": num_gt,
        "num_det": num_det,
    }


def category_accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """Fraction of garments whose predicted leaf category equals the true one.

    A prediction that stopped above the leaf (``None`` or an inner node) counts as wrong.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} garments")
    if not truth:
        return float("nan")
    return float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))


def exclusive_tag_accuracy(
    predicted: Sequence[Mapping[str, str | None]],
    truth: Sequence[Mapping[str, str | Sequence[str]]],
    groups: Iterable[str],
) -> dict[str, float]:
    """Accuracy of each exclusive tag group over the garments it applies to.

    A group applies to a garment when the ground truth has it (``truth[i][group]``); a
    missing or different prediction is wrong. Returns ``{group: accuracy, ...,
    "overall": accuracy over every (garment, group) pair}``; a group that never applies
    gets ``nan``.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} garments")
    result: dict[str, float] = {}
    hits = count = 0
    for group in groups:
        g_hits = g_count = 0
        for pred, true in zip(predicted, truth, strict=True):
            if group not in true:
                continue
            g_count += 1
            g_hits += int(pred.get(group) == true[group])
        result[group] = g_hits / g_count if g_count else float("nan")
        hits += g_hits
        count += g_count
    result["overall"] = hits / count if count else float("nan")
    return result


def retrieval_accuracy(
    query_emb: np.ndarray,
    query_ids: Sequence[int] | np.ndarray,
    gallery_emb: np.ndarray,
    gallery_ids: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1, 10),
) -> dict[str, float]:
    """Top-k retrieval accuracy by cosine similarity.

    For each query, the gallery is ranked by cosine similarity; the query is a hit at
    ``k`` when one of the first ``k`` gallery items has the query's id. Returns
    ``{"acc@1": ..., "acc@10": ...}`` (one key per ``k``).
    """
    q = np.asarray(query_emb, np.float64).reshape(len(query_ids), -1)
    g = np.asarray(gallery_emb, np.float64).reshape(len(gallery_ids), -1)
    if len(q) == 0 or len(g) == 0:
        return {f"acc@{k}": float("nan") for k in ks}
    q = q / np.clip(np.linalg.norm(q, axis=1, keepdims=True), 1e-12, None)
    g = g / np.clip(np.linalg.norm(g, axis=1, keepdims=True), 1e-12, None)
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    ranked = np.asarray(gallery_ids)[order]
    hit = ranked == np.asarray(query_ids)[:, None]
    return {f"acc@{k}": float(np.mean(hit[:, :k].any(axis=1))) for k in ks}
