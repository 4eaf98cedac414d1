"""Per-class quality and threshold calibration, on plain arrays (no Triton, no gRPC).

Each decision the taxonomy takes has a key (:meth:`Taxonomy.threshold_keys`): a category
(``"shirt"``) or a tag label (``"colour/red"``). For one decision, every labelled garment
the decision concerns gives a pair (is it truly this label?, the score the decision
compares with its threshold); :func:`decisions` builds those pairs from probability tables,
exactly as :meth:`Taxonomy.decide` decides:

* a category is decided only for garments whose decoded path reached its parent (the root
  is reached by all). Its score is its probability given its parent when it is the most
  likely sibling, else 0 (decoding takes the best sibling only). Garments reaching the
  parent that are not of this category are its negatives: they count against precision;
* a tag label concerns the garments whose decoded path its group applies to (every garment
  for a group without scope, such as colour; a scoped group, such as sleeve, only where the
  path reached its scope): its recall is *at its level* too, like a category's. Its score is
  its probability (for an exclusive group, only when it is the group's best label). Garments
  decoded into the group's scope that truly lie outside it are negatives.

:func:`calibrate` picks, for each decision, the highest threshold whose recall reaches the
target (scikit-learn's ``precision_recall_curve``), categories top-down so that a child is
calibrated on the garments that pass its calibrated parent (the tree stays consistent: a
child is only reached through its parent, and its recall is measured where it can be
decided), then tags on the decoded paths. A decision with fewer than
:data:`MIN_SUPPORT` positives keeps its default and is flagged. Recall and precision come
with 95% Wilson score intervals, which widen as support shrinks.

A category's recall here is *at its level* (given its parent passed), a tag's given its
group was decided; the end-to-end recall (garments of that class that get it decoded) is
the product along the path, and :func:`class_report` reports both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fashionserve import metrics
from fashionserve.taxonomy import Decoded, SegmentKind, Taxonomy
from fashionserve.thresholds import Interval, LabelThreshold, ThresholdSet

MIN_SUPPORT = 30
"""Fewest positives on the calibration split for a decision to be calibrated: below it the
Wilson interval on recall at a 0.90 target spans more than +-0.11, too wide to trust."""
Z95 = 1.959963984540054
SCORE_MARGIN = 1e-6  # well above float32's resolution near 1 (6e-8), far below any gap


@dataclass(frozen=True)
class Observation:
    """One labelled garment the served models found: its probability tables (as
    :meth:`Taxonomy.probabilities` returns them) and its true category path and tags."""

    tables: Mapping[str, Mapping[str, float]]
    path: Sequence[str]
    tags: Mapping[str, Any]  # group -> label (exclusive) or list of labels (independent)


@dataclass
class Decision:
    """The (truth, score) pairs of one decision over the garments it concerns."""

    key: str
    kind: SegmentKind
    y_true: np.ndarray  # bool
    score: np.ndarray  # float, 0 where the decision cannot say yes

    @property
    def support(self) -> int:
        return int(self.y_true.sum())


@dataclass
class Counts:
    """What one threshold gives on one decision."""

    threshold: float
    support: int
    true_positives: int
    predicted: int

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.support if self.support else None

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.predicted if self.predicted else None


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (``None`` for no trials)."""
    if trials <= 0:
        return None
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def counts_at(decision: Decision, threshold: float) -> Counts:
    """Support, true positives and predicted positives at ``threshold`` (scores of 0 are
    never predicted: decoding cannot say yes there)."""
    yes = (decision.score >= threshold) & (decision.score > 0)
    return Counts(
        threshold,
        decision.support,
        int((yes & decision.y_true).sum()),
        int(yes.sum()),
    )


def average_precision(decision: Decision) -> float | None:
    """AP of the decision's scores (scikit-learn), ``None`` without positives."""
    from sklearn.metrics import average_precision_score

    if decision.support == 0:
        return None
    return float(average_precision_score(decision.y_true, decision.score))


