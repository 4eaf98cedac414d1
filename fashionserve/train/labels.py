"""Extra labels: the COCO JSON file ``fashionserve active select --format coco`` writes, a
labeller completes, and ``fashionserve train --extra-labels`` learns from. Read and
written here only (format version 1).

The file is COCO object detection JSON with a few fields of our own::

    {"info": {"fashionserve_labels_format": 1, ...},
     "images": [{"id": 1, "file_name": "images/<sha256>.jpg", "width": 640, "height": 480}],
     "annotations": [{"id": 1, "image_id": 1, "bbox": [x, y, w, h],
                      "category_id": 0, "category_path": [], "tags": {},
                      "product_id": null,
                      "prediction": {"category_path": ["top", "shirt"], "margin": 0.04, ...}}],
     "categories": [{"id": 1, "name": "shirt", "supercategory": "top"}, ...]}

``file_name`` is an image reference: a path relative to the file's folder, an absolute
path, or what the capture knew (``sha256:<hex>`` when images were not kept). Selection
writes the model's guess under ``prediction`` and leaves ``category_path`` empty: the
labeller fills ``category_path`` (top level first) and ``tags`` (group -> label, or a list
for an independent group), and ``product_id`` where known (the embedder learns from those).
Training reads only the annotations whose ``category_path`` is set, so an unreviewed file
teaches nothing rather than the model's own guesses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashionserve.errors import InvalidInput
from fashionserve.taxonomy import Taxonomy

FORMAT_VERSION = 1
FORMAT_KEY = "fashionserve_labels_format"


class LabelsError(InvalidInput):
    """An extra-labels file that cannot be used."""

    reason = "BAD_LABELS"


@dataclass
class LabelImage:
    """One image of a labels file."""

    file_name: str
    width: int
    height: int


@dataclass
class LabelBox:
    """One garment: its image, its box (x1, y1, x2, y2 pixels) and, once labelled, its
    category path, tags and product."""

    image: int  # index into LabelsFile.images
    box: tuple[float, float, float, float]
    category_path: list[str] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)
    product_id: int | None = None
    prediction: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelsFile:
    images: list[LabelImage]
    boxes: list[LabelBox]
    info: dict[str, Any] = field(default_factory=dict)

    def labelled(self) -> list[LabelBox]:
        """The boxes a labeller completed."""
        return [b for b in self.boxes if b.category_path]


def write_labels(path: Path, labels: LabelsFile, taxonomy: Taxonomy) -> None:
    """Write ``labels`` as COCO JSON (categories: the taxonomy's leaves)."""
    leaves = list(taxonomy.leaves)
    images = [
        {"id": i + 1, "file_name": im.file_name, "width": im.width, "height": im.height}
        for i, im in enumerate(labels.images)
    ]
    annotations = []
    for n, b in enumerate(labels.boxes):
        x1, y1, x2, y2 = b.box
        leaf = b.category_path[-1] if b.category_path else None
        annotations.append(
            {
                "id": n + 1,
                "image_id": b.image + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
                "category_id": leaves.index(leaf) + 1 if leaf in leaves else 0,
                "category_path": list(b.category_path),
                "tags": dict(b.tags),
                "product_id": b.product_id,
                "prediction": dict(b.prediction),
            }
        )
    doc = {
        "info": {**labels.info, FORMAT_KEY: FORMAT_VERSION, "taxonomy_hash": taxonomy.hash},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": leaf, "supercategory": taxonomy.path(leaf)[0]}
            for i, leaf in enumerate(leaves)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def read_labels(path: Path, taxonomy: Taxonomy) -> LabelsFile:
    """Read and check a labels file: format version, every labelled path and tag known to
    ``taxonomy``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LabelsError(f"{path}: cannot read labels: {exc}") from None
    version = doc.get("info", {}).get(FORMAT_KEY)
    if version != FORMAT_VERSION:
        raise LabelsError(f"{path}: labels format {version!r}, this version reads {FORMAT_VERSION}")
    index = {int(im["id"]): i for i, im in enumerate(doc["images"])}
    images = [
        LabelImage(str(im["file_name"]), int(im["width"]), int(im["height"]))
        for im in doc["images"]
    ]
    boxes = []
    for ann in doc["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = LabelBox(
            index[int(ann["image_id"])],
            (x, y, x + w, y + h),
            list(ann.get("category_path") or []),
            dict(ann.get("tags") or {}),
            ann.get("product_id"),
            dict(ann.get("prediction") or {}),
        )
        if box.category_path:
            _check(path, ann["id"], box, taxonomy)
        boxes.append(box)
    return LabelsFile(images, boxes, dict(doc.get("info", {})))


def _check(path: Path, ann_id: Any, box: LabelBox, taxonomy: Taxonomy) -> None:
    where = f"{path}: annotation {ann_id}"
    leaf = box.category_path[-1]
    if leaf not in taxonomy.nodes or list(taxonomy.path(leaf)) != box.category_path:
        raise LabelsError(f"{where}: category path {box.category_path} is not in the taxonomy")
    for group, value in box.tags.items():
        try:
            labels = taxonomy.group(group).labels
        except KeyError:
            raise LabelsError(f"{where}: unknown tag group {group!r}") from None
        chosen = [value] if isinstance(value, str) else list(value or [])
        unknown = [v for v in chosen if v not in labels]
        if unknown:
            raise LabelsError(f"{where}: unknown {group} labels {unknown}")


def read_image(labels_path: Path, file_name: str) -> bytes:
    """The bytes of an image reference of the file at ``labels_path`` (a path relative to
    that file, or absolute); a reference that cannot be read is a :class:`LabelsError`
    naming the file, the reference and the path tried."""
    if file_name.startswith("sha256:"):
        raise LabelsError(
            f"{labels_path}: image {file_name} was not kept by the capture "
            "(capture.include_images): put the image's path in file_name"
        )
    ref = Path(file_name)
    where = ref if ref.is_absolute() else Path(labels_path).parent / ref
    try:
        return where.read_bytes()
    except OSError as exc:
        raise LabelsError(
            f"{labels_path}: image {file_name}: cannot read {where}: {exc.strerror}"
        ) from None
