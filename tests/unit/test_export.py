"""Export: checkpoint -> ONNX -> parity on real images -> atomic, numbered model versions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fashionserve.models
from fashionserve.checkpoint import Checkpoint, file_sha256, save_checkpoint
from fashionserve.export.exporter import ParityError, export_checkpoint
from fashionserve.export.parity import detections
from fashionserve.model_repository.python_models import ORT_RUNNER
from fashionserve.models import DEFAULT_ARCH, build_model
from fashionserve.repository import FORMAT_VERSION, MANIFEST_FORMAT, read_manifest
from fashionserve.taxonomy import Taxonomy, load_taxonomy

# Small versions of the real architectures (random init): parity does not need training,
# and these export and run in well under a second.
BACKBONE = {"stem": 8, "widths": [8, 16, 16, 32], "depth": 1}
SMALL: dict[str, tuple[int, dict[str, Any]]] = {
    "detector": (64, {**BACKBONE, "input_size": 64, "neck": 16, "max_detections": 16}),
    "tagger": (48, {**BACKBONE, "input_size": 48}),
    "embedder": (48, {**BACKBONE, "input_size": 48, "dim": 32}),
}


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> Path:
    """A few rendered garment images, shared by the tests that pass ``data=``."""
    from fashionserve.data.writer import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, images=8, seed=5, taxonomy=taxonomy)
    return out


def make_checkpoint(kind: str, path: Path, taxonomy: Taxonomy, seed: int = 0) -> Path:
    size, params = SMALL[kind]
    torch.manual_seed(seed)
    model = build_model(kind, DEFAULT_ARCH[kind], params, taxonomy)
    ckpt = Checkpoint(
        kind=kind,  # type: ignore[arg-type]
        arch=DEFAULT_ARCH[kind],
        arch_params=params,
        input_size=(size, size),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        state_dict=model.state_dict(),
        taxonomy=taxonomy,
        training={"epochs": 0, "note": "unit test"},
    )
    return save_checkpoint(ckpt, path)


def entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def test_publishes_numbered_versions_with_a_manifest_that_matches(
    tmp_path: Path, taxonomy: Taxonomy, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = make_checkpoint("tagger", tmp_path / "tagger.pt", taxonomy)
    repo = tmp_path / "repo"

    # No data directory: parity renders its own fixed-seed garment images.
    first = export_checkpoint(ckpt, repo)
    second = export_checkpoint(ckpt, repo)

    assert first == repo / "tagger" / "1"
    assert second == repo / "tagger" / "2"
    assert entries(repo / "tagger") == ["1", "2"]  # no staging dir left behind
    table = capsys.readouterr().out
    assert "logits" in table and "max_abs" in table and "pass" in table

    manifest = json.loads((second / "manifest.json").read_text())
    assert sorted(p.name for p in second.iterdir()) == ["manifest.json", "model.onnx", "model.py"]
    assert (manifest["format"], manifest["format_version"]) == (MANIFEST_FORMAT, FORMAT_VERSION)
    assert manifest["model"] == {
        "name": "tagger",
        "kind": "tagger",
        "version": 2,
        "arch": DEFAULT_ARCH["tagger"],
        "arch_params": SMALL["tagger"][1],
    }
    for name, artifact in manifest["artifacts"].items():
        assert artifact["sha256"] == file_sha256(second / name)
    assert (second / "model.py").read_bytes() == ORT_RUNNER.read_bytes()
    assert manifest["source_checkpoint"]["sha256"] == file_sha256(ckpt)
    # The gateway checks the served taxonomy by hash: the document shipped must hash to it.
    assert manifest["taxonomy"]["hash"] == taxonomy.hash
    assert Taxonomy.from_dict(manifest["taxonomy"]["document"]).hash == taxonomy.hash
    assert manifest["onnx"]["opset"] == 17
    assert manifest["onnx"]["inputs"] == [
        {"name": "crops", "shape": ["batch", 3, 48, 48], "dtype": "float32"}
    ]
    assert manifest["onnx"]["outputs"] == [
        {"name": "logits", "shape": ["batch", taxonomy.num_logits], "dtype": "float32"}
    ]
    parity = manifest["parity"]
    assert parity["passed"] and parity["batch_sizes"] == [1, 8]
    assert parity["outputs"]["logits"]["value"] <= parity["outputs"]["logits"]["tolerance"]
    assert manifest["input"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["training"]["note"] == "unit test"
    assert manifest["created"].endswith("Z")
    # The typed reader reads back what the exporter wrote.
    typed = read_manifest(second)
    assert typed is not None and typed.model is not None and typed.taxonomy is not None
    assert (typed.model.name, typed.model.version, typed.parity_passed) == ("tagger", 2, True)
    assert typed.taxonomy.document is not None
    assert typed.taxonomy.document.hash == taxonomy.hash
    assert typed.to_dict() == manifest


@pytest.mark.parametrize("kind", ["detector", "tagger", "embedder"])
def test_onnx_has_a_dynamic_batch_and_runs_at_batch_1_and_3(
    kind: str, tmp_path: Path, taxonomy: Taxonomy, data: Path
) -> None:
    ckpt = make_checkpoint(kind, tmp_path / f"{kind}.pt", taxonomy)
    version = export_checkpoint(ckpt, tmp_path / "repo", model_name=f"my-{kind}", data=data)
    assert version == tmp_path / "repo" / f"my-{kind}" / "1"

    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str)  # symbolic batch dimension
    size = SMALL[kind][0]
    for batch in (1, 3):
        x = np.random.default_rng(batch).uniform(0, 255, (batch, 3, size, size))
        outputs = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {inp.name: x.astype(np.float32)}),
                strict=True,
            )
        )
        if kind == "detector":
            assert outputs["boxes"].shape == (batch, 16, 4)
            assert outputs["scores"].shape == (batch, 16)
            assert outputs["classes"].shape == (batch, 16)
            assert outputs["classes"].dtype == np.int32
            assert np.all(np.diff(outputs["scores"], axis=1) <= 0)  # sorted, descending
        elif kind == "tagger":
            assert outputs["logits"].shape == (batch, taxonomy.num_logits)
        else:
            assert outputs["embedding"].shape == (batch, 32)
            np.testing.assert_allclose(np.linalg.norm(outputs["embedding"], axis=1), 1, atol=1e-5)

    manifest = json.loads((version / "manifest.json").read_text())
    if kind == "detector":
        assert manifest["taxonomy"]["classes"] == list(taxonomy.roots)
        assert set(manifest["parity"]["outputs"]) == {"boxes", "scores", "classes"}
        assert {"TopK", "MaxPool"} <= set(manifest["onnx"]["op_types"])
        assert "NonMaxSuppression" not in manifest["onnx"]["op_types"]


def _sabotage(monkeypatch: pytest.MonkeyPatch, output_index: int, offset: float) -> None:
    """Make the exported graph differ from eager PyTorch: add ``offset`` to one output,
    only while ``torch.onnx.export`` traces the model."""
    real_build = fashionserve.models.build_model

    def build(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = real_build(*args, **kwargs)

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
            if not torch.onnx.is_in_onnx_export():
                return None
            if isinstance(output, torch.Tensor):
                return output + offset
            outs = list(output)
            outs[output_index] = outs[output_index] + offset
            return tuple(outs)

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(fashionserve.models, "build_model", build)


@pytest.mark.parametrize(
    ("kind", "output_index", "offset", "named"),
    [("tagger", 0, 0.01, "logits"), ("detector", 0, 0.5, "boxes")],
)
def test_divergent_onnx_fails_parity_and_publishes_nothing(
    kind: str,
    output_index: int,
    offset: float,
    named: str,
    tmp_path: Path,
    taxonomy: Taxonomy,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = make_checkpoint(kind, tmp_path / f"{kind}.pt", taxonomy)
    repo = tmp_path / "repo"
    export_checkpoint(ckpt, repo, data=data, echo=None)  # a good version 1 exists

    _sabotage(monkeypatch, output_index, offset)
    with pytest.raises(ParityError) as info:
        export_checkpoint(ckpt, repo, data=data, echo=None)

    message = str(info.value)
    assert named in message
    # The reported difference is the injected offset (float32 rounding aside).
    value = next(r.value for r in info.value.rows if r.output == named)
    assert value == pytest.approx(offset, rel=1e-3)
    assert f"{value:.3g}" in message
    assert entries(repo / kind) == ["1"]  # no new version, no staging directory


def test_a_new_model_that_fails_parity_leaves_the_repository_untouched(
    tmp_path: Path, taxonomy: Taxonomy, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_checkpoint("embedder", tmp_path / "embedder.pt", taxonomy)
    _sabotage(monkeypatch, 0, 0.5)
    with pytest.raises(ParityError, match="embedding: min_cosine"):
        export_checkpoint(ckpt, tmp_path / "repo", data=data, echo=None)
    assert not (tmp_path / "repo" / "embedder").exists()


def _detections(rows: list[tuple[float, int, float]]) -> dict[str, np.ndarray]:
    """One image's detections from (score, class, x) rows."""
    return {
        "scores": np.array([[s for s, _, _ in rows]], dtype=np.float32),
        "classes": np.array([[c for _, c, _ in rows]], dtype=np.int32),
        "boxes": np.array([[[x, 10, x + 20, 40] for _, _, x in rows]], dtype=np.float32),
    }


