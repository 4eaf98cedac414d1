"""The model repository builder: configs Triton can parse, for every flavour, from the ONNX I/O."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from fashionserve.ensemble import MODEL_NAME
from fashionserve.model_repository.build import build_repository
from fashionserve.model_repository.python_models import CROP_MODEL, ORT_RUNNER, PREPROCESS_MODEL
from fashionserve.model_repository.settings import FLAVOURS, Flavour, RepositorySettings
from fashionserve.repository import RepositoryError

DET_SIZE, DETECTIONS, CROP_SIZE, LOGITS, EMBEDDING = 64, 8, 32, 30, 16
ALL_MODELS = ("preprocess", "detector", "crop", "tagger", "embedder", MODEL_NAME)


def _pooled(graph_input: str, nodes: list, inits: list, width: int, prefix: str) -> str:
    """Append ``GlobalAveragePool -> Flatten -> MatMul`` (to ``width`` features)."""
    rng = np.random.default_rng(0)
    inits.append(
        numpy_helper.from_array(rng.standard_normal((3, width)).astype(np.float32), f"{prefix}_w")
    )
    nodes += [
        helper.make_node("GlobalAveragePool", [graph_input], [f"{prefix}_gap"]),
        helper.make_node("Flatten", [f"{prefix}_gap"], [f"{prefix}_flat"]),
        helper.make_node("MatMul", [f"{prefix}_flat", f"{prefix}_w"], [f"{prefix}_out"]),
    ]
    return f"{prefix}_out"


def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> None:
    graph = helper.make_graph(nodes, path.parent.parent.name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def write_detector(repo: Path, version: int = 1, size: int = DET_SIZE) -> None:
    nodes: list = []
    inits: list = [numpy_helper.from_array(np.array([-1, DETECTIONS, 4], np.int64), "shape")]
    feats = _pooled("images", nodes, inits, DETECTIONS * 4, "d")
    nodes += [
        helper.make_node("Reshape", [feats, "shape"], ["boxes"]),
        helper.make_node("ReduceMax", ["boxes"], ["scores"], axes=[2], keepdims=0),
        helper.make_node("Cast", ["scores"], ["classes"], to=TensorProto.INT32),
    ]
    _save(
        repo / "detector" / str(version) / "model.onnx",
        nodes,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", DETECTIONS, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", DETECTIONS]),
            helper.make_tensor_value_info("classes", TensorProto.INT32, ["batch", DETECTIONS]),
        ],
        inits,
    )


def write_crop_model(
    repo: Path, name: str, output: str, width: int, version: int = 1, crop: int = CROP_SIZE
) -> None:
    nodes: list = []
    inits: list = []
    feats = _pooled("crops", nodes, inits, width, "c")
    nodes.append(helper.make_node("Identity", [feats], [output]))
    _save(
        repo / name / str(version) / "model.onnx",
        nodes,
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["batch", 3, crop, crop])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", width])],
        inits,
    )


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """A repository as export leaves it: detector, tagger and embedder version 1."""
    repo = tmp_path / "repo"
    write_detector(repo)
    write_crop_model(repo, "tagger", "logits", LOGITS)
    write_crop_model(repo, "embedder", "embedding", EMBEDDING)
    for name in ("detector", "tagger", "embedder"):
        shutil.copyfile(ORT_RUNNER, repo / name / "1" / "model.py")
    return repo


def parse(repo: Path, model: str) -> model_config_pb2.ModelConfig:
    text = (repo / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def params(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_config_parses_for_every_flavour(exported: Path, flavour: Flavour) -> None:
    settings = RepositorySettings(flavour=flavour, max_images_per_request=4, max_crops_per_image=3)
    build_repository(exported, settings)
    for model in ALL_MODELS:
        config = parse(exported, model)
        assert config.name == model


def test_python_ort_configs_follow_the_onnx_models_and_settings(exported: Path) -> None:
    settings = RepositorySettings(
        max_images_per_request=4,
        max_crops_per_image=3,
        min_score=0.4,
        model_instances=2,
        preprocess_instances=3,
        max_queue_delay_microseconds=500,
    )
    built = build_repository(exported, settings)
    assert (built.detector_input_size, built.crop_size) == (DET_SIZE, CROP_SIZE)
    assert (built.num_logits, built.embedding_dim) == (LOGITS, EMBEDDING)

    det = parse(exported, "detector")
    assert det.backend == "python"
    assert det.max_batch_size == 4
    assert list(det.input[0].dims) == [3, DET_SIZE, DET_SIZE]
    assert [o.name for o in det.output] == ["boxes", "scores", "classes"]
    assert det.output[2].data_type == model_config_pb2.TYPE_INT32
    assert list(det.output[0].dims) == [DETECTIONS, 4]
    assert det.instance_group[0].count == 2
    assert det.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert det.dynamic_batching.max_queue_delay_microseconds == 500
    assert max(det.dynamic_batching.preferred_batch_size) == 4

    tagger = parse(exported, "tagger")
    # One request may carry every image at its crop cap.
    assert tagger.max_batch_size == 4 * 3
    # Open: two versions with different taxonomies are loaded side by side in a rollout.
    assert list(tagger.output[0].dims) == [-1]
    assert list(tagger.version_policy.specific.versions) == [1]

    pre = parse(exported, "preprocess")
    assert pre.max_batch_size == 0
    assert pre.instance_group[0].count == 3
    assert params(pre)["detector_input_size"] == str(DET_SIZE)
    assert params(pre)["max_images_per_request"] == "4"

    crop = parse(exported, "crop")
    assert params(crop)["crop_size"] == str(CROP_SIZE)
    assert float(params(crop)["min_score"]) == pytest.approx(0.4)
    assert params(crop)["max_crops_per_image"] == "3"
    assert list(crop.input[0].dims) == [-1, DETECTIONS, 4]
    assert list(crop.output[0].dims) == [-1, 3, CROP_SIZE, CROP_SIZE]

    ens = parse(exported, MODEL_NAME)
    assert ens.platform == "ensemble"
    assert ens.max_batch_size == 0
    outputs = {o.name: list(o.dims) for o in ens.output}
    assert outputs["TAG_LOGITS"] == [-1, -1]
    assert outputs["EMBEDDINGS"] == [-1, EMBEDDING]
    assert outputs["GARMENT_BOXES"] == [-1, 4]
    steps = {s.model_name: s.model_version for s in ens.ensemble_scheduling.step}
    # The exported models are called at the exact version each one loads.
    assert steps == {"preprocess": -1, "detector": 1, "crop": -1, "tagger": 1, "embedder": 1}
    assert params(ens)["max_images_per_request"] == "4"

    assert (exported / "preprocess" / "1" / "model.py").read_bytes() == (
        PREPROCESS_MODEL.read_bytes()
    )
    assert (exported / "crop" / "1" / "model.py").read_bytes() == CROP_MODEL.read_bytes()


def test_onnx_and_tensorrt_flavours_name_their_backends(exported: Path) -> None:
    build_repository(exported, RepositorySettings(flavour="onnx"))
    tagger = parse(exported, "tagger")
    assert tagger.backend == "onnxruntime"
    accelerators = tagger.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    assert accelerators[0].parameters["precision_mode"] == "FP16"

    build_repository(exported, RepositorySettings(flavour="tensorrt"))
    tagger = parse(exported, "tagger")
    assert tagger.platform == "tensorrt_plan"
    assert tagger.default_model_filename == "model.plan"
    assert tagger.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    # The python steps and the ensemble do not change with the flavour.
    assert parse(exported, "preprocess").backend == "python"


def test_configs_follow_the_newest_version(exported: Path) -> None:
    write_crop_model(exported, "tagger", "logits", LOGITS + 5, version=2)
    built = build_repository(exported, RepositorySettings())
    assert built.versions["tagger"] == 2
    assert built.num_logits == LOGITS + 5
    assert list(parse(exported, "tagger").version_policy.specific.versions) == [2]
    tagger_step = parse(exported, MODEL_NAME).ensemble_scheduling.step[3]
    assert (tagger_step.model_name, tagger_step.model_version) == ("tagger", 2)
    # The python-ort runner is installed where export did not leave one.
    assert (exported / "tagger" / "2" / "model.py").read_bytes() == ORT_RUNNER.read_bytes()


def test_a_missing_model_is_refused_with_the_export_command(exported: Path) -> None:
    shutil.rmtree(exported / "embedder")
    with pytest.raises(RepositoryError, match=r"embedder.*fashionserve export"):
        build_repository(exported, RepositorySettings())
    assert not (exported / MODEL_NAME).exists()


def test_a_missing_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        build_repository(tmp_path / "nowhere", RepositorySettings())


def test_tagger_and_embedder_must_share_the_crop_size(exported: Path) -> None:
    write_crop_model(exported, "embedder", "embedding", EMBEDDING, version=2, crop=48)
    with pytest.raises(RepositoryError, match="same crop size"):
        build_repository(exported, RepositorySettings())


def test_onnx_names_outside_the_contract_are_refused(exported: Path) -> None:
    write_crop_model(exported, "tagger", "scores", LOGITS, version=2)
    with pytest.raises(RepositoryError, match="no output 'logits'"):
        build_repository(exported, RepositorySettings())


def test_rebuilding_leaves_only_model_directories(exported: Path) -> None:
    build_repository(exported, RepositorySettings(min_score=0.2))
    build_repository(exported, RepositorySettings(min_score=0.6))
    # Triton polls every directory of the repository, hidden ones included.
    assert sorted(p.name for p in exported.iterdir()) == sorted(ALL_MODELS)
    assert not list(exported.parent.glob(".repo.staging-*"))
    assert not list(exported.rglob("*.tmp"))
    assert float(params(parse(exported, "crop"))["min_score"]) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "bad",
    [
        {"flavour": "tflite"},
        {"min_score": 1.5},
        {"max_images_per_request": 0},
        {"max_images_per_request": 1024, "max_crops_per_image": 256},
        {"unknown_setting": 1},
    ],
)
def test_settings_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RepositorySettings(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_model_warms_up_on_a_real_sample(exported: Path, flavour: Flavour) -> None:
    """So that the first caller does not pay for initialisation (Triton runs the sample
    while loading; a warm-up file of the wrong size fails the load)."""
    import io

    from PIL import Image

    build_repository(exported, RepositorySettings(flavour=flavour, max_images_per_request=2))
    itemsize = {"TYPE_FP32": 4, "TYPE_INT32": 4, "TYPE_UINT8": 1}
    for model in ALL_MODELS:
        config = parse(exported, model)
        if model == MODEL_NAME:
            assert not config.model_warmup  # Triton does not warm ensembles up
            continue
        (warmup,) = config.model_warmup
        assert warmup.batch_size == 1
        for name, spec in warmup.inputs.items():
            assert name in {i.name for i in config.input}
            if spec.zero_data:
                continue
            data = (exported / model / "warmup" / spec.input_data_file).read_bytes()
            dtype = model_config_pb2.DataType.Name(spec.data_type)
            if dtype == "TYPE_STRING":  # 4-byte length, then the encoded image
                length = int.from_bytes(data[:4], "little")
                assert length == len(data) - 4
                assert Image.open(io.BytesIO(data[4:])).format == "JPEG"
                continue
            assert len(data) == int(np.prod(spec.dims)) * itemsize[dtype]
    crops = np.frombuffer((exported / "tagger" / "warmup" / "crops").read_bytes(), np.float32)
    assert crops.std() > 1.0  # a real garment crop, not a blank canvas


def test_tensorrt_flavour_maps_each_gpu_type_to_its_engine(exported: Path) -> None:
    manifest = {"tensorrt": {"engines": [{"compute_capability": "8.9", "file": "model.sm89.plan"}]}}
    (exported / "tagger" / "1" / "manifest.json").write_text(json.dumps(manifest))
    settings = RepositorySettings(flavour="tensorrt", engine_files={"9.0": "model.sm90.plan"})
    build_repository(exported, settings)
    tagger = parse(exported, "tagger")
    # Recorded by export (8.9) plus built by a trtexec job (9.0); model.plan otherwise.
    assert dict(tagger.cc_model_filenames) == {"8.9": "model.sm89.plan", "9.0": "model.sm90.plan"}
    assert tagger.default_model_filename == "model.plan"
    assert dict(parse(exported, "detector").cc_model_filenames) == {"9.0": "model.sm90.plan"}
    with pytest.raises(ValidationError, match="compute capability"):
        RepositorySettings(flavour="tensorrt", engine_files={"sm90": "model.plan"})
    with pytest.raises(ValidationError, match="plan file name"):
        RepositorySettings(flavour="tensorrt", engine_files={"9.0": "../x.plan"})
