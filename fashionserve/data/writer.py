"""Writing a synthetic data set: ``fashionserve data synth``.

``out/<split>/images/NNNNNN.jpg`` plus a COCO-style ``out/<split>/labels.json`` per split
(:data:`fashionserve.data.scenes.SPLITS`; what each split holds is in
:mod:`fashionserve.data.dataset`). Every annotation carries ``category_path``, ``tags``
and ``product_id`` besides the COCO fields; ``info`` names the seed and the taxonomy
(version and hash) the set was rendered for.

The output depends only on the seed, the number of images and the taxonomy: byte-identical
across runs and across worker counts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fashionserve.data.catalog import CannotRender
from fashionserve.data.dataset import plan_data_set, render_planned
from fashionserve.data.reader import GroundTruth
from fashionserve.data.scenes import SPLITS
from fashionserve.taxonomy import Taxonomy

ImageRow = tuple[int, int, int, tuple[GroundTruth, ...]]  # index, width, height, garments


def synthesize(
    out: Path,
    images: int,
    seed: int,
    taxonomy: Taxonomy,
    *,
    workers: int | None = None,
    progress: bool = True,
    splits: Sequence[str] | None = None,
    trend: str | None = None,
) -> dict[str, Any]:
    """Render the synthetic data set into ``out`` and return a summary.

    Train holds ``images`` scenes; the catalog, val, query and gallery follow from it
    (:func:`fashionserve.data.dataset.plan_data_set`). ``workers``: rendering processes
    (default: up to 2 for a large set; 1 renders in-process). Raises
    :class:`fashionserve.data.catalog.CannotRender` when the taxonomy names categories or
    tags the renderer cannot draw, or when ``images`` is too small for every category to
    appear, or names an unknown split. ``splits``: only those are written (default: all; the
    plan, so every image, stays that of the whole data set). ``trend``: products drawn
    with a trend's priors (:data:`fashionserve.data.catalog.TRENDS`), recorded in each
    split's ``info``.
    """
    splits = SPLITS if splits is None else splits
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise CannotRender(f"splits {unknown or '(none)'} are not among {', '.join(SPLITS)}")
    start = time.monotonic()
    out = Path(out)
    plan = plan_data_set(images, seed, taxonomy, trend)
    wanted = [s for s in SPLITS if s in splits]
    for split in wanted:
        (out / split / "images").mkdir(parents=True, exist_ok=True)
    total = sum(1 for spec in plan.scenes if spec.split in wanted)
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if total > 200 else 1
    rows: dict[str, list[ImageRow]] = {s: [] for s in wanted}
    with tqdm(total=total, desc="synth", unit="img", disable=not progress or None) as bar:
        for sample in render_planned(plan, wanted, workers):
            (out / sample.split / "images" / sample.file_name).write_bytes(sample.image)
            rows[sample.split].append((sample.index, sample.width, sample.height, sample.garments))
            bar.update(1)

    written: dict[str, dict[str, int]] = {}
    for split in wanted:
        labels = _labels(rows[split], split, seed, taxonomy, trend)
        (out / split / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        written[split] = {
            "images": len(labels["images"]),
            "annotations": len(labels["annotations"]),
        }
    summary: dict[str, Any] = {"out": str(out), "seed": seed, "products": len(plan.products)}
    summary["splits"] = written
    summary["seconds"] = round(time.monotonic() - start, 2)
    print(
        f"synth: {out} seed={seed} products={len(plan.products)} "
        + " ".join(f"{s}={v['images']}img/{v['annotations']}ann" for s, v in written.items())
        + f" in {summary['seconds']:.1f}s"
    )
    return summary


def _labels(
    rows: list[ImageRow], split: str, seed: int, taxonomy: Taxonomy, trend: str | None
) -> dict[str, Any]:
    """The COCO-style ``labels.json`` document of one split."""
    categories = [
        {
            "id": i + 1,
            "name": leaf,
            "supercategory": taxonomy.nodes[leaf].parent or leaf,
            "path": list(taxonomy.path(leaf)),
        }
        for i, leaf in enumerate(taxonomy.leaves)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    image_rows: list[dict[str, Any]] = []
    ann_rows: list[dict[str, Any]] = []
    for index, w, h, garments in sorted(rows, key=lambda r: r[0]):
        image_rows.append({"id": index, "file_name": f"{index:06d}.jpg", "width": w, "height": h})
        for garment in garments:
            bw, bh = garment.bbox[2], garment.bbox[3]
            ann_rows.append(
                {
                    "id": len(ann_rows) + 1,
                    "image_id": index,
                    "bbox": list(garment.bbox),
                    "area": bw * bh,
                    "iscrowd": 0,
                    "category_id": category_id[garment.category_path[-1]],
                    "category_path": list(garment.category_path),
                    "tags": garment.tags,
                    "product_id": garment.product_id,
                }
            )
    info: dict[str, Any] = {
        "seed": seed,
        "split": split,
        "taxonomy_version": taxonomy.version,
        "taxonomy_hash": taxonomy.hash,
    }
    if trend is not None:
        info["trend"] = trend
    return {
        "info": info,
        "images": image_rows,
        "annotations": ann_rows,
        "categories": categories,
    }