def test_detector_parity_tolerates_topk_tie_order_but_not_wrong_boxes() -> None:
    compare = detections(box_tolerance=0.05, score_tolerance=1e-3)

    def figures(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[Any, Any]:
        return {(m.output, m.metric): m for m in compare(ref, cand)}

    ref = _detections([(0.9, 0, 10), (0.5, 1, 50), (0.5, 2, 90), (0.2, 0, 130), (0.1, 1, 170)])
    # Equal scores (a saturated sigmoid, say) may come out of TopK in either order.
    swapped_tie = _detections(
        [(0.9, 0, 10), (0.5, 2, 90), (0.5, 1, 50), (0.2, 0, 130), (0.1, 1, 170)]
    )
    result = figures(ref, swapped_tie)
    assert all(m.passed for m in result.values())
    assert result[("detections", "in_tie_groups")].value == 2

    # Scores 1e-4 apart with no measured noise: the order is meaningful, a swap is real.
    ref_apart = _detections(
        [(0.9, 0, 10), (0.5001, 1, 50), (0.5, 2, 90), (0.2, 0, 130), (0.1, 1, 170)]
    )
    swapped_apart = _detections(
        [(0.9, 0, 10), (0.5001, 2, 90), (0.5, 1, 50), (0.2, 0, 130), (0.1, 1, 170)]
    )
    result = figures(ref_apart, swapped_apart)
    assert not result[("boxes", "max_abs_px")].passed
    assert not result[("classes", "mismatches")].passed

    moved = _detections([(0.9, 0, 10.2), (0.5, 1, 50), (0.5, 2, 90), (0.2, 0, 130), (0.1, 1, 170)])
    result = figures(ref, moved)
    assert result[("boxes", "max_abs_px")].value == pytest.approx(0.2, abs=1e-4)
    assert not result[("boxes", "max_abs_px")].passed

    # The last detection ties one just outside the other runtime's top K: excused.
    other_at_cut = _detections(
        [(0.9, 0, 10), (0.5, 1, 50), (0.5, 2, 90), (0.2, 0, 130), (0.1, 2, 210)]
    )
    result = figures(ref, other_at_cut)
    assert all(m.passed for m in result.values())
    assert result[("detections", "excused_at_cut")].value == 1
