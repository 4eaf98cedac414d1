"""``train_all``: one training run, from a ``data synth`` directory to checkpoints.

The requested models are trained one after the other on ``THREADS`` CPU threads
(:mod:`fashionserve.train.loops`), each checkpoint written as soon as its model is
trained, then the whole served path is validated (:mod:`fashionserve.train.validation`)
with the fresh models, or the checkpoints already in the output directory for the models
not requested, and the checkpoints are written again with their validation figures.
``budget`` scales every schedule: 1.0 is the standard run (about ten minutes for all three
on 2 cores), 0.02 a smoke test.

Fine-tuning: ``init`` (a checkpoint directory) starts each requested model from its
checkpoint there, at a fraction of the learning rate (``loops.FINE_TUNE_LR``), and copies
the models not requested to ``out`` unchanged, so ``out`` is a whole set to export.
``extra_labels`` (a labelled ``active select --format coco`` file) adds its garments to
the training split's, about a quarter of every tagger batch (``data.EXTRA_SHARE``), and of
every embedder batch for the garments labelled with a product. The detector never learns
from them: a selection labels some garments of an image, not all, and the others would be
taught as background.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fashionserve.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fashionserve.data.fingerprint import written_fingerprint
from fashionserve.ensemble import MODEL_KINDS, ModelKind
from fashionserve.errors import FailedPrecondition
from fashionserve.models import DEFAULT_ARCH
from fashionserve.models.blocks import count_parameters
from fashionserve.taxonomy import Taxonomy, load_taxonomy
from fashionserve.train.data import (
    CropData,
    DetectorData,
    Split,
    image_stats,
    load_extra,
    load_split,
    mixed,
)
from fashionserve.train.loops import (
    CROP_SIZE,
    DETECTOR_SIZE,
    SCHEDULES,
    bf16_supported,
    fine_tuning,
    params_for,
    train_detector,
    train_embedder,
    train_tagger,
)
from fashionserve.train.validation import (
    validate_detector,
    validate_on_gt,
    validate_pipeline,
)

log = logging.getLogger(__name__)

THREADS = 2


class TaxonomyMismatch(FailedPrecondition):
    """The data set was rendered for another taxonomy than the one training uses."""

    reason = "TAXONOMY_MISMATCH"


def train_all(
    data: Path,
    out: Path,
    seed: int,
    models: list[str],
    budget: float,
    bf16: bool | None = None,
    *,
    init: Path | None = None,
    extra_labels: Path | None = None,
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
    extra = load_extra(extra_labels, taxonomy) if extra_labels is not None else None
    starts = _initial_models(init, models, out) if init is not None else {}
    if init is not None:
        # The statistics the starting weights were learnt with (one set for the three).
        first = load_checkpoint(Path(init) / f"{models[0]}.pt")
        mean, std = list(first.mean), list(first.std)
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
        # What the renderer must still produce for these weights to be reproducible
        # (tests/unit/test_demo_checkpoints.py re-renders it).
        "fingerprint": written_fingerprint(data, taxonomy),
        "train_images": len(train.images),
        "train_garments": len(train.garments),
        "val_images": len(val.images),
        "query_images": len(query.images),
        "gallery_images": len(gallery.images),
    }
    if init is not None:
        data_info["init"] = {k: _checkpoint_hash(Path(init) / f"{k}.pt") for k in models}
    if extra is not None:
        data_info["extra_labels"] = {
            "path": str(extra_labels),
            "garments": len(extra.garments),
            "with_product": sum(g.product_id >= 0 for g in extra.garments),
            "info": extra.info,
        }

    trained: dict[str, nn.Module] = {}
    reports: dict[str, dict[str, Any]] = {}

    def save(kind: str, model: nn.Module) -> None:
        rep = reports[kind]
        ckpt = Checkpoint(
            kind=_kind(kind),
            arch=DEFAULT_ARCH[kind],
            arch_params=params_for(kind, taxonomy),
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

    for kind in MODEL_KINDS:
        if kind not in models:
            continue
        schedule = SCHEDULES[kind].scaled(budget, use_bf16)
        if kind in starts:
            schedule = fine_tuning(schedule)
        t0, c0 = time.perf_counter(), time.process_time()
        model: nn.Module
        start_from: Any = starts.get(kind)
        if kind == "detector":
            det_data = DetectorData(train, taxonomy, DETECTOR_SIZE)
            model, figures = train_detector(
                det_data, taxonomy, schedule, seed, mean, std, start_from
            )
            del det_data
        elif kind == "tagger":
            crops = CropData(mixed(train, extra) if extra else train, CROP_SIZE)
            model, figures = train_tagger(crops, taxonomy, schedule, seed, mean, std, start_from)
        else:
            crops = CropData(mixed(train, extra, products=True) if extra else train, CROP_SIZE)
            model, figures = train_embedder(crops, taxonomy, schedule, seed, mean, std, start_from)
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
            **figures,
        }
        # Saved now and again with the validation figures: a failure in validation
        # does not lose the training.
        save(kind, model)

    # Models not trained now: take them from `out` when there, for the pipeline check.
    available = dict(trained)
    for kind in MODEL_KINDS:
        if kind not in available and (out / f"{kind}.pt").exists():
            available[kind] = load_checkpoint(out / f"{kind}.pt").build_model()

    t0 = time.perf_counter()
    gt_figures = validate_on_gt(
        available.get("tagger"), available.get("embedder"), taxonomy, val, query, gallery
    )
    pipeline: dict[str, Any] | None = None
    if all(k in available for k in MODEL_KINDS):
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
        pipeline = {"map50": validate_detector(available["detector"], taxonomy, val)}
    validate_s = time.perf_counter() - t0

    for trained_kind, trained_model in trained.items():
        reports[trained_kind]["validation"] = _validation_for(trained_kind, gt_figures, pipeline)
        save(trained_kind, trained_model)

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


def _initial_models(init: Path, models: list[str], out: Path) -> dict[str, nn.Module]:
    """The requested models as ``init`` holds them; the others copied from it to ``out``."""
    init = Path(init)
    missing = [k for k in MODEL_KINDS if not (init / f"{k}.pt").is_file()]
    if missing:
        raise FailedPrecondition(f"--init {init}: no {', '.join(f'{k}.pt' for k in missing)}")
    out.mkdir(parents=True, exist_ok=True)
    for kind in MODEL_KINDS:
        if kind not in models and init.resolve() != out.resolve():
            shutil.copyfile(init / f"{kind}.pt", out / f"{kind}.pt")
    return {kind: load_checkpoint(init / f"{kind}.pt").build_model() for kind in models}


def _checkpoint_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """JSON-plain copy (numpy scalars to floats): checkpoints load with weights_only=True."""
    return dict(json.loads(json.dumps(value, default=float)))


def _kind(name: str) -> ModelKind:
    if name == "detector":
        return "detector"
    if name == "tagger":
        return "tagger"
    return "embedder"


def _epoch_size(kind: str, train: Split) -> int:
    return max(1, len(train.images) if kind == "detector" else len(train.garments))


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
        raise TaxonomyMismatch(
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