# ------------------------------------------------------------------------- decisions
def _best(table: Mapping[str, float], label: str) -> float:
    """The label's probability when it is the table's best label, else 0."""
    best = max(table, key=table.__getitem__)
    return float(table[label]) if best == label else 0.0


def decisions(
    observations: Sequence[Observation], taxonomy: Taxonomy, keys: Sequence[str] | None = None
) -> dict[str, Decision]:
    """Every decision (or those in ``keys``), with ``taxonomy``'s thresholds deciding which
    garments reach each parent and which paths tags are decoded on."""
    decided = [taxonomy.decide(o.tables) for o in observations]
    wanted = set(keys) if keys is not None else None
    out: dict[str, Decision] = {}
    for seg in taxonomy.layout:
        if seg.kind == "category":
            table_key = f"category:{seg.owner}"
            for label in seg.labels:
                if wanted is not None and label not in wanted:
                    continue
                rows = [
                    (label in o.path, _best(o.tables[table_key], label))
                    for o, d in zip(observations, decided, strict=True)
                    if _reaches(d, seg.owner)
                ]
                out[label] = _decision(label, "category", rows)
            continue
        group = taxonomy.group(seg.owner)
        for label in seg.labels:
            key = f"{group.name}/{label}"
            if wanted is not None and key not in wanted:
                continue
            rows = []
            for o, d in zip(observations, decided, strict=True):
                if not taxonomy.group_applies(group, [s.name for s in d.category_path]):
                    continue
                truth = o.tags.get(group.name)
                positive = _has_tag(truth, label)
                table = o.tables[group.name]
                score = _best(table, label) if group.exclusive else float(table[label])
                rows.append((positive, score))
            out[key] = _decision(key, seg.kind, rows)
    return out


def _has_tag(truth: Any, label: str) -> bool:
    return label == truth if isinstance(truth, str) else label in (truth or ())


def _reaches(decoded: Decoded, owner: str) -> bool:
    return owner == "" or any(s.name == owner for s in decoded.category_path)


def _decision(key: str, kind: SegmentKind, rows: list[tuple[bool, float]]) -> Decision:
    y = np.array([r[0] for r in rows], bool)
    s = np.array([r[1] for r in rows], np.float64)
    return Decision(key, kind, y, s)


# ----------------------------------------------------------------------- calibration
def highest_threshold(decision: Decision, target: float) -> tuple[float, str]:
    """The highest threshold whose recall reaches ``target``, and a note when none does
    (then the threshold giving the most recall decoding can reach)."""
    from sklearn.metrics import precision_recall_curve

    positive = decision.score > 0
    if not (decision.y_true & positive).any():
        return 0.0, "no positive is ever decoded: recall 0 at any threshold"
    _, recall, thresholds = precision_recall_curve(decision.y_true, decision.score)
    # thresholds ascend; recall[i] is the recall at thresholds[i]. 0 is not a threshold
    # decoding can use (a score of 0 means the label cannot be decoded there).
    usable = thresholds > 0
    reached = usable & (recall[:-1] >= target - 1e-12)
    if reached.any():
        # Just under the score of the last garment it must keep: probabilities that travel
        # as float32 (the API's tables) must not drop it.
        return max(float(thresholds[reached].max()) - SCORE_MARGIN, 0.0), ""
    lowest = float(thresholds[usable].min())
    best = float(recall[:-1][usable].max())
    return lowest, f"target {target:.2f} not reachable: at most {best:.3f} (best-label misses)"


