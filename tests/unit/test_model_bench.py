"""The model benchmark times every committed model and combines them (at tiny batches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fashionserve.ensemble import MODEL_KINDS
from fashionserve.loadtest import model_bench

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def test_every_model_is_timed_and_the_image_ceiling_is_below_each_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(model_bench, "BATCH_SIZES", (1, 2))
    rows = model_bench.run(CHECKPOINTS, torch.device("cpu"), seconds=0.0)
    assert [(r.model, r.batch) for r in rows] == [(k, b) for k in MODEL_KINDS for b in (1, 2)]
    assert all(r.items_per_s > 0 and r.ms_per_batch > 0 for r in rows)
    assert [r.speedup for r in rows if r.batch == 1] == [1.0] * len(MODEL_KINDS)
    ceiling = model_bench.image_ceiling(rows, "fp32", 2, garments=2.0)
    assert 0 < ceiling < min(r.items_per_s for r in rows if r.batch == 2)
    table = model_bench.markdown(rows, "CPU", 2.0)
    assert "| detector | fp32 | 2 |" in table and "images/s" in table
