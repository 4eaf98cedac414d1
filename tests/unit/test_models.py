"""The reference networks honour the model contract (shapes, dtypes, ONNX parity)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fashionserve.models import DEFAULT_ARCH, build_model
from fashionserve.models.detector import CenterNetDetector, encode_targets
from fashionserve.models.tagger import tagger_loss
from fashionserve.taxonomy import Taxonomy, load_taxonomy

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def _model(kind: str, taxonomy: Taxonomy, **params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(kind, DEFAULT_ARCH[kind], dict(params), taxonomy).eval()


def test_detector_outputs_fixed_k_sorted_boxes(taxonomy: Taxonomy) -> None:
    model = _model("detector", taxonomy, max_detections=16)
    with torch.no_grad():
        boxes, scores, classes = model(torch.rand(2, 3, 256, 256) * 255)
    assert boxes.shape == (2, 16, 4) and boxes.dtype == torch.float32
    assert scores.shape == (2, 16) and scores.dtype == torch.float32
    assert classes.shape == (2, 16) and classes.dtype == torch.int32
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert int(classes.min()) >= 0 and int(classes.max()) < len(taxonomy.roots)
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 256


def test_crop_models_output_contract_shapes(taxonomy: Taxonomy) -> None:
    crops = torch.rand(3, 3, 96, 96) * 255
    with torch.no_grad():
        logits = _model("tagger", taxonomy)(crops)
        embedding = _model("embedder", taxonomy)(crops)
    assert logits.shape == (3, taxonomy.num_logits) and logits.dtype == torch.float32
    assert embedding.shape == (3, 128) and embedding.dtype == torch.float32
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)


def test_unknown_architecture_is_refused(taxonomy: Taxonomy) -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("detector", "yolo-huge", {}, taxonomy)


def test_tagger_for_another_layout_is_refused(taxonomy: Taxonomy) -> None:
    with pytest.raises(ValueError, match="logits"):
        build_model("tagger", DEFAULT_ARCH["tagger"], {"num_logits": 7}, taxonomy)


def test_decode_places_a_box_from_a_handmade_heatmap() -> None:
    model = CenterNetDetector(num_classes=3, input_size=256, max_detections=4).eval()
    side = model.output_size
    heat = torch.full((1, 3, side, side), -10.0)
    heat[0, 1, 20, 30] = 5.0
    heat[0, 1, 20, 31] = 4.0  # a shoulder of the same peak: max-pooling must drop it
    heat[0, 2, 50, 10] = 2.0
    size = torch.zeros(1, 2, side, side)
    size[0, :, 20, 30] = torch.tensor([math.log(40 / 4), math.log(80 / 4)])
    offset = torch.zeros(1, 2, side, side)
    offset[0, :, 20, 30] = torch.tensor([0.5, 0.25])
    boxes, scores, classes = model.decode(heat, size, offset)
    cx, cy = (30 + 0.5) * 4, (20 + 0.25) * 4
    assert torch.allclose(boxes[0, 0], torch.tensor([cx - 20, cy - 40, cx + 20, cy + 40]))
    assert scores[0, 0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())
    assert classes[0].tolist()[:2] == [1, 2]  # the shoulder at (20, 31) is not a detection
    assert scores[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_training_targets_round_trip_through_decode() -> None:
    """Targets encoded for a box decode back to that box (no coordinate drift)."""
    model = CenterNetDetector(num_classes=3, input_size=256, max_detections=2).eval()
    box = np.array([[37.0, 50.0, 121.0, 210.0]], np.float32)
    t = encode_targets(box, np.array([2]), 3, model.output_size, 4)
    heat = torch.from_numpy(t["heat"]).unsqueeze(0) * 20 - 10
    size = torch.zeros(1, 2, 64, 64)
    offset = torch.zeros(1, 2, 64, 64)
    y, x = divmod(int(t["index"][0]), 64)
    size[0, :, y, x] = torch.from_numpy(t["size"][0])
    offset[0, :, y, x] = torch.from_numpy(t["offset"][0])
    boxes, _, classes = model.decode(heat, size, offset)
    assert torch.allclose(boxes[0, 0], torch.from_numpy(box[0]), atol=1e-3)
    assert int(classes[0, 0]) == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_detector_onnx_export_matches_pytorch(tmp_path: Path, taxonomy: Taxonomy) -> None:
    model = _model("detector", taxonomy)
    assert isinstance(model, CenterNetDetector)
    # Spread the random heatmap so the top-K order is not decided by rounding.
    torch.nn.init.normal_(model.heat.weight, std=0.5)
    path = tmp_path / "detector.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 256, 256),),
        str(path),
        input_names=["images"],
        output_names=["boxes", "scores", "classes"],
        dynamic_axes={n: {0: "batch"} for n in ("images", "boxes", "scores", "classes")},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert not ops & {"NonMaxSuppression", "NonZero", "Loop", "If"}, ops
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.uniform(0, 255, (batch, 3, 256, 256)).astype(np.float32)
        boxes, scores, classes = session.run(None, {"images": x})
        with torch.no_grad():
            t_boxes, t_scores, t_classes = model(torch.from_numpy(x))
        assert classes.dtype == np.int32 and boxes.shape == (batch, 16, 4)
        np.testing.assert_allclose(scores, t_scores.numpy(), atol=1e-4)
        np.testing.assert_allclose(boxes, t_boxes.numpy(), atol=1e-2)
        np.testing.assert_array_equal(classes, t_classes.numpy())


def test_tagger_loss_ignores_groups_that_do_not_apply(taxonomy: Taxonomy) -> None:
    sleeve = next(s for s in taxonomy.layout if s.owner == "sleeve")
    trousers = taxonomy.encode_targets(
        ["bottom", "trousers"], {"colour": "red", "pattern": "plain", "details": []}
    )
    shirt = taxonomy.encode_targets(
        ["top", "shirt"], {"colour": "red", "pattern": "plain", "sleeve": "long", "details": []}
    )
    logits = torch.zeros(1, taxonomy.num_logits)
    moved = logits.clone()
    moved[0, sleeve.start] = 8.0  # strongly "sleeveless"

    def loss(z: torch.Tensor, enc: tuple[np.ndarray, np.ndarray]) -> float:
        target, mask = (torch.from_numpy(a).unsqueeze(0) for a in enc)
        return float(tagger_loss(z, target, mask, taxonomy))

    assert loss(moved, trousers) == pytest.approx(loss(logits, trousers))
    assert loss(moved, shirt) > loss(logits, shirt) + 1.0
