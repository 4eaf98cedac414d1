"""``fashionserve train --init CHECKPOINTS --extra-labels LABELLED``: fine-tuning from a
checkpoint set with garments a labeller completed (here: another seed's ground truth),
through the command line. The models not trained are copied unchanged; the tagger learns
from the labels and its checkpoint says which; a file that labels nothing, or whose image
is missing, is refused naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fashionserve.checkpoint import file_sha256, load_checkpoint
from fashionserve.cli import main
from fashionserve.data.writer import synthesize
from fashionserve.ensemble import MODEL_KINDS
from fashionserve.taxonomy import load_taxonomy
from fashionserve.train import train_all
from fashionserve.train.data import load_split
from fashionserve.train.labels import LabelBox, LabelImage, LabelsError, LabelsFile, write_labels

BUDGET = 0.002  # a smoke schedule: the tagger's 2 steps (of 1000)
LABELLED = 6  # garments the "labeller" completed


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synthesize(out, images=24, seed=0, taxonomy=load_taxonomy(), progress=False)
    return out


@pytest.fixture(scope="module")
def init(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint set fine-tuning starts from: all three models after a step or two."""
    out = tmp_path_factory.mktemp("init")
    train_all(data, out, seed=0, models=list(MODEL_KINDS), budget=0.001)
    return out


def labels_file(folder: Path, labelled: int, *, unlabelled: int = 1) -> Path:
    """A labels file of garments from another seed's scenes, their images beside it: the
    first ``labelled`` garments with their true category path and tags (ground truth as
    the labeller), then ``unlabelled`` more left empty, as selection writes them."""
    other = folder / "other"
    synthesize(other, images=8, seed=1, taxonomy=load_taxonomy(), splits=["val"], progress=False)
    split = load_split(other, "val")
    chosen = split.garments[: labelled + unlabelled]
    used = sorted({g.image for g in chosen})
    images = []
    for image in used:
        name = f"images/{image}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(split.encoded[image])
        height, width = split.images[image].shape[:2]
        images.append(LabelImage(name, width, height))
    boxes = [
        LabelBox(
            used.index(g.image),
            g.box,
            list(g.path) if n < labelled else [],
            dict(g.tags) if n < labelled else {},
            prediction={"category_path": list(g.path)},  # what the model guessed
        )
        for n, g in enumerate(chosen)
    ]
    path = folder / "labelled.json"
    write_labels(path, LabelsFile(images, boxes, {"source": "test"}), load_taxonomy())
    return path


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def test_fine_tune_the_tagger_with_extra_labels_from_the_command_line(
    data: Path, init: Path, tmp_path: Path
) -> None:
    labels = labels_file(tmp_path / "labels", LABELLED)
    out = tmp_path / "tuned"
    argv = ["train", "--data", str(data), "--out", str(out), "--models", "tagger",
            "--budget", str(BUDGET), "--init", str(init), "--extra-labels", str(labels)]  # fmt: skip
    assert main(argv) == 0

    # The models not trained are the init's, byte for byte: out is a whole set to export.
    for kind in ("detector", "embedder"):
        assert (out / f"{kind}.pt").read_bytes() == (init / f"{kind}.pt").read_bytes()
    tuned, start = state(out / "tagger.pt"), state(init / "tagger.pt")
    assert tuned.keys() == start.keys()
    assert any(not torch.equal(tuned[k], start[k]) for k in tuned), "the tagger did not learn"

    recorded = load_checkpoint(out / "tagger.pt").training["data"]
    assert recorded["init"]["tagger"] == file_sha256(init / "tagger.pt")
    extra = recorded["extra_labels"]
    assert extra["path"] == str(labels)
    assert extra["garments"] == LABELLED  # the unlabelled garment is not learnt from
    assert extra["with_product"] == 0
    assert extra["info"]["source"] == "test"

    # The labels are learnt from: the same run without them ends elsewhere.
    plain = tmp_path / "plain"
    train_all(data, plain, seed=0, models=["tagger"], budget=BUDGET, init=init)
    without = state(plain / "tagger.pt")
    assert any(not torch.equal(tuned[k], without[k]) for k in tuned)
    assert "extra_labels" not in load_checkpoint(plain / "tagger.pt").training["data"]


def test_a_file_that_labels_nothing_is_refused_naming_it(
    data: Path, init: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = labels_file(tmp_path / "labels", 0, unlabelled=3)
    out = tmp_path / "tuned"
    with pytest.raises(LabelsError, match="no labelled garment") as refused:
        train_all(data, out, seed=0, models=["tagger"], budget=BUDGET, init=init,
                  extra_labels=labels)  # fmt: skip
    assert str(labels) in str(refused.value)
    assert not (out / "tagger.pt").exists()

    argv = ["train", "--data", str(data), "--out", str(out), "--models", "tagger",
            "--budget", str(BUDGET), "--init", str(init), "--extra-labels", str(labels)]  # fmt: skip
    assert main(argv) != 0
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(labels) in error and "no labelled garment" in error


def test_a_missing_image_is_refused_naming_it(data: Path, init: Path, tmp_path: Path) -> None:
    labels = labels_file(tmp_path / "labels", 2)
    missing = sorted((labels.parent / "images").iterdir())[0]
    missing.unlink()
    with pytest.raises(LabelsError) as refused:
        train_all(data, tmp_path / "tuned", seed=0, models=["tagger"], budget=BUDGET, init=init,
                  extra_labels=labels)  # fmt: skip
    assert str(labels) in str(refused.value) and f"images/{missing.name}" in str(refused.value)
