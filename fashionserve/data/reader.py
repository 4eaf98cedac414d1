"""Labelled images: one type for an image and its ground truth, and the reader of a split.

A :class:`Sample` is the same whether it was read back from a data set on disk
(:func:`read_split`, ``<data>/<split>/labels.json`` plus ``images/``, as
:func:`fashionserve.data.writer.synthesize` writes them) or rendered in memory
(:func:`fashionserve.data.dataset.render_samples`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashionserve.errors import InvalidInput


class NotADataSet(InvalidInput):
    """A directory that holds no labelled split where one was expected."""

    reason = "NOT_A_DATA_SET"


@dataclass(frozen=True)
class GroundTruth:
    """One labelled garment: its COCO box ``[x, y, w, h]`` in image pixels, category path,
    tags (group -> label, or list of labels for an independent group) and product id."""

    bbox: tuple[float, float, float, float]
    category_path: tuple[str, ...]
    tags: dict[str, Any]
    product_id: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` in image pixels."""
        x, y, w, h = self.bbox
        return (float(x), float(y), float(x + w), float(y + h))


@dataclass(frozen=True)
class Sample:
    """One image of a split: encoded as stored, its size and its garments."""

    split: str
    index: int  # the image id within the split, 1-based
    file_name: str
    width: int
    height: int
    image: bytes
    garments: tuple[GroundTruth, ...]


@dataclass(frozen=True)
class LabelledSplit:
    """A split read back: its ``info`` (seed, taxonomy version and hash) and its samples in
    file order."""

    name: str
    info: dict[str, Any]
    samples: list[Sample]


def read_split(data: Path, split: str) -> LabelledSplit:
    """Read ``data/<split>`` (COCO-style ``labels.json`` and ``images/``) into memory.

    Raises :class:`NotADataSet` when ``labels.json`` is missing.
    """
    root = Path(data) / split
    labels_path = root / "labels.json"
    if not labels_path.is_file():
        raise NotADataSet(f"{labels_path} is missing: is {data} a `data synth` directory?")
    labels = json.loads(labels_path.read_text())
    by_image: dict[int, list[GroundTruth]] = {}
    for ann in labels.get("annotations", []):
        x, y, w, h = ann["bbox"]
        by_image.setdefault(int(ann["image_id"]), []).append(
            GroundTruth(
                bbox=(x, y, w, h),
                category_path=tuple(ann["category_path"]),
                tags=dict(ann.get("tags", {})),
                product_id=int(ann.get("product_id", -1)),
            )
        )
    samples = [
        Sample(
            split=split,
            index=int(entry["id"]),
            file_name=entry["file_name"],
            width=int(entry["width"]),
            height=int(entry["height"]),
            image=(root / "images" / entry["file_name"]).read_bytes(),
            garments=tuple(by_image.get(int(entry["id"]), [])),
        )
        for entry in labels["images"]
    ]
    return LabelledSplit(split, dict(labels.get("info", {})), samples)
