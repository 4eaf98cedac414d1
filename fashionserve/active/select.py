"""``fashionserve active select``: the garments worth labelling, from served traffic.

Candidates come from capture files (:mod:`fashionserve.gateway.capture`) and bulk tagging
output (:mod:`fashionserve.bulk.output`), one per garment found. A strategy picks
``budget`` of them:

* ``random``: uniformly, seeded (the baseline);
* ``margin``: the smallest margin between the two most probable leaf categories;
* ``entropy``: the largest entropy of the leaf-category distribution;
* ``kcenter``: k-center greedy on the embeddings (cosine distance), the first centre drawn
  with the seed: each pick the garment farthest from every garment picked, so the batch
  covers the traffic rather than repeating one look;
* ``hybrid``: each garment weighs its uncertainty (1 - margin), its detector score (a box
  that is no garment wastes a label) and its predicted class's weight: classes of low
  recall in ``--recall-report`` (an ``evaluate --report`` ``report.json``) weigh more. The
  :data:`HYBRID_SHORTLIST` x ``budget`` heaviest are kept, and k-center greedy, each
  distance weighted the same way, picks among them (the "diverse mini-batch" recipe of
  Zhdanov, 2019). Uncertain, different, and where the models are weakest.

Every strategy is deterministic for a seed: candidates are ordered by their key (image
hash or URI, garment index) before anything is drawn, and ties keep that order.

Bulk output holds the decoded category path, not the full tables, so its uncertainty is
an estimate from the leaf's path probability p: margin 2p - 1 (exact when two leaves share
the mass; at most the true margin otherwise) and the binary entropy of p; a garment whose
path stops above the leaves counts as p = 0, the least sure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fashionserve.bulk import output as bulk_output
from fashionserve.errors import InvalidInput
from fashionserve.gateway.capture import FILE_PREFIX, FILE_SUFFIX, read_capture_file
from fashionserve.taxonomy import Taxonomy
from fashionserve.train.labels import LabelBox, LabelImage, LabelsFile, write_labels

Strategy = Literal["margin", "entropy", "kcenter", "hybrid", "random"]
STRATEGIES: tuple[Strategy, ...] = ("margin", "entropy", "kcenter", "hybrid", "random")
TaskFormat = Literal["label-studio", "coco"]
IMAGES_DIR = "images"
HYBRID_SHORTLIST = 4
"""``hybrid`` runs k-center over the ``HYBRID_SHORTLIST x budget`` most uncertain garments."""
CAPTURE_GLOB = f"{FILE_PREFIX}*{FILE_SUFFIX}"


class SelectionError(InvalidInput):
    """The selection cannot run as asked."""

    reason = "BAD_SELECTION"


@dataclass
class Candidate:
    """One garment of served traffic that could be labelled."""

    key: str  # "<image reference>#<garment index>": unique, and the order of ties
    image: str  # a path or URI, or sha256:<hex> when the image was not kept
    width: int
    height: int
    box: tuple[float, float, float, float]
    detector_score: float
    category: str  # the predicted leaf
    margin: float
    entropy: float
    embedding: np.ndarray | None
    image_bytes: bytes | None = None


# ------------------------------------------------------------------------- reading
def read_candidates(source: Path) -> list[Candidate]:
    """Every garment in the capture files and bulk output under ``source`` (a capture
    directory, a bulk output directory, or a folder holding several of either)."""
    source = Path(source)
    if not source.is_dir():
        raise SelectionError(f"--source {source}: not a directory")
    found: list[Candidate] = []
    for path in sorted(source.glob(f"**/{CAPTURE_GLOB}")):
        found += _from_capture(read_capture_file(path).to_pylist())
    outputs = sorted({p.parent.parent for p in source.glob("**/data/part-*.parquet")})
    for out in outputs:
        found += _from_bulk(bulk_output.read_output(out).to_pylist())
    if not found:
        raise SelectionError(f"--source {source}: no capture files or bulk output with garments")
    seen: dict[str, Candidate] = {}
    for c in found:  # the same image captured twice is one image to label
        seen.setdefault(c.key, c)
    return sorted(seen.values(), key=lambda c: c.key)


def _from_capture(rows: Sequence[dict[str, Any]]) -> list[Candidate]:
    out = []
    for row in rows:
        ref = f"sha256:{row['image_sha256']}"
        for i, g in enumerate(row["garments"]):
            b = g["box"]
            out.append(
                Candidate(
                    f"{ref}#{i}",
                    ref,
                    int(row["width"]),
                    int(row["height"]),
                    (b["x_min"], b["y_min"], b["x_max"], b["y_max"]),
                    float(g["detector_score"]),
                    g["category"],
                    float(g["margin"]),
                    float(g["entropy"]),
                    np.asarray(g["embedding"], np.float32) if g["embedding"] else None,
                    row["image"],
                )
            )
    return out


def _from_bulk(rows: Sequence[dict[str, Any]]) -> list[Candidate]:
    out = []
    for row in rows:
        if row["status"] != bulk_output.OK:
            continue
        for i, g in enumerate(row["garments"]):
            b = g["box"]
            path = g["category_path"]
            # The packaged taxonomy has two levels: a leaf is the second entry.
            p = float(path[-1]["probability"]) if len(path) >= 2 else 0.0
            entropy = 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))
            embedding = g.get("embedding")
            out.append(
                Candidate(
                    f"{row['uri']}#{i}",
                    row["uri"],
                    int(row["width"]),
                    int(row["height"]),
                    (b["x_min"], b["y_min"], b["x_max"], b["y_max"]),
                    float(g["detector_score"]),
                    path[-1]["name"] if path else "",
                    max(0.0, 2 * p - 1),
                    entropy / math.log(2) if p > 0 else 1.0,
                    np.asarray(embedding, np.float32) if embedding else None,
                )
            )
    return out


def class_weights(report: Path | None, taxonomy: Taxonomy) -> dict[str, float]:
    """Per leaf category, its weight in ``hybrid``: (1 - recall + 0.05) over the mean of
    the same across leaves (1 for all without a report), from ``report.json``'s
    category rows (recall end to end where reported: what a caller sees)."""
    if report is None:
        return {leaf: 1.0 for leaf in taxonomy.leaves}
    try:
        doc = json.loads(Path(report).read_text())
    except (OSError, ValueError) as exc:
        raise SelectionError(f"--recall-report {report}: {exc}") from None
    recall: dict[str, float] = {}
    for row in doc.get("classes", []):
        if row.get("kind") != "category":
            continue
        leaf = str(row["name"]).split("/")[-1]
        value = row.get("recall_end_to_end", row.get("recall"))
        if leaf in taxonomy.leaves and value is not None:
            recall[leaf] = float(value)
    if not recall:
        raise SelectionError(f"--recall-report {report}: no category recall in it")
    miss = {leaf: 1.0 - recall.get(leaf, min(recall.values())) + 0.05 for leaf in taxonomy.leaves}
    mean = sum(miss.values()) / len(miss)
    return {leaf: m / mean for leaf, m in miss.items()}


# ----------------------------------------------------------------------- strategies
def select(
    candidates: Sequence[Candidate],
    budget: int,
    strategy: Strategy,
    seed: int = 0,
    weights: dict[str, float] | None = None,
) -> list[Candidate]:
    """``budget`` candidates by ``strategy`` (all of them when there are fewer), in the
    order picked."""
    if budget < 1:
        raise SelectionError(f"--budget must be at least 1, got {budget}")
    if strategy not in STRATEGIES:
        raise SelectionError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    pool = sorted(candidates, key=lambda c: c.key)
    n = min(budget, len(pool))
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return [pool[i] for i in rng.choice(len(pool), n, replace=False)]
    if strategy == "margin":
        return [pool[i] for i in np.argsort([c.margin for c in pool], kind="stable")[:n]]
    if strategy == "entropy":
        return [pool[i] for i in np.argsort([-c.entropy for c in pool], kind="stable")[:n]]
    missing = [c.key for c in pool if c.embedding is None]
    if missing:
        raise SelectionError(
            f"--strategy {strategy} needs embeddings; {len(missing)} garments have none "
            f"(e.g. {missing[0]}: bulk output written without --include-embeddings)"
        )
    emb = np.stack([c.embedding for c in pool if c.embedding is not None]).astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    if strategy == "kcenter":
        return [pool[i] for i in _kcenter(emb, np.ones(len(pool)), n, int(rng.integers(len(pool))))]
    w = weights or {}
    weight = np.array(
        [(1.0 - c.margin + 1e-3) * c.detector_score * w.get(c.category, 1.0) for c in pool]
    )
    # Uncertainty first, then diversity within the uncertain: over the whole pool, k-center
    # picks what is far from everything (a new product, a stray box) however sure the
    # models are of it, and labels go where they teach nothing.
    shortlist = np.argsort(-weight, kind="stable")[: HYBRID_SHORTLIST * n]
    picked = _kcenter(emb[shortlist], weight[shortlist], n, 0)
    return [pool[int(shortlist[i])] for i in picked]


def _kcenter(emb: np.ndarray, weight: np.ndarray, n: int, first: int) -> list[int]:
    """Greedy k-center: each pick maximises weight x cosine distance to the nearest pick."""
    chosen = [first]
    nearest = 1.0 - emb @ emb[first]
    nearest[first] = -np.inf
    for _ in range(n - 1):
        i = int(np.argmax(weight * nearest))
        chosen.append(i)
        nearest = np.minimum(nearest, 1.0 - emb @ emb[i])
        nearest[chosen] = -np.inf
    return chosen


# -------------------------------------------------------------------------- writing
def _image_refs(chosen: Sequence[Candidate], out: Path) -> dict[str, str]:
    """Each chosen image's reference as the task file gives it: an image the capture kept
    is written beside the task file (``images/<sha256>.<ext>``) and referenced relatively."""
    refs: dict[str, str] = {}
    for c in chosen:
        if c.image in refs:
            continue
        if c.image_bytes is not None:
            ext = "png" if c.image_bytes.startswith(b"\x89PNG") else "jpg"
            name = f"{IMAGES_DIR}/{c.image.removeprefix('sha256:')}.{ext}"
            target = out.parent / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(c.image_bytes)
            refs[c.image] = name
        else:
            refs[c.image] = c.image
    return refs


def write_tasks(
    out: Path,
    chosen: Sequence[Candidate],
    fmt: TaskFormat,
    taxonomy: Taxonomy,
    info: dict[str, Any],
) -> None:
    """The labelling tasks: Label Studio tasks (one per garment, its box and predicted
    category as a pre-annotation) or COCO JSON (:mod:`fashionserve.train.labels`)."""
    refs = _image_refs(chosen, out)
    if fmt == "coco":
        images: dict[str, int] = {}
        labels = LabelsFile([], [], info)
        for c in chosen:
            if c.image not in images:
                images[c.image] = len(labels.images)
                labels.images.append(LabelImage(refs[c.image], c.width, c.height))
            labels.boxes.append(
                LabelBox(
                    images[c.image],
                    c.box,
                    prediction={
                        "category_path": list(taxonomy.path(c.category)) if c.category else [],
                        "margin": c.margin,
                        "entropy": c.entropy,
                        "detector_score": c.detector_score,
                        "key": c.key,
                    },
                )
            )
        write_labels(out, labels, taxonomy)
        return
    tasks = []
    for c in chosen:
        x1, y1, x2, y2 = c.box
        w, h = max(c.width, 1), max(c.height, 1)
        tasks.append(
            {
                "data": {"image": refs[c.image], "garment": c.key},
                "predictions": [
                    {
                        "model_version": info.get("models", ""),
                        "score": 1.0 - c.margin,
                        "result": [
                            {
                                "type": "rectanglelabels",
                                "from_name": "category",
                                "to_name": "image",
                                "original_width": c.width,
                                "original_height": c.height,
                                "value": {
                                    "x": 100 * x1 / w,
                                    "y": 100 * y1 / h,
                                    "width": 100 * (x2 - x1) / w,
                                    "height": 100 * (y2 - y1) / h,
                                    "rotation": 0,
                                    "rectanglelabels": [c.category],
                                },
                            }
                        ],
                    }
                ],
            }
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(tasks, indent=1) + "\n")


def run_select(
    source: Path,
    budget: int,
    strategy: Strategy,
    out: Path,
    fmt: TaskFormat,
    taxonomy: Taxonomy,
    seed: int = 0,
    recall_report: Path | None = None,
) -> list[Candidate]:
    """``fashionserve active select``: read, pick, write; returns the picks."""
    candidates = read_candidates(source)
    weights = class_weights(recall_report, taxonomy) if strategy == "hybrid" else None
    chosen = select(candidates, budget, strategy, seed, weights)
    info = {"strategy": strategy, "seed": seed, "budget": budget, "source": str(source),
            "candidates": len(candidates)}  # fmt: skip
    write_tasks(Path(out), chosen, fmt, taxonomy, info)
    return chosen
