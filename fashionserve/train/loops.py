"""The training loops of the detector, tagger and embedder, and their schedules.

Each loop is seeded (same seed, same data, same machine: same weights). Where the CPU has
native bfloat16 (AVX512-BF16, AMX), the forward passes run under bfloat16 autocast, which
about halves a step; weights, losses and checkpoints stay float32. A schedule's ``steps``
scale with the run's ``budget``: 1.0 is the standard run, 0.02 a smoke test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fashionserve.ensemble import ModelKind
from fashionserve.models import DEFAULT_ARCH, build_model
from fashionserve.models.detector import CenterNetDetector, detector_loss
from fashionserve.models.embedder import Embedder, batch_hard_triplet_loss
from fashionserve.models.tagger import Tagger, tagger_loss
from fashionserve.taxonomy import Taxonomy
from fashionserve.train.data import CropData, DetectorData

DETECTOR_SIZE = 256
CROP_SIZE = 96


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
    "tagger": Schedule(steps=1000, batch=128, lr=3e-3),
    "embedder": Schedule(steps=600, batch=128, lr=3e-3),
}
EMBEDDER_K = 4  # instances per product in a P x K batch
FINE_TUNE_LR = 0.3
"""Learning-rate factor when training starts from a checkpoint (``--init``): the weights
are already good, a full rate would mostly undo them before the new labels count."""


def _start(
    kind: ModelKind,
    taxonomy: Taxonomy,
    mean: Sequence[float],
    std: Sequence[float],
    init: nn.Module | None,
) -> nn.Module:
    """A fresh model normalised with ``mean``/``std``, or ``init`` (its own statistics
    kept: its weights were learnt with them)."""
    if init is not None:
        return init
    model = build_model(kind, DEFAULT_ARCH[kind], params_for(kind, taxonomy), taxonomy)
    normalize: Any = model.normalize
    normalize.set_stats(mean, std)
    return model


def fine_tuning(schedule: Schedule) -> Schedule:
    """``schedule`` for a model that starts from a checkpoint: the same steps and batch,
    :data:`FINE_TUNE_LR` of the rate."""
    return replace(schedule, lr=schedule.lr * FINE_TUNE_LR)


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
    init: CenterNetDetector | None = None,
) -> tuple[CenterNetDetector, dict[str, Any]]:
    """Train the CenterNet detector on letterboxed canvases (from ``init`` if given)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    model = _start("detector", taxonomy, mean, std, init)
    assert isinstance(model, CenterNetDetector)
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
    init: Tagger | None = None,
) -> tuple[Tagger, dict[str, Any]]:
    """Train the tagger on jittered ground-truth crops (from ``init``'s weights if given)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    model = _start("tagger", taxonomy, mean, std, init)
    assert isinstance(model, Tagger)
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
    init: Embedder | None = None,
) -> tuple[Embedder, dict[str, Any]]:
    """BNNeck embedder: ID cross-entropy (label smoothing 0.1) on the post-BN feature plus
    batch-hard triplet on the pre-BN feature, P x K batches over product ids (from
    ``init``'s weights if given; the ID classifier is new either way)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 3])
    model = _start("embedder", taxonomy, mean, std, init)
    assert isinstance(model, Embedder)
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
        "neck": 32,
    }


def _crop_params() -> dict[str, Any]:
    return {"input_size": CROP_SIZE, "stem": 16, "widths": [24, 48, 96, 128], "depth": 1}


def _embed_params() -> dict[str, Any]:
    return {**_crop_params(), "dim": 128}


def params_for(kind: str, taxonomy: Taxonomy) -> dict[str, Any]:
    """The architecture hyper-parameters of model ``kind`` as trained here."""
    if kind == "detector":
        return _detector_params(taxonomy)
    if kind == "tagger":
        return _crop_params()
    return _embed_params()