@dataclass
class Calibrated:
    """The outcome for one decision."""

    key: str
    kind: SegmentKind
    target: float
    counts: Counts
    calibrated: bool
    note: str = ""
    ap: float | None = None

    def entry(self) -> LabelThreshold:
        c = self.counts
        rci = wilson(c.true_positives, c.support)
        pci = wilson(c.true_positives, c.predicted)
        return LabelThreshold(
            threshold=c.threshold,
            calibrated=self.calibrated,
            target_recall=self.target,
            support=c.support,
            recall=_round(c.recall),
            recall_interval=Interval(low=round(rci[0], 4), high=round(rci[1], 4)) if rci else None,
            precision=_round(c.precision),
            precision_interval=(
                Interval(low=round(pci[0], 4), high=round(pci[1], 4)) if pci else None
            ),
            note=self.note,
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class CalibrationResult:
    outcomes: list[Calibrated] = field(default_factory=list)

    def threshold_set(
        self, taxonomy: Taxonomy, name: str, provenance: Mapping[str, Any]
    ) -> ThresholdSet:
        return ThresholdSet(
            name=name,
            taxonomy_version=taxonomy.version,
            taxonomy_hash=taxonomy.hash,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            calibration={**provenance, "min_support": MIN_SUPPORT},
            thresholds={o.key: o.entry() for o in self.outcomes},
        )


def calibrate(
    observations: Sequence[Observation],
    taxonomy: Taxonomy,
    target_recall: float,
    targets: Mapping[str, float] | None = None,
    min_support: int = MIN_SUPPORT,
) -> CalibrationResult:
    """Thresholds for every decision of ``taxonomy``: per key, the highest whose recall on
    ``observations`` reaches its target (``targets[key]``, else ``target_recall``).

    Categories are calibrated level by level from the root, each on the garments that pass
    the thresholds already chosen above it; then tags, on the paths the calibrated
    categories decode. A decision with fewer than ``min_support`` positives keeps the
    taxonomy's threshold (its own, else the default) and is flagged.
    """
    overrides = dict(targets or {})
    unknown = sorted(set(overrides) - {k for k, _ in taxonomy.threshold_keys()})
    if unknown:
        raise ValueError(f"--target names no category or tag label: {', '.join(unknown)}")
    chosen: dict[str, float] = {}
    result = CalibrationResult()
    # Categories first, in layout order (breadth-first: parents before children), then tags
    # on the decoded paths; each step sees every threshold chosen before it.
    for key, kind in taxonomy.threshold_keys():
        current = taxonomy.with_thresholds(chosen)
        decision = decisions(observations, current, [key])[key]
        target = overrides.get(key, target_recall)
        group = key.partition("/")[0] if kind != "category" else None
        label = key.partition("/")[2] if group else key
        default = taxonomy.threshold(kind, label, group)
        if decision.support < min_support:
            threshold, calibrated = default, False
            note = f"support {decision.support} < {min_support}: default kept"
        else:
            threshold, note = highest_threshold(decision, target)
            calibrated = True
        chosen[key] = threshold
        result.outcomes.append(
            Calibrated(
                key,
                kind,
                target,
                counts_at(decision, threshold),
                calibrated,
                note,
                average_precision(decision),
            )
        )
    return result


# ------------------------------------------------------------------------- reporting
@dataclass(frozen=True)
class DetectorCurve:
    """One detector class: its detections' scores best first, whether each matched a
    ground-truth box of the class (VOC greedy matching at IoU 0.5), and its ground truth."""

    name: str
    scores: np.ndarray
    true_positive: np.ndarray
    num_gt: int

    def ap(self) -> float | None:
        if self.num_gt == 0:
            return None
        if len(self.scores) == 0:
            return 0.0
        tp = np.cumsum(self.true_positive)
        return metrics.average_precision(tp / self.num_gt, tp / np.arange(1, len(tp) + 1))


def detector_curves(
    predictions: Sequence[metrics.Detections],
    truth: Sequence[metrics.GroundTruth],
    classes: Sequence[str],
    iou: float = 0.5,
) -> list[DetectorCurve]:
    """Per detector class, the matching :func:`fashionserve.metrics.detection_map50` does."""
    curves = []
    for c, name in enumerate(classes):
        records: list[tuple[float, int, int]] = []
        gts: list[np.ndarray] = []
        for i, ((_, scores, cls), (gt_boxes, gt_cls)) in enumerate(
            zip(predictions, truth, strict=True)
        ):
            cls_arr = np.asarray(cls).reshape(-1)
            sc = np.asarray(scores, np.float64).reshape(-1)
            records += [(float(sc[d]), i, int(d)) for d in np.nonzero(cls_arr == c)[0]]
            gts.append(np.asarray(gt_boxes, np.float64).reshape(-1, 4)[np.asarray(gt_cls) == c])
        records.sort(key=lambda r: -r[0])
        taken = [np.zeros(len(g), bool) for g in gts]
        tp = np.zeros(len(records), bool)
        for k, (_, i, d) in enumerate(records):
            if len(gts[i]) == 0:
                continue
            box = np.asarray(predictions[i][0], np.float64).reshape(-1, 4)[d]
            overlaps = metrics.box_iou(box[None], gts[i])[0]
            g = int(np.argmax(overlaps))
            if overlaps[g] >= iou and not taken[i][g]:
                taken[i][g] = True
                tp[k] = True
        scores_arr = np.array([r[0] for r in records], np.float64)
        curves.append(DetectorCurve(name, scores_arr, tp, sum(len(g) for g in gts)))
    return curves


def class_report(
    observations: Sequence[Observation],
    taxonomy: Taxonomy,
    detectors: Sequence[DetectorCurve] = (),
    detector_floor: float = 0.0,
) -> list[dict[str, Any]]:
    """One row per detector class, category and tag label: support, precision and recall
    (with Wilson intervals) at the thresholds ``taxonomy`` decides with, and AP."""
    rows: list[dict[str, Any]] = []
    for curve in detectors:
        tp = int(curve.true_positive[curve.scores >= detector_floor].sum())
        predicted = int((curve.scores >= detector_floor).sum())
        rows.append(
            _row(
                "detector",
                curve.name,
                1,
                Counts(detector_floor, curve.num_gt, tp, predicted),
                curve.ap(),
            )
        )
    decoded = [taxonomy.decide(o.tables) for o in observations]
    for key, decision in decisions(observations, taxonomy).items():
        if decision.kind == "category":
            node = taxonomy.nodes[key]
            row = _row(
                "category",
                "/".join(node.path),
                len(node.path),
                counts_at(decision, taxonomy.threshold("category", key)),
                average_precision(decision),
            )
            truly = [key in o.path for o in observations]
            found = sum(
                1
                for t, d in zip(truly, decoded, strict=True)
                if t and any(s.name == key for s in d.category_path)
            )
            row["recall_end_to_end"] = _round(found / sum(truly)) if any(truly) else None
        else:
            group, _, label = key.partition("/")
            row = _row(
                "tag",
                key,
                None,
                counts_at(decision, taxonomy.threshold(decision.kind, label, group)),
                average_precision(decision),
            )
            truly = [_has_tag(o.tags.get(group), label) for o in observations]
            found = sum(
                1
                for t, d in zip(truly, decoded, strict=True)
                if t and any(s.name == label for s in d.tags.get(group, ()))
            )
            row["recall_end_to_end"] = _round(found / sum(truly)) if any(truly) else None
        rows.append(row)
    return rows


def _row(
    kind: str, name: str, level: int | None, counts: Counts, ap: float | None
) -> dict[str, Any]:
    rci = wilson(counts.true_positives, counts.support)
    pci = wilson(counts.true_positives, counts.predicted)
    return {
        "kind": kind,
        "name": name,
        "level": level,
        "threshold": counts.threshold,
        "support": counts.support,
        "predicted": counts.predicted,
        "precision": _round(counts.precision),
        "precision_interval": [round(v, 4) for v in pci] if pci else None,
        "recall": _round(counts.recall),
        "recall_interval": [round(v, 4) for v in rci] if rci else None,
        "ap": _round(ap),
    }
