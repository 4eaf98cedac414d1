"""Training of the reference detector, tagger and embedder on a ``data synth`` directory.

``train_all`` trains the requested models one after the other on 2 CPU threads, from a
seed (same seed, same data, same machine: same weights), then validates the whole decode
path in PyTorch (detector -> crops from the *detected* boxes -> tagger / embedder ->
``Taxonomy.decode``) on the val, query and gallery splits, the way the served ensemble
computes it, and writes one checkpoint per model with its validation figures.

JPEGs are decoded once into memory; batches are assembled in the main process (two cores
leave nothing to gain from loader workers). Where the CPU has native bfloat16 (AVX512-BF16,
AMX), the forward passes run under bfloat16 autocast, which about halves a step; weights,
losses and checkpoints stay float32. ``budget`` scales every schedule: 1.0 is the standard
run (about ten minutes for all three on 2 cores), 0.02 a smoke test.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fashionserve import metrics
from fashionserve.checkpoint import Checkpoint, Kind, load_checkpoint, save_checkpoint
from fashionserve.imaging import decode_image, letterbox, square_crop
from fashionserve.models import DEFAULT_ARCH, build_model
from fashionserve.models.blocks import count_parameters
from fashionserve.models.detector import CenterNetDetector, detector_loss, encode_targets
from fashionserve.models.embedder import Embedder, batch_hard_triplet_loss
from fashionserve.models.tagger import Tagger, tagger_loss
from fashionserve.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

THREADS = 2
DETECTOR_SIZE = 256
CROP_SIZE = 96
CROP_MARGIN = 0.1  # imaging.square_crop's default: what the served crop step uses
MIN_SCORE = 0.3  # the repository's default detector score floor (crop step)
MAX_CROPS = 16  # the repository's default cap of crops per image


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (AVX512-BF16 / AMX).

    There, autocast to bfloat16 about halves the time of a training step; elsewhere
    bfloat16 would be emulated and slower, so training stays in float32. Weights, losses
    and checkpoints are float32 either way.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(enabled: bool) -> torch.autocast:
    """bfloat16 autocast for the forward pass when ``enabled``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@dataclass(frozen=True)
class Schedule:
    """One model's standard (budget 1.0) schedule."""

    steps: int
    batch: int
    lr: float
    weight_decay: float = 1e-4
    warmup: float = 0.05  # fraction of the steps
    bf16: bool = False  # bfloat16 autocast for the forward pass

    def scaled(self, budget: float, bf16: bool = False) -> Schedule:
        return Schedule(
            max(1, round(self.steps * budget)),
            self.batch,
            self.lr,
            self.weight_decay,
            self.warmup,
            bf16,
        )


SCHEDULES: dict[str, Schedule] = {
    "detector": Schedule(steps=1600, batch=32, lr=3e-3),
    "tagger": Schedule(steps=800, batch=128, lr=3e-3),
    "embedder": Schedule(steps=500, batch=128, lr=3e-3),
}
EMBEDDER_K = 4  # instances per product in a P x K batch


# --------------------------------------------------------------------------------- data
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
    """A decoded split: images in memory and their garments."""

    name: str
    images: list[np.ndarray]
    garments: list[Garment]
    info: dict[str, Any] = field(default_factory=dict)

    def by_image(self) -> list[list[Garment]]:
        out: list[list[Garment]] = [[] for _ in self.images]
        for g in self.garments:
            out[g.image].append(g)
        return out


def load_split(data: Path, split: str, limit: int | None = None) -> Split:
    """Decode ``data/split`` (COCO-style ``labels.json`` + ``images/``) into memory."""
    root = Path(data) / split
    labels = json.loads((root / "labels.json").read_text())
    entries = labels["images"][:limit] if limit else labels["images"]
    index = {img["id"]: i for i, img in enumerate(entries)}
    images = [decode_image((root / "images" / img["file_name"]).read_bytes()) for img in entries]
    garments = []
    for ann in labels["annotations"]:
        if ann["image_id"] not in index:
            continue
        x, y, w, h = ann["bbox"]
        garments.append(
            Garment(
                image=index[ann["image_id"]],
                box=(float(x), float(y), float(x + w), float(y + h)),
                path=list(ann["category_path"]),
                tags=dict(ann.get("tags", {})),
                product_id=int(ann.get("product_id", -1)),
            )
        )
    return Split(split, images, garments, dict(labels.get("info", {})))


