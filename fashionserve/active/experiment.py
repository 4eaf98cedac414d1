"""``fashionserve active experiment``: the active-learning loop measured on synthetic data,
where ground truth stands in for the labeller.

1. Data, all rendered here: ``replay`` (the tagger's own training data, re-rendered from
   the seed and size its checkpoint's fingerprint records: the labels the models already
   had, replayed while fine-tuning, and its ``val`` split, new products, for the
   per-class recall report); ``traffic`` (another seed: products the models never saw,
   served as a day's traffic, twenty times the budget or more so that a strategy has
   something to choose from); ``eval`` (a third seed's ``val`` and ``test``: held-out new
   products, the figure). With ``trend``, traffic and eval show a season the models were
   not trained on (:data:`fashionserve.data.catalog.TRENDS`); replay stays as trained.
2. The traffic goes through the served path (the serving steps' own code with the
   checkpoints in PyTorch, :mod:`fashionserve.train.validation`; the same computation as
   Triton's ensemble) and every result is captured by the gateway's capture code
   (:mod:`fashionserve.gateway.capture`), images kept.
3. ``hybrid`` and ``random`` each select ``budget`` garments (same seed), which are
   labelled from ground truth (a box that matches no garment at IoU 0.5 stays unlabelled,
   as a labeller would reject it; it still spent the budget).
4. The tagger is fine-tuned from the checkpoints with each labelled file
   (``train_all(init=..., extra_labels=...)``, what ``fashionserve train --init
   --extra-labels`` runs), and once without new labels (the control: what the short
   fine-tune alone does).
5. Category and exclusive-tag accuracy of each tagger on ``eval``, through the same served
   path (same detector, so only the tagger differs).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fashionserve import evaluate, metrics
from fashionserve.active.select import Strategy, run_select
from fashionserve.checkpoint import load_checkpoint
from fashionserve.data.writer import synthesize
from fashionserve.ensemble import MODEL_KINDS, Garment
from fashionserve.gateway.capture import Capture, Pending
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.settings import CaptureSettings
from fashionserve.gateway.telemetry import Metrics
from fashionserve.model_repository.settings import RepositorySettings
from fashionserve.taxonomy import Taxonomy, load_taxonomy
from fashionserve.train import train_all
from fashionserve.train.labels import read_labels, write_labels
from fashionserve.train.loops import SCHEDULES
from fashionserve.train.validation import run_crops, serve_images

TRAFFIC_PER_LABEL = 10  # traffic images per garment of budget: ~20 garments per label
EVAL_PLAN_IMAGES = 10000  # its val + test: 2000 scenes (~4000 garments) of new products
STRATEGIES: tuple[Strategy, ...] = ("hybrid", "random")


def served_outputs(
    models: dict[str, nn.Module], split: evaluate.LabelledSplit
) -> tuple[list[ImageOutput], list[np.ndarray]]:
    """Every image of ``split`` through the served path: boxes, logits, embeddings; and
    the crops the tagger was given."""
    encoded = [img.path.read_bytes() for img in split.images]
    tagger: Any = models["tagger"]
    crop_size = int(tagger.input_size)
    served = serve_images(models["detector"], encoded, crop_size=crop_size)
    outputs = []
    for img, (boxes, scores, classes), crops in zip(
        split.images, served.kept, served.crops, strict=True
    ):
        logits = run_crops(models["tagger"], crops) if len(crops) else np.zeros((0, 0))
        embeddings = run_crops(models["embedder"], crops) if len(crops) else np.zeros((0, 0))
        garments = [
            Garment(
                (float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                float(s),
                int(c),
                logits[i],
                embeddings[i],
            )
            for i, (b, s, c) in enumerate(zip(boxes, scores, classes, strict=True))
        ]
        outputs.append(ImageOutput(img.width, img.height, garments))
    return outputs, served.crops


def capture_traffic(
    outputs: Sequence[ImageOutput],
    split: evaluate.LabelledSplit,
    taxonomy: Taxonomy,
    directory: Path,
) -> None:
    """Capture every served result as the gateway would, images kept."""
    settings = CaptureSettings(
        directory=str(directory),
        sample_rate=1.0,
        include_images=True,
        max_queued_records=len(outputs) + 1,
        max_queued_bytes=1024 * 1024 * 1024,
    )
    capture = Capture.from_settings(settings, Metrics().capture_records)
    assert capture is not None
    capture.start()
    for i, (img, output) in enumerate(zip(split.images, outputs, strict=True)):
        item = Pending(f"traffic-{i}", "experiment", int(time.time() * 1000),
                       img.path.read_bytes(), output, taxonomy, ())  # fmt: skip
        if not capture.offer(item):
            raise RuntimeError("capture dropped a record: raise max_queued_records")
    capture.close()


def label_from_truth(
    tasks: Path, labelled: Path, truth: evaluate.LabelledSplit, taxonomy: Taxonomy
) -> int:
    """The labeller: each selected box gets the ground truth of the garment it matches at
    IoU >= 0.5 (category path, tags, product); returns how many were labelled."""
    by_hash = {hashlib.sha256(img.path.read_bytes()).hexdigest(): img for img in truth.images}
    labels = read_labels(tasks, taxonomy)
    done = 0
    for box in labels.boxes:
        name = Path(labels.images[box.image].file_name).stem
        img = by_hash[name]
        if not img.annotations:
            continue
        overlaps = metrics.box_iou(np.array([box.box], np.float64), img.boxes)[0]
        best = int(np.argmax(overlaps))
        if overlaps[best] < evaluate.MATCH_IOU:
            continue
        ann = img.annotations[best]
        box.category_path = list(ann["category_path"])
        box.tags = dict(ann.get("tags", {}))
        box.product_id = int(ann["product_id"])
        done += 1
    write_labels(labelled, labels, taxonomy)
    return done


def score(
    tagger: nn.Module,
    outputs: Sequence[ImageOutput],
    crops: Sequence[np.ndarray],
    split: evaluate.LabelledSplit,
    taxonomy: Taxonomy,
) -> dict[str, Any]:
    """``tagger`` on the crops the served detector made of ``split``, scored as
    ``fashionserve evaluate`` scores the ensemble."""
    answers = []
    for output, c in zip(outputs, crops, strict=True):
        logits = run_crops(tagger.eval(), c) if len(c) else np.zeros((0, 0))
        answers.append(
            [
                Garment(g.box, g.score, g.detector_class, logits[i], g.embedding)
                for i, g in enumerate(output.garments)
            ]
        )
    return evaluate.score_scenes(split, answers, taxonomy)


def run_experiment(
    checkpoints: Path,
    workdir: Path,
    budget: int,
    seed: int = 0,
    steps: int = 300,
    trend: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the loop for each strategy; print and return the table's rows."""
    start = time.monotonic()
    taxonomy = load_taxonomy()
    workdir = Path(workdir)
    loaded = {kind: load_checkpoint(Path(checkpoints) / f"{kind}.pt") for kind in MODEL_KINDS}
    trained_on = loaded["tagger"].training["data"]["fingerprint"]
    data = {
        "replay": (
            int(trained_on["images"]),
            int(trained_on["seed"]),
            None,
            trained_on.get("trend"),
        ),
        "traffic": (TRAFFIC_PER_LABEL * budget, 101 + seed, ("train",), trend),
        "eval": (EVAL_PLAN_IMAGES, 202 + seed, ("val", "test"), trend),
    }
    for name, (images, data_seed, splits, data_trend) in data.items():
        # Rendered once per workdir and parameters: a rerun with another budget re-renders.
        done = workdir / name / "_done"
        made = f"{images} images, seed {data_seed}, {splits}, trend {data_trend}"
        if not done.exists() or done.read_text() != made:
            synthesize(workdir / name, images, data_seed, taxonomy, splits=splits,
                       progress=False, trend=data_trend)  # fmt: skip
            done.write_text(made)
    echo(f"data rendered ({time.monotonic() - start:.0f} s)")

    served: dict[str, nn.Module] = {k: c.build_model().eval() for k, c in loaded.items()}
    traffic = evaluate.load_labels(workdir / "traffic", "train")
    traffic_out, _ = served_outputs(served, traffic)
    capture_traffic(traffic_out, traffic, taxonomy, workdir / "capture")
    report = workdir / "report"
    recall_split = evaluate.load_labels(workdir / "replay", "val")
    recall_out, _ = served_outputs(served, recall_split)
    floor = RepositorySettings().min_score
    meta = {"data": str(workdir / "replay"), "split": "val", "through": "the PyTorch served path",
            "thresholds": {"source": "taxonomy"}, "detector_floor": floor}  # fmt: skip
    evaluate.write_report(
        report, recall_split, [o.garments for o in recall_out], taxonomy, meta, floor
    )
    echo(f"traffic served and captured, recall report written ({time.monotonic() - start:.0f} s)")

    eval_splits = [evaluate.load_labels(workdir / "eval", s) for s in ("val", "test")]
    held_out = evaluate.LabelledSplit(
        "val+test", eval_splits[0].info, [i for s in eval_splits for i in s.images]
    )
    eval_out, eval_crops = served_outputs(served, held_out)
    budget_fraction = steps / SCHEDULES["tagger"].steps

    rows = [
        {
            "run": "served checkpoints (no fine-tune)",
            "labelled": 0,
            **score(served["tagger"], eval_out, eval_crops, held_out, taxonomy),
        }
    ]
    arms: list[tuple[str, Path | None, int]] = [("fine-tune, no new labels", None, 0)]
    for strategy in STRATEGIES:
        tasks = workdir / strategy / "tasks.json"
        run_select(workdir / "capture", budget, strategy, tasks, "coco", taxonomy, seed=seed,
                   recall_report=report / "report.json")  # fmt: skip
        done = workdir / strategy / "labelled.json"
        arms.append((strategy, done, label_from_truth(tasks, done, traffic, taxonomy)))
    for name, labelled, count in arms:
        out = workdir / "runs" / name.split(",")[0].replace(" ", "-")
        torch.manual_seed(seed)
        train_all(
            workdir / "replay", out, seed=seed, models=["tagger"], budget=budget_fraction,
            init=Path(checkpoints), extra_labels=labelled,
        )  # fmt: skip
        tagger = load_checkpoint(out / "tagger.pt").build_model()
        rows.append(
            {
                "run": name,
                "labelled": count,
                **score(tagger, eval_out, eval_crops, held_out, taxonomy),
            }
        )
        echo(f"{name}: done ({time.monotonic() - start:.0f} s)")
    table = format_table(rows, budget, steps, seed, trend, held_out)
    echo(table)
    (workdir / "result.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    (workdir / "result.md").write_text(table + "\n")
    return rows


def format_table(
    rows: Sequence[dict[str, Any]],
    budget: int,
    steps: int,
    seed: int,
    trend: str | None,
    split: evaluate.LabelledSplit,
) -> str:
    """The README table."""
    lines = [
        f"budget {budget} garments per strategy, seed {seed}, tagger fine-tuned {steps} steps, "
        f"trend {trend or 'none'}; held-out new products: {len(split.images)} scenes, "
        f"{sum(len(i.annotations) for i in split.images)} garments",
        "",
        "| run | garments labelled | category accuracy | exclusive-tag accuracy |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['labelled']} | {r['category_accuracy']:.3f} | "
            f"{r['tag_accuracy']:.3f} |"
        )
    return "\n".join(lines)
