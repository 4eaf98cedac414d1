"""The committed demo checkpoints are reproducible: the renderer still makes the data they
were trained on.

Every checkpoint records the fingerprint of its training data (the data set's plan and a
sample of its scenes, :mod:`fashionserve.data.fingerprint`). Re-rendering that sample
takes a second; when it no longer matches, the renderer changed under the checkpoints and
they must be retrained (README, "Quality and training time"), or the quality they are
said to have is a figure nobody can reproduce.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fashionserve.checkpoint import load_checkpoint
from fashionserve.data.fingerprint import rendered_fingerprint
from fashionserve.ensemble import MODEL_KINDS
from fashionserve.taxonomy import load_taxonomy

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.fixture(scope="module")
def trained_on() -> dict[str, dict]:
    return {
        kind: load_checkpoint(CHECKPOINTS / f"{kind}.pt").training["data"]["fingerprint"]
        for kind in MODEL_KINDS
    }


def test_the_three_models_were_trained_on_one_data_set(trained_on: dict[str, dict]) -> None:
    assert len({repr(sorted(f.items())) for f in trained_on.values()}) == 1, trained_on


def test_the_renderer_still_makes_the_data_the_checkpoints_were_trained_on(
    trained_on: dict[str, dict],
) -> None:
    recorded = trained_on["tagger"]
    now = rendered_fingerprint(
        recorded["images"], recorded["seed"], load_taxonomy(), recorded.get("trend")
    )
    assert now["plan_sha256"] == recorded["plan_sha256"], (
        "the catalog or the scene plan changed: the committed checkpoints were trained on "
        "another data set; retrain them"
    )
    assert now == recorded, (
        "the renderer no longer draws the scenes the committed checkpoints were trained on; "
        "retrain them"
    )