def image_stats(images: Sequence[np.ndarray], sample: int = 200) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 units) over a sample of images."""
    step = max(1, len(images) // sample)
    pixels = np.concatenate([im[::4, ::4].reshape(-1, 3) for im in images[::step]]) / 255.0
    return [float(v) for v in pixels.mean(0)], [float(v) for v in pixels.std(0)]


# ------------------------------------------------------------------------ augmentation
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
            crop = square_crop(self.split.images[g.image], box, self.size, CROP_MARGIN)
            out[j] = crop[:, ::-1] if rng is not None and rng.random() < 0.5 else crop
        x = to_tensor(out)
        return x if rng is None else jitter_colour(x, rng)


# ----------------------------------------------------------------------------- training
def make_optimizer(
    model: nn.Module, schedule: Schedule, extra: Sequence[nn.Parameter] = ()
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (no decay on norms and biases), linear warm-up then cosine decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in [*model.parameters(), *extra]:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": schedule.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=schedule.lr,
    )
    warm = max(1, int(schedule.steps * schedule.warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, schedule.steps - warm)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def epoch_batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled batches over ``range(n)`` (every epoch a new permutation)."""
    while True:
        order = rng.permutation(n)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield order[s : s + batch]


def run_steps(
    name: str,
    schedule: Schedule,
    step: Callable[[int], dict[str, float]],
) -> list[dict[str, float]]:
    """Run ``step`` ``schedule.steps`` times under a progress bar; returns the loss log."""
    history: list[dict[str, float]] = []
    bar = tqdm(
        range(schedule.steps),
        desc=f"train {name}",
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    for i in bar:
        losses = step(i)
        history.append(losses)
        if i % 10 == 0 or i == schedule.steps - 1:
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
    bar.close()
    return history


def train_detector(
    data: DetectorData,
    taxonomy: Taxonomy,
    schedule: Schedule,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[CenterNetDetector, dict[str, Any]]:
    """Train the CenterNet detector on letterboxed canvases."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    model = build_model("detector", DEFAULT_ARCH["detector"], _detector_params(taxonomy), taxonomy)
    assert isinstance(model, CenterNetDetector)
    model.normalize.set_stats(mean, std)
    # channels-last convolutions are about 25% faster on CPU (oneDNN).
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    opt, sched = make_optimizer(model, schedule)
    batches = epoch_batches(len(data.canvas), schedule.batch, rng)
    num_classes = len(taxonomy.roots)

    def step(_: int) -> dict[str, float]:
        x, t = data.batch(next(batches), rng, num_classes)
        with autocast(schedule.bf16):
            heads = model.heads(x)
        heat, size, offset = (h.float() for h in heads)
        losses = detector_loss((heat, size, offset), t)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    history = run_steps("detector", schedule, step)
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    return model.eval(), {"final_loss": _tail_mean(history)}


def train_tagger(
    data: CropData,
    taxonomy: Taxonomy,
    schedule: Schedule,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Tagger, dict[str, Any]]:
    """Train the tagger on jittered ground-truth crops."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    model = build_model("tagger", DEFAULT_ARCH["tagger"], _crop_params(), taxonomy)
    assert isinstance(model, Tagger)
    model.normalize.set_stats(mean, std)
    model.train()
    encoded = [taxonomy.encode_targets(g.path, g.tags) for g in data.split.garments]
    targets = torch.from_numpy(np.stack([e[0] for e in encoded]))
    masks = torch.from_numpy(np.stack([e[1] for e in encoded]))
    opt, sched = make_optimizer(model, schedule)
    batches = epoch_batches(len(encoded), schedule.batch, rng)

    def step(_: int) -> dict[str, float]:
        index = next(batches)
        x = data.crops(index, rng)
        with autocast(schedule.bf16):
            logits = model(x)
        loss = tagger_loss(logits.float(), targets[index], masks[index], taxonomy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    history = run_steps("tagger", schedule, step)
    return model.eval(), {"final_loss": _tail_mean(history)}


def pk_batches(
    labels: np.ndarray, p: int, k: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """P x K sampling: ``p`` products per batch, ``k`` instances each (with replacement
    when a product has fewer), products visited in shuffled epochs."""
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    ids = np.array(sorted(groups))
    while True:
        order = rng.permutation(ids)
        for s in range(0, len(order) - p + 1 if len(order) >= p else 1, p):
            chosen: list[int] = []
            for pid in order[s : s + p]:
                members = groups[int(pid)]
                chosen += list(rng.choice(members, k, replace=len(members) < k))
            yield np.array(chosen)


def train_embedder(
    data: CropData,
    taxonomy: Taxonomy,
    schedule: Schedule,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Embedder, dict[str, Any]]:
    """BNNeck embedder: ID cross-entropy (label smoothing 0.1) on the post-BN feature plus
    batch-hard triplet on the pre-BN feature, P x K batches over product ids."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    model = build_model("embedder", DEFAULT_ARCH["embedder"], _embed_params(), taxonomy)
    assert isinstance(model, Embedder)
    model.normalize.set_stats(mean, std)
    model.train()
    products = np.array([g.product_id for g in data.split.garments])
    ids, labels = np.unique(products, return_inverse=True)
    classifier = nn.Linear(model.dim, len(ids), bias=False)
    nn.init.normal_(classifier.weight, std=0.001)
    opt, sched = make_optimizer(model, schedule, list(classifier.parameters()))
    p = max(2, schedule.batch // EMBEDDER_K)
    batches = pk_batches(labels, p, EMBEDDER_K, rng)
    target_all = torch.from_numpy(labels.astype(np.int64))

    def step(_: int) -> dict[str, float]:
        index = next(batches)
        x = data.crops(index, rng)
        y = target_all[index]
        with autocast(schedule.bf16):
            feat, bn = model.features(x)
        feat, bn = feat.float(), bn.float()
        l_id = F.cross_entropy(classifier(bn), y, label_smoothing=0.1)
        l_tri = batch_hard_triplet_loss(feat, y)
        loss = l_id + l_tri
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item(), "id": l_id.item(), "triplet": l_tri.item()}

    history = run_steps("embedder", schedule, step)
    return model.eval(), {"final_loss": _tail_mean(history), "train_products": len(ids)}


def _tail_mean(history: list[dict[str, float]], n: int = 20) -> dict[str, float]:
    tail = history[-n:]
    return {k: float(np.mean([h[k] for h in tail])) for k in tail[0]} if tail else {}


def _detector_params(taxonomy: Taxonomy) -> dict[str, Any]:
    return {
        "num_classes": len(taxonomy.roots),
        "input_size": DETECTOR_SIZE,
        "max_detections": 16,
        "stem": 16,
        "widths": [24, 48, 96, 128],
        "depth": [1, 2, 2, 2],
        "neck": 48,
    }


def _crop_params() -> dict[str, Any]:
    return {"input_size": CROP_SIZE, "stem": 16, "widths": [24, 48, 96, 128], "depth": 1}


def _embed_params() -> dict[str, Any]:
    return {**_crop_params(), "dim": 128}


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def detect(
    detector: nn.Module, images: Sequence[np.ndarray], size: int, batch: int = 32
) -> list[metrics.Detections]:
    """Detector on letterboxed images; boxes mapped back to original pixels."""
    out: list[metrics.Detections] = []
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        boxed = [letterbox(img, size) for img in chunk]
        x = torch.from_numpy(np.stack([c for c, _ in boxed]).astype(np.float32))
        boxes, scores, classes = detector(x.permute(0, 3, 1, 2))
        for j, (_, lb) in enumerate(boxed):
            out.append((boxes[j].numpy() / lb.scale, scores[j].numpy(), classes[j].numpy()))
    return out


@torch.no_grad()
def run_crops(model: nn.Module, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    """A crop model over ``crops [N, C, C, 3]`` uint8."""
    outs = []
    for s in range(0, len(crops), batch):
        x = torch.from_numpy(crops[s : s + batch].astype(np.float32)).permute(0, 3, 1, 2)
        outs.append(model(x).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _served_detections(
    det: metrics.Detections, min_score: float, max_crops: int
) -> metrics.Detections:
    boxes, scores, classes = det
    keep = np.nonzero(scores >= min_score)[0][:max_crops]
    return boxes[keep], scores[keep], classes[keep]


def validate_pipeline(
    detector: nn.Module,
    tagger: nn.Module,
    embedder: nn.Module,
    taxonomy: Taxonomy,
    val: Split,
    query: Split,
    gallery: Split,
    min_score: float = MIN_SCORE,
) -> dict[str, Any]:
    """The served decode path in PyTorch: the acceptance figures without Triton.

    Detector on the letterboxed image; detections at or above ``min_score`` (at most
    ``MAX_CROPS``, as the crop step keeps them); a square crop from each *detected* box in
    the original image; tagger logits decoded with ``Taxonomy.decode``. Category and tag
    accuracy count ground-truth garments matched by a detection at IoU >= 0.5. Retrieval:
    each matched query garment's embedding against every gallery image's top detection.
    """
    det_size = int(getattr(detector, "input_size", DETECTOR_SIZE))
    crop_size = int(getattr(tagger, "input_size", CROP_SIZE))
    num_classes = len(taxonomy.roots)
    exclusive = [g.name for g in taxonomy.groups if g.exclusive]

    raw = detect(detector, val.images, det_size)
    served = [_served_detections(d, min_score, MAX_CROPS) for d in raw]
    per_image = val.by_image()
    truth = [
        (
            np.array([g.box for g in gs], np.float64).reshape(-1, 4),
            np.array([taxonomy.roots.index(g.path[0]) for g in gs], np.int64),
        )
        for gs in per_image
    ]
    result: dict[str, Any] = {
        "map50_all_k": metrics.detection_map50(raw, truth, num_classes)["map50"],
    }
    det_map = metrics.detection_map50(served, truth, num_classes)
    result["map50"] = det_map["map50"]
    result["ap50_per_class"] = dict(zip(taxonomy.roots, det_map["ap"], strict=True))

    crops, matched_gt = [], []
    for i, gs in enumerate(per_image):
        boxes, scores, _ = served[i]
        match = metrics.match_detections(boxes, scores, truth[i][0])
        for g, p in zip(gs, match, strict=True):
            if p >= 0:
                crops.append(square_crop(val.images[i], tuple(boxes[p]), crop_size, CROP_MARGIN))
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
    result["retrieval"] = validate_retrieval(
        detector, embedder, query, gallery, det_size, crop_size, min_score
    )
    return result


def validate_retrieval(
    detector: nn.Module,
    embedder: nn.Module,
    query: Split,
    gallery: Split,
    det_size: int,
    crop_size: int,
    min_score: float = MIN_SCORE,
) -> dict[str, float]:
    """Query garments (matched detections in street scenes) against gallery images (their
    best detection), cosine similarity. Unmatched query garments count as misses."""
    g_det = [
        _served_detections(d, min_score, MAX_CROPS)
        for d in detect(detector, gallery.images, det_size)
    ]
    g_crops, g_ids = [], []
    g_by_image = gallery.by_image()
    for i, (boxes, _, _) in enumerate(g_det):
        if len(boxes) and g_by_image[i]:
            g_crops.append(square_crop(gallery.images[i], tuple(boxes[0]), crop_size, CROP_MARGIN))
            g_ids.append(g_by_image[i][0].product_id)
    q_det = [
        _served_detections(d, min_score, MAX_CROPS)
        for d in detect(detector, query.images, det_size)
    ]
    q_crops, q_ids = [], []
    total = 0
    for i, gs in enumerate(query.by_image()):
        boxes, scores, _ = q_det[i]
        match = metrics.match_detections(
            boxes, scores, np.array([g.box for g in gs]).reshape(-1, 4)
        )
        for g, p in zip(gs, match, strict=True):
            total += 1
            if p >= 0:
                q_crops.append(
                    square_crop(query.images[i], tuple(boxes[p]), crop_size, CROP_MARGIN)
                )
                q_ids.append(g.product_id)
    if not q_crops or not g_crops:
        return {"acc@1": float("nan"), "acc@10": float("nan")}
    acc = metrics.retrieval_accuracy(
        run_crops(embedder, np.stack(q_crops)), q_ids, run_crops(embedder, np.stack(g_crops)), g_ids
    )
    # Queries the detector missed are failures of the served path too.
    found = len(q_ids) / max(1, total)
    return {**{k: v * found for k, v in acc.items()}, "matched_queries": found}


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
        x = crops.crops(range(len(val.garments)), None).permute(0, 2, 3, 1).numpy()
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
            return run_crops(embedder, x.permute(0, 2, 3, 1).numpy())

        result["retrieval"] = metrics.retrieval_accuracy(
            embed(query),
            [g.product_id for g in query.garments],
            embed(gallery),
            [g.product_id for g in gallery.garments],
        )
    return result


# ----------------------------------------------------------------------------- driver
def train_all(
    data: Path, out: Path, seed: int, models: list[str], budget: float, bf16: bool | None = None
) -> dict:
    """Train ``models`` on ``data`` (a ``data synth`` directory) and write checkpoints.

    Writes ``out/<kind>.pt`` for each requested model. The validation of the full decode
    path uses the freshly trained models, or the checkpoints already in ``out`` for the
    models not requested. Returns the summary: per model its steps, seconds and validation
    figures, plus ``pipeline`` (the served-path figures) when all three are available.
    ``bf16``: bfloat16 autocast in training; default where the CPU supports it natively.
    """
    data, out = Path(data), Path(out)
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    use_bf16 = bf16_supported() if bf16 is None else bf16
    taxonomy = load_taxonomy()
    start = time.perf_counter()
    t0 = time.perf_counter()
    train = load_split(data, "train")
    val = load_split(data, "val")
    query = load_split(data, "query")
    gallery = load_split(data, "gallery")
    _check_taxonomy(train, taxonomy)
    mean, std = image_stats(train.images)
    load_s = time.perf_counter() - t0
    log.info(
        "loaded %d train / %d val / %d query / %d gallery images in %.1f s",
        len(train.images),
        len(val.images),
        len(query.images),
        len(gallery.images),
        load_s,
    )
    data_info = {
        "path": str(data),
        "info": train.info,
        "train_images": len(train.images),
        "train_garments": len(train.garments),
        "val_images": len(val.images),
        "query_images": len(query.images),
        "gallery_images": len(gallery.images),
    }

    trained: dict[str, nn.Module] = {}
    reports: dict[str, dict[str, Any]] = {}

    def save(kind: str, model: nn.Module) -> None:
        rep = reports[kind]
        ckpt = Checkpoint(
            kind=_kind(kind),
            arch=DEFAULT_ARCH[kind],
            arch_params=_params_for(kind, taxonomy),
            input_size=(DETECTOR_SIZE, DETECTOR_SIZE)
            if kind == "detector"
            else (CROP_SIZE, CROP_SIZE),
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
            taxonomy=taxonomy,
            training=_plain(
                {
                    "seed": seed,
                    "budget": budget,
                    "steps": rep["steps"],
                    "batch": rep["batch"],
                    "epochs": rep["epochs"],
                    "wall_time_s": rep["seconds"],
                    "cpu_time_s": rep["cpu_seconds"],
                    "precision": rep["precision"],
                    "threads": THREADS,
                    "torch_version": str(torch.__version__),
                    "data": data_info,
                    "final_loss": rep.get("final_loss", {}),
                    "validation": rep.get("validation", {}),
                }
            ),
        )
        path = save_checkpoint(ckpt, out / f"{kind}.pt")
        rep["checkpoint"] = str(path)
        rep["file_bytes"] = path.stat().st_size

    for kind in ("detector", "tagger", "embedder"):
        if kind not in models:
            continue
        schedule = SCHEDULES[kind].scaled(budget, use_bf16)
        t0, c0 = time.perf_counter(), time.process_time()
        model: nn.Module
        if kind == "detector":
            det_data = DetectorData(train, taxonomy, DETECTOR_SIZE)
            model, extra = train_detector(det_data, taxonomy, schedule, seed, mean, std)
            del det_data
        elif kind == "tagger":
            model, extra = train_tagger(
                CropData(train, CROP_SIZE), taxonomy, schedule, seed, mean, std
            )
        else:
            model, extra = train_embedder(
                CropData(train, CROP_SIZE), taxonomy, schedule, seed, mean, std
            )
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
        trained[kind] = model
        reports[kind] = {
            "steps": schedule.steps,
            "batch": schedule.batch,
            "epochs": schedule.steps * schedule.batch / _epoch_size(kind, train),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "precision": "bf16-autocast" if use_bf16 else "fp32",
            "parameters": count_parameters(model),
            **extra,
        }
        # Saved now and again with the validation figures: a failure in validation
        # does not lose the training.
        save(kind, model)

    # Models not trained now: take them from `out` when there, for the pipeline check.
    available = dict(trained)
    for kind in ("detector", "tagger", "embedder"):
        if kind not in available and (out / f"{kind}.pt").exists():
            available[kind] = load_checkpoint(out / f"{kind}.pt").build_model()

    t0 = time.perf_counter()
    gt_figures = validate_on_gt(
        available.get("tagger"), available.get("embedder"), taxonomy, val, query, gallery
    )
    pipeline: dict[str, Any] | None = None
    if all(k in available for k in ("detector", "tagger", "embedder")):
        pipeline = validate_pipeline(
            available["detector"],
            available["tagger"],
            available["embedder"],
            taxonomy,
            val,
            query,
            gallery,
        )
    elif "detector" in available:
        pipeline = {"map50": _detector_map(available["detector"], taxonomy, val)}
    validate_s = time.perf_counter() - t0

    for kind, model in trained.items():
        reports[kind]["validation"] = _validation_for(kind, gt_figures, pipeline)
        save(kind, model)

    summary = {
        "models": reports,
        "validation_on_gt": gt_figures,
        "pipeline": pipeline,
        "load_seconds": load_s,
        "validate_seconds": validate_s,
        "total_seconds": time.perf_counter() - start,
    }
    print(format_summary(summary))
    return summary


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """JSON-plain copy (numpy scalars to floats): checkpoints load with weights_only=True."""
    return dict(json.loads(json.dumps(value, default=float)))


def _kind(name: str) -> Kind:
    if name == "detector":
        return "detector"
    if name == "tagger":
        return "tagger"
    return "embedder"


def _params_for(kind: str, taxonomy: Taxonomy) -> dict[str, Any]:
    if kind == "detector":
        return _detector_params(taxonomy)
    if kind == "tagger":
        return _crop_params()
    return _embed_params()


def _epoch_size(kind: str, train: Split) -> int:
    return max(1, len(train.images) if kind == "detector" else len(train.garments))


def _detector_map(detector: nn.Module, taxonomy: Taxonomy, val: Split) -> float:
    raw = detect(detector, val.images, int(getattr(detector, "input_size", DETECTOR_SIZE)))
    served = [_served_detections(d, MIN_SCORE, MAX_CROPS) for d in raw]
    truth = [
        (
            np.array([g.box for g in gs], np.float64).reshape(-1, 4),
            np.array([taxonomy.roots.index(g.path[0]) for g in gs], np.int64),
        )
        for gs in val.by_image()
    ]
    return float(metrics.detection_map50(served, truth, len(taxonomy.roots))["map50"])


def _validation_for(
    kind: str, gt: dict[str, Any], pipeline: dict[str, Any] | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kind == "detector" and pipeline:
        out = {
            k: pipeline[k]
            for k in ("map50", "map50_all_k", "ap50_per_class", "recall50")
            if k in pipeline
        }
    elif kind == "tagger":
        out = {f"gt_crops_{k}": v for k, v in gt.items() if k != "retrieval"}
        if pipeline and "category_accuracy" in pipeline:
            out["category_accuracy"] = pipeline["category_accuracy"]
            out["exclusive_tag_accuracy"] = pipeline["exclusive_tag_accuracy"]
    elif kind == "embedder":
        if "retrieval" in gt:
            out["gt_crops_retrieval"] = gt["retrieval"]
        if pipeline and "retrieval" in pipeline:
            out["retrieval"] = pipeline["retrieval"]
    return out


def _check_taxonomy(train: Split, taxonomy: Taxonomy) -> None:
    wanted = train.info.get("taxonomy_hash")
    if wanted and wanted != taxonomy.hash:
        raise ValueError(
            f"data set was rendered for taxonomy {train.info.get('taxonomy_version')} "
            f"(hash {wanted[:12]}), training uses {taxonomy.version} (hash {taxonomy.hash[:12]})"
        )


def format_summary(summary: dict[str, Any]) -> str:
    """The printed table: per model steps, time and validation figures."""
    lines = [
        "",
        f"{'model':<10} {'steps':>6} {'epochs':>7} {'wall':>8} {'cpu':>8} {'params':>9}  validation",
    ]
    for kind, rep in summary["models"].items():
        lines.append(
            f"{kind:<10} {rep['steps']:>6} {rep['epochs']:>7.1f} {rep['seconds']:>7.1f}s "
            f"{rep['cpu_seconds']:>7.1f}s {rep['parameters']:>9,}  "
            f"{_flat(rep.get('validation', {}))}"
        )
    if summary.get("pipeline"):
        lines.append(f"pipeline (PyTorch, served path): {_flat(summary['pipeline'])}")
    lines.append(
        f"data load {summary['load_seconds']:.1f}s, validation {summary['validate_seconds']:.1f}s, "
        f"total {summary['total_seconds']:.1f}s"
    )
    return "\n".join(lines)


def _flat(d: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, float):
            parts.append(f"{prefix}{k}={v:.3f}")
        else:
            parts.append(f"{prefix}{k}={v}")
    return " ".join(p for p in parts if p)
