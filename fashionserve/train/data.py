"""Training data: the splits decoded into memory, augmentation, and the batches each model
learns from.

JPEGs are decoded once into memory; batches are assembled in the main process (two cores
leave nothing to gain from loader workers). Augmentation stays small where labels depend
on it (colour jitter of a few percent: colour tags must stay true).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionserve.data.reader import read_split
from fashionserve.imaging import decode_image, letterbox, square_crop
from fashionserve.model_repository.python_models.steps import DEFAULT_CROP_MARGIN
from fashionserve.models.detector import encode_targets
from fashionserve.taxonomy import Taxonomy
from fashionserve.train.labels import LabelsError, read_image, read_labels


@dataclass
class Garment:
    """One annotated garment."""

    image: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, original-image pixels
    path: list[str]
    tags: dict[str, Any]
    product_id: int


@dataclass
class Split:
    """A decoded split: images in memory and their garments, and the images as stored
    (``encoded``, what validation sends through the served steps)."""

    name: str
    images: list[np.ndarray]
    garments: list[Garment]
    info: dict[str, Any] = field(default_factory=dict)
    encoded: list[bytes] = field(default_factory=list)

    def by_image(self) -> list[list[Garment]]:
        out: list[list[Garment]] = [[] for _ in self.images]
        for g in self.garments:
            out[g.image].append(g)
        return out


def load_split(data: Path, split: str) -> Split:
    """Decode ``data/<split>`` (as ``data synth`` writes it) into memory."""
    labelled = read_split(data, split)
    garments = [
        Garment(
            image=i,
            box=g.box,
            path=list(g.category_path),
            tags=dict(g.tags),
            product_id=g.product_id,
        )
        for i, sample in enumerate(labelled.samples)
        for g in sample.garments
    ]
    return Split(
        split,
        [decode_image(sample.image) for sample in labelled.samples],
        garments,
        labelled.info,
        [sample.image for sample in labelled.samples],
    )


def image_stats(images: Sequence[np.ndarray], sample: int = 200) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 units) over a sample of images."""
    step = max(1, len(images) // sample)
    pixels = np.concatenate([im[::4, ::4].reshape(-1, 3) for im in images[::step]]) / 255.0
    return [float(v) for v in pixels.mean(0)], [float(v) for v in pixels.std(0)]


def jitter_colour(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Small per-image brightness/contrast jitter of ``x [B, 3, H, W]`` (0..255), a few
    percent only: colour tags must stay true."""
    n = x.shape[0]
    gain = torch.from_numpy(rng.uniform(0.92, 1.08, n).astype(np.float32)).view(n, 1, 1, 1)
    bias = torch.from_numpy(rng.uniform(-8.0, 8.0, n).astype(np.float32)).view(n, 1, 1, 1)
    return (x * gain + bias).clamp_(0.0, 255.0)


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` to float32 ``[B, 3, H, W]`` (channels-last memory)."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float()


def jitter_box(
    box: tuple[float, float, float, float], rng: np.random.Generator, amount: float
) -> tuple[float, float, float, float]:
    """Move each side by up to ``amount`` of the box size: what detector error looks like."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    d = rng.uniform(-amount, amount, 4)
    return (x1 + d[0] * w, y1 + d[1] * h, x2 + d[2] * w, y2 + d[3] * h)


ZOOM_P = 0.3
"""Share of detector samples shown zoomed in on one garment (scale augmentation)."""


class DetectorData:
    """Letterboxed canvases and boxes in canvas pixels, decoded once.

    Scenes show garments at a few tens to a hundred-odd canvas pixels; a shop photo fills
    the canvas with one. ``ZOOM_P`` of the samples are therefore a square window of the
    original image around a random garment, scaled up to the canvas, so the detector sees
    every garment size it will be asked about.
    """

    def __init__(self, split: Split, taxonomy: Taxonomy, size: int, zoom: float = ZOOM_P) -> None:
        self.size = size
        self.zoom = zoom
        self.images = split.images
        n = len(split.images)
        self.canvas = np.zeros((n, size, size, 3), np.uint8)
        self.content: list[tuple[int, int]] = []
        self.boxes: list[np.ndarray] = []
        self.classes: list[np.ndarray] = []
        per_image = split.by_image()
        for i, img in enumerate(split.images):
            self.canvas[i], lb = letterbox(img, size)
            self.content.append((round(lb.width * lb.scale), round(lb.height * lb.scale)))
            gs = per_image[i]
            self.boxes.append(np.array([g.box for g in gs], np.float32).reshape(-1, 4) * lb.scale)
            self.classes.append(np.array([taxonomy.roots.index(g.path[0]) for g in gs], np.int64))
        self.max_objects = max([len(b) for b in self.boxes] + [1])

    def batch(
        self, index: np.ndarray, rng: np.random.Generator, num_classes: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images ``[B, 3, S, S]`` float 0..255 and CenterNet targets, with random flips."""
        images = self.canvas[index]  # fancy indexing: a copy, safe to flip in place
        targets: list[dict[str, np.ndarray]] = []
        for j, i in enumerate(index):
            boxes, classes = self.boxes[i].copy(), self.classes[i]
            w, h = self.content[i]
            if len(boxes) and rng.random() < self.zoom:
                images[j], boxes, classes, (w, h) = self._zoomed(int(i), rng)
            if rng.random() < 0.5:
                # Flip the image content only: letterboxing keeps it at the top left.
                images[j, :h, :w] = images[j, :h, :w][:, ::-1]
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            targets.append(
                encode_targets(boxes, classes, num_classes, self.size // 4, self.max_objects)
            )
        x = jitter_colour(to_tensor(images), rng)
        t = {k: torch.from_numpy(np.stack([d[k] for d in targets])) for k in targets[0]}
        return x, t

    def _zoomed(
        self, i: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """A square window of original image ``i`` holding one whole garment, scaled to
        the canvas: ``(canvas, boxes in canvas pixels, their classes, content size)``."""
        image = self.images[i]
        height, width = image.shape[:2]
        scale = self.size / max(height, width)  # the letterbox scale of this image
        boxes = self.boxes[i] / scale  # original pixels
        x1, y1, x2, y2 = boxes[rng.integers(len(boxes))]
        lo, hi = 1.15 * max(x2 - x1, y2 - y1), float(max(height, width))
        side = round(rng.uniform(lo, hi)) if lo < hi else round(hi)
        # The window holds the garment and, where it can, stays inside the image on the
        # left and top (the grey fill of a letterbox is only ever right and bottom).
        x0 = round(min(max(rng.uniform(x2 - side, x1), 0.0), max(0.0, width - side)))
        y0 = round(min(max(rng.uniform(y2 - side, y1), 0.0), max(0.0, height - side)))
        canvas = square_crop(image, (x0, y0, x0 + side, y0 + side), self.size, margin=0.0)
        k = self.size / side
        moved = (boxes - np.array([x0, y0, x0, y0], np.float32)) * k
        clipped = np.clip(moved, 0, self.size)
        area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
        # Garments cut to less than a third of their area are dropped, not half-labelled.
        keep = area(clipped) >= area(moved) / 3
        content = (
            min(self.size, round((width - x0) * k)),
            min(self.size, round((height - y0) * k)),
        )
        return canvas, clipped[keep].astype(np.float32), self.classes[i][keep], content


class CropData:
    """Garment crops cut on the fly from in-memory images, with box jitter and flips."""

    def __init__(self, split: Split, size: int) -> None:
        self.split = split
        self.size = size

    def crops(
        self,
        index: Sequence[int] | np.ndarray,
        rng: np.random.Generator | None,
        amount: float = 0.08,
    ) -> torch.Tensor:
        """Crops of garments ``index`` as ``[B, 3, C, C]`` float 0..255 (augmented when
        ``rng`` is given)."""
        out = np.empty((len(index), self.size, self.size, 3), np.uint8)
        for j, i in enumerate(index):
            g = self.split.garments[i]
            box = g.box if rng is None else jitter_box(g.box, rng, amount)
            # The margin the served crop step uses: the model learns the crops it will see.
            crop = square_crop(self.split.images[g.image], box, self.size, DEFAULT_CROP_MARGIN)
            out[j] = crop[:, ::-1] if rng is not None and rng.random() < 0.5 else crop
        x = to_tensor(out)
        return x if rng is None else jitter_colour(x, rng)


EXTRA_SHARE = 0.25
"""Share of the garments a batch draws from ``--extra-labels``: a few hundred new labels
among thousands of training garments would otherwise be seen a handful of times."""
EXTRA_PRODUCT_OFFSET = 1 << 40
"""Added to the labeller's product ids: they are another namespace than the data set's."""


def load_extra(path: Path, taxonomy: Taxonomy) -> Split:
    """The labelled garments of an extra-labels file (:mod:`fashionserve.train.labels`),
    their images decoded. A garment without ``product_id`` gets -1: the tagger learns from
    it, the embedder does not."""
    labels = read_labels(path, taxonomy)
    used = sorted({b.image for b in labels.labelled()})
    if not used:
        raise LabelsError(f"{path}: no labelled garment (every category_path is empty)")
    where = {image: i for i, image in enumerate(used)}
    encoded = [read_image(path, labels.images[i].file_name) for i in used]
    garments = [
        Garment(
            image=where[b.image],
            box=b.box,
            path=list(b.category_path),
            tags=dict(b.tags),
            product_id=-1 if b.product_id is None else EXTRA_PRODUCT_OFFSET + int(b.product_id),
        )
        for b in labels.labelled()
    ]
    return Split("extra", [decode_image(e) for e in encoded], garments, labels.info, encoded)


def mixed(train: Split, extra: Split, share: float = EXTRA_SHARE, products: bool = False) -> Split:
    """``train`` with ``extra``'s garments repeated to make about ``share`` of the
    garments. ``products``: only the extra garments with a product id (for the embedder)."""
    chosen = [g for g in extra.garments if g.product_id >= 0] if products else extra.garments
    if not chosen:
        return train
    repeat = max(1, round(share * len(train.garments) / ((1 - share) * len(chosen))))
    offset = len(train.images)
    added = [
        Garment(offset + g.image, g.box, g.path, g.tags, g.product_id)
        for _ in range(repeat)
        for g in chosen
    ]
    return Split(
        train.name,
        train.images + extra.images,
        train.garments + added,
        train.info,
        train.encoded + extra.encoded,
    )
