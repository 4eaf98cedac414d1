"""Active selection from capture files: deterministic for a seed, each strategy picking
what it promises, task files a labelling tool and ``train --extra-labels`` read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fashionserve.active.select import (
    HYBRID_SHORTLIST,
    STRATEGIES,
    read_candidates,
    run_select,
    select,
)
from fashionserve.cli.active import STRATEGIES as CLI_STRATEGIES
from fashionserve.ensemble import Garment
from fashionserve.gateway.capture import Capture, Pending
from fashionserve.gateway.results import ImageOutput
from fashionserve.gateway.settings import CaptureSettings
from fashionserve.gateway.telemetry import Metrics
from fashionserve.taxonomy import load_taxonomy
from fashionserve.train.labels import read_labels

TAXONOMY = load_taxonomy()


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 captured images of 2 garments, logits and embeddings drawn at random."""
    out = tmp_path_factory.mktemp("capture")
    rng = np.random.default_rng(7)
    settings = CaptureSettings(directory=str(out), include_images=True, max_file_bytes=20_000)
    capture = Capture.from_settings(settings, Metrics().capture_records)
    assert capture is not None
    capture.start()
    for i in range(40):
        garments = []
        for j in range(2):
            emb = rng.normal(size=16).astype(np.float32)
            garments.append(
                Garment(
                    (10.0 + j, 10.0, 60.0, 90.0),
                    0.9,
                    0,
                    (rng.normal(size=TAXONOMY.num_logits) * rng.uniform(0.2, 6)).astype(np.float32),
                    emb / np.linalg.norm(emb),
                )
            )
        image = b"\xff\xd8 image %d" % i
        capture.offer(
            Pending(f"r{i}", "shop", 0, image, ImageOutput(100, 100, garments), TAXONOMY, ())
        )
    capture.close()
    assert len(list(out.glob("capture-*.parquet"))) > 1  # rotated by size
    return out


def test_the_cli_offers_every_strategy() -> None:
    assert tuple(CLI_STRATEGIES) == STRATEGIES


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_selection_is_the_same_for_the_same_seed(capture_dir: Path, strategy: str) -> None:
    candidates = read_candidates(capture_dir)
    assert len(candidates) == 80
    first = [c.key for c in select(candidates, 10, strategy, seed=3)]  # type: ignore[arg-type]
    shuffled = list(reversed(candidates))  # the order files were read in does not matter
    again = [c.key for c in select(shuffled, 10, strategy, seed=3)]  # type: ignore[arg-type]
    assert first == again and len(set(first)) == 10
    if strategy in ("random", "kcenter"):
        other = [c.key for c in select(candidates, 10, strategy, seed=4)]  # type: ignore[arg-type]
        assert other != first


def test_uncertainty_strategies_pick_the_least_sure(capture_dir: Path) -> None:
    candidates = read_candidates(capture_dir)
    by_margin = select(candidates, 5, "margin")
    assert max(c.margin for c in by_margin) <= min(
        c.margin for c in candidates if c not in by_margin
    )
    by_entropy = select(candidates, 5, "entropy")
    assert min(c.entropy for c in by_entropy) >= max(
        c.entropy for c in candidates if c not in by_entropy
    )


def test_hybrid_picks_diverse_garments_among_the_least_sure(capture_dir: Path) -> None:
    candidates = read_candidates(capture_dir)
    weight = {c.key: (1.0 - c.margin + 1e-3) * c.detector_score for c in candidates}
    picked = select(candidates, 5, "hybrid")
    shortlist = sorted(weight.values(), reverse=True)[: HYBRID_SHORTLIST * 5]
    assert all(weight[c.key] >= shortlist[-1] for c in picked)
    assert weight[picked[0].key] == shortlist[0]  # the least sure garment first
    # k-center, not the top 5 by weight: the picks spread over the shortlist.
    assert sorted(weight[c.key] for c in picked) != sorted(shortlist[:5])


def test_hybrid_favours_classes_of_low_recall(capture_dir: Path, tmp_path: Path) -> None:
    candidates = read_candidates(capture_dir)
    weak = max(TAXONOMY.leaves, key=lambda leaf: sum(c.category == leaf for c in candidates))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"classes": [
        {"kind": "category", "name": "/".join(TAXONOMY.path(leaf)), "recall": 0.2 if leaf == weak else 0.99}
        for leaf in TAXONOMY.leaves
    ]}))  # fmt: skip
    out = tmp_path / "tasks.json"
    weighted = run_select(capture_dir, 10, "hybrid", out, "coco", TAXONOMY, recall_report=report)
    plain = select(candidates, 10, "hybrid")
    assert sum(c.category == weak for c in weighted) > sum(c.category == weak for c in plain)


def test_coco_tasks_reference_the_kept_images_and_await_labels(
    capture_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tasks" / "coco.json"
    chosen = run_select(capture_dir, 6, "kcenter", out, "coco", TAXONOMY)
    labels = read_labels(out, TAXONOMY)
    assert len(labels.boxes) == 6 and labels.labelled() == []  # the labeller's part
    for box, c in zip(labels.boxes, chosen, strict=True):
        image = out.parent / labels.images[box.image].file_name
        assert image.read_bytes() == c.image_bytes
        assert box.box == pytest.approx(c.box)
        assert box.prediction["category_path"][-1] == c.category


def test_label_studio_tasks_carry_the_box_as_a_prediction(
    capture_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ls.json"
    run_select(capture_dir, 3, "margin", out, "label-studio", TAXONOMY)
    tasks = json.loads(out.read_text())
    assert len(tasks) == 3
    value = tasks[0]["predictions"][0]["result"][0]["value"]
    assert (tasks[0]["data"]["image"]).startswith("images/")
    assert 49.0 <= value["width"] <= 50.0 and value["height"] == pytest.approx(80.0)
