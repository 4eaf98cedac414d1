"""Training: a smoke run writes loadable checkpoints; the data pipeline keeps labels true."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fashionserve.checkpoint import load_checkpoint
from fashionserve.data.writer import synthesize
from fashionserve.ensemble import MODEL_KINDS
from fashionserve.taxonomy import load_taxonomy
from fashionserve.train import train_all
from fashionserve.train.data import DetectorData, Garment, Split
from fashionserve.train.loops import pk_batches


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synthesize(out, images=24, seed=0, taxonomy=load_taxonomy())
    return out


def test_smoke_training_writes_three_loadable_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    summary = train_all(tiny_data, tmp_path / "ckpt", seed=0, models=list(MODEL_KINDS), budget=0.02)
    taxonomy = load_taxonomy()
    for kind in MODEL_KINDS:
        ckpt = load_checkpoint(tmp_path / "ckpt" / f"{kind}.pt")
        assert ckpt.kind == kind and ckpt.taxonomy.hash == taxonomy.hash
        assert ckpt.training["seed"] == 0 and ckpt.training["steps"] >= 1
        assert "validation" in ckpt.training and ckpt.training["torch_version"]
        model = ckpt.build_model()
        height, width = ckpt.input_size
        with torch.no_grad():
            out = model(torch.full((2, 3, height, width), 128.0))
        if kind == "detector":
            assert out[0].shape == (2, 16, 4) and out[2].dtype == torch.int32
        elif kind == "tagger":
            assert out.shape == (2, taxonomy.num_logits)
        else:
            assert out.shape == (2, 128)
    assert set(summary["models"]) == set(MODEL_KINDS)
    assert summary["pipeline"] is not None and "map50" in summary["pipeline"]


def test_same_seed_gives_the_same_weights(tiny_data: Path, tmp_path: Path) -> None:
    for run in ("a", "b"):
        train_all(tiny_data, tmp_path / run, seed=3, models=["tagger"], budget=0.02)
    a = load_checkpoint(tmp_path / "a" / "tagger.pt").state_dict
    b = load_checkpoint(tmp_path / "b" / "tagger.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pk_batches_hold_p_products_k_times_each() -> None:
    labels = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    batches = pk_batches(labels, p=4, k=3, rng=np.random.default_rng(0))
    for _ in range(5):
        batch = next(batches)
        products, counts = np.unique(labels[batch], return_counts=True)
        assert len(products) == 4 and counts.tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("zoom", [0.0, 1.0])
def test_augmented_detector_samples_keep_boxes_on_their_garment(zoom: float) -> None:
    """A white garment on black: after letterboxing, zooms and flips, each target box
    still frames the white pixels (a wrong transform would teach wrong places)."""
    taxonomy = load_taxonomy()
    image = np.zeros((200, 400, 3), np.uint8)
    image[40:160, 60:140] = 255
    split = Split("train", [image], [Garment(0, (60, 40, 140, 160), ["top", "shirt"], {}, 1)])
    data = DetectorData(split, taxonomy, 256, zoom=zoom)
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(8):
        x, targets = data.batch(np.array([0]), rng, len(taxonomy.roots))
        canvas = x[0].mean(0).numpy()
        ys, xs = np.nonzero(canvas > 200)
        found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        cell = int(targets["index"][0, 0])
        w, h = np.exp(targets["size"][0, 0].numpy()) * 4
        cx = (cell % 64 + float(targets["offset"][0, 0, 0])) * 4
        cy = (cell // 64 + float(targets["offset"][0, 0, 1])) * 4
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        np.testing.assert_allclose(box, found, atol=2.0 if zoom else 1.5)
        flips.add(found[0] > 128)
    if not zoom:
        assert flips == {True, False}
