"""Write the Triton configs that turn exported models into the ``fashion_pipeline`` ensemble.

``fashionserve export`` publishes ``<repo>/<model>/<version>/model.onnx`` (plus ``model.py``
and ``manifest.json``) for the detector, tagger and embedder. :func:`build_repository` then

* writes each of those models' ``config.pbtxt`` from the newest version's ONNX inputs and
  outputs, for one of three flavours (python-ort, onnx, tensorrt: see DESIGN.md);
* installs the python-backend steps ``preprocess`` and ``crop`` with their parameters
  (detector input size, crop size, score floor, caps) read from the models themselves;
* writes the ensemble ``fashion_pipeline`` that chains them.

Configs come from the ``.pbtxt`` templates next to this file (``string.Template``); the
flavour only changes the block that names the backend, so the three flavours share one
template. Each model is written aside and renamed into place.

Versions: each exported model serves exactly one version, named in its config's
``version_policy { specific }`` and in the ensemble step that calls it (never ``-1``). So
a version published later changes nothing until it is rolled out
(:mod:`fashionserve.model_repository.versions`), a restarted Triton serves what the ensemble expects,
and the ensemble's parameters (taxonomy, artifact hashes) always describe the versions it
calls. The served version is the pinned one (``pinned.json`` beside the versions) or else
the newest.

Warm-up: every model but the ensemble gets ``model_warmup`` with a real sample (a rendered
garment scene: its JPEG bytes for preprocess, letterboxed for the detector, a garment crop
for the tagger and embedder) in ``<model>/warmup/``, so Triton runs each model once while
loading and the first caller does not pay for lazy initialisation (TensorRT's execution
context, ONNX Runtime's first-run allocations, python imports).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import string
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fashionserve.imaging import DEFAULT_MAX_PIXELS, decode_image, square_crop
from fashionserve.model_repository import CROP, DETECTOR, EMBEDDER, ENSEMBLE, PREPROCESS, TAGGER
from fashionserve.model_repository.python_models import CROP_MODEL, ORT_RUNNER, PREPROCESS_MODEL

LOG = logging.getLogger(__name__)
TEMPLATES = Path(__file__).resolve().parent / "templates"

Flavour = Literal["python-ort", "onnx", "tensorrt"]
FLAVOURS: tuple[Flavour, ...] = ("python-ort", "onnx", "tensorrt")

# The ONNX I/O names fixed by the model contract (fashionserve/models).
DETECTOR_INPUT = "images"
DETECTOR_OUTPUTS = ("boxes", "scores", "classes")
CROP_INPUT = "crops"
TAGGER_OUTPUT = "logits"
EMBEDDER_OUTPUT = "embedding"

_CC = re.compile(r"^\d+\.\d+$")
PIN_FILE = "pinned.json"
BUILD_SETTINGS = "build_settings"
WARMUP_DIR = "warmup"

_INSTANCE_KIND: dict[str, str] = {
    # python-ort runs ONNX Runtime's CPU provider inside python-backend processes.
    "python-ort": "KIND_CPU",
    # onnx: GPU where Triton sees one (TensorRT EP), CPU otherwise.
    "onnx": "KIND_AUTO",
    # TensorRT engines only run on the GPU they were built for.
    "tensorrt": "KIND_GPU",
}

_ONNX_TO_TRITON: dict[int, str] = {
    1: "TYPE_FP32",  # FLOAT
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
_TRITON_TO_NUMPY: dict[str, str] = {
    "TYPE_FP32": "float32",
    "TYPE_FP16": "float16",
    "TYPE_FP64": "float64",
    "TYPE_UINT8": "uint8",
    "TYPE_INT8": "int8",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_BOOL": "bool",
}


class RepositoryError(RuntimeError):
    """The repository cannot be built as asked (a model is missing, shapes disagree...)."""


class RepositorySettings(BaseModel):
    """How the ensemble is assembled: flavour, request caps, batching, instances."""

    # protected_namespaces: "model_instances" is named like Triton, not a pydantic method.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    flavour: Flavour = Field(
        default="python-ort", description="backend of detector/tagger/embedder (see DESIGN.md)"
    )
    max_images_per_request: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="images per ensemble request; detector max_batch_size",
    )
    max_crops_per_image: int = Field(
        default=16, ge=1, le=256, description="garments kept per image (best scores first)"
    )
    min_score: float = Field(default=0.3, ge=0.0, le=1.0, description="detector score floor")
    preprocess_instances: int = Field(default=2, ge=1, le=64, description="preprocess processes")
    crop_instances: int = Field(default=1, ge=1, le=64, description="crop processes")
    model_instances: int = Field(
        default=1, ge=1, le=64, description="instances of each of detector, tagger, embedder"
    )
    max_queue_delay_microseconds: int = Field(
        default=2000, ge=0, le=10_000_000, description="dynamic batcher wait for a fuller batch"
    )
    source_size: int = Field(
        default=512, ge=64, le=4096, description="side of the canvas crops are cut from (px)"
    )
    crop_margin: float = Field(
        default=0.1, ge=0.0, le=2.0, description="context around a box, fraction of its side"
    )
    intra_op_threads: int = Field(
        default=1, ge=1, le=64, description="python-ort: ONNX Runtime threads per model instance"
    )
    decode_threads: int = Field(
        default=2, ge=1, le=64, description="preprocess: images of a request decoded in parallel"
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="largest image accepted (width x height)"
    )
    tensorrt_precision: Literal["FP16", "FP32"] = Field(
        default="FP16", description="onnx flavour: TensorRT execution provider precision"
    )
    engine_files: dict[str, str] = Field(
        default_factory=dict,
        description="tensorrt flavour: compute capability (e.g. '8.6') -> engine file in the "
        "version directory, for engines built by trtexec jobs; engines built by "
        "`fashionserve export --target tensorrt` are listed from the manifest",
    )
    warmup: bool = Field(
        default=True, description="run each model once on a real sample while Triton loads it"
    )

    @model_validator(mode="after")
    def _engine_files_valid(self) -> RepositorySettings:
        for cc, name in self.engine_files.items():
            if not _CC.match(cc):
                raise ValueError(f"engine_files: {cc!r} is not a compute capability MAJOR.MINOR")
            if "/" in name or name.startswith(".") or not name.endswith(".plan"):
                raise ValueError(f"engine_files: {name!r} must be a *.plan file name")
        return self

    @property
    def max_crops_per_request(self) -> int:
        """Tagger/embedder max_batch_size: every image of a request at its crop cap."""
        return self.max_images_per_request * self.max_crops_per_image

    @model_validator(mode="after")
    def _crop_batch_bounded(self) -> RepositorySettings:
        if self.max_crops_per_request > 65536:
            raise ValueError(
                "max_images_per_request x max_crops_per_image must stay <= 65536 "
                f"(got {self.max_crops_per_request}): it is the tagger's max_batch_size"
            )
        return self


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX graph input or output: name, Triton data type, dims without the batch."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelVersion:
    """The newest published version of an exported model and its ONNX I/O."""

    name: str
    version: int
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    manifest: Mapping[str, Any]

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self, "output")


@dataclass(frozen=True)
class BuiltRepository:
    """What :func:`build_repository` wrote and the sizes it derived."""

    path: Path
    flavour: Flavour
    detector_input_size: int
    detections_per_image: int
    crop_size: int
    num_logits: int
    embedding_dim: int
    versions: Mapping[str, int]
    models: tuple[str, ...]


# ---------------------------------------------------------------------------- public
def build_repository(
    repo: Path,
    settings: RepositorySettings,
    *,
    versions: Mapping[str, int] | None = None,
    also_load: Mapping[str, Sequence[int]] | None = None,
) -> BuiltRepository:
    """Write the configs of every model of the ensemble into ``repo``.

    Each exported model serves ``versions[name]`` if given, else its pinned version, else
    its newest; ``also_load`` keeps more versions loaded beside it (the old one, during a
    rollout) without the ensemble calling them. Requires the detector, tagger and embedder
    to be exported first; raises :class:`RepositoryError` naming what is missing or
    inconsistent.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(
            f"model repository {repo} does not exist: export the models first "
            f"(`fashionserve export --checkpoint <kind>.pt --repository {repo}`)"
        )
    chosen = versions or {}
    extra = also_load or {}
    models = {
        name: model_version(repo, name, chosen[name], settings.flavour)
        if name in chosen
        else serving_version(repo, name, settings.flavour)
        for name in _onnx_models()
    }
    det, tag, emb = models[DETECTOR], models[TAGGER], models[EMBEDDER]

    det_in = det.input(DETECTOR_INPUT)
    boxes, scores, classes = (det.output(n) for n in DETECTOR_OUTPUTS)
    det_size = _detector_input_size(det, det_in)
    detections = boxes.dims[0] if boxes.dims and boxes.dims[0] > 0 else -1
    crop_size = _crop_size(tag)
    emb_size = _crop_size(emb)
    if emb_size != crop_size:
        raise RepositoryError(
            f"tagger takes {crop_size}px crops but embedder takes {emb_size}px: the crop step "
            "makes one crop tensor for both, so they must be exported with the same crop size"
        )
    logits, embedding = tag.output(TAGGER_OUTPUT), emb.output(EMBEDDER_OUTPUT)
    num_logits, embedding_dim = _last_dim(tag, logits), _last_dim(emb, embedding)

    _clean_stale_staging(repo)
    samples = warmup_samples(det_size, crop_size, settings.source_size) if settings.warmup else None
    for name, mv in models.items():
        max_batch = (
            settings.max_images_per_request if name == DETECTOR else settings.max_crops_per_request
        )
        if settings.flavour == "python-ort":
            _ensure_runner(mv)
        warmup = ""
        if samples is not None:
            sample = samples["images"] if name == DETECTOR else samples["crops"]
            spec = mv.inputs[0]
            warmup = render_warmup(repo / name, spec.name, spec.data_type, spec.dims, sample)
        config = render_model_config(mv, settings, max_batch, warmup, extra.get(name, ()))
        _write_config(repo / name, config)

    common = {
        "detector_input_size": det_size,
        "source_size": settings.source_size,
        "crop_size": crop_size,
    }
    preprocess = _render(
        "preprocess.pbtxt",
        **common,
        instances=settings.preprocess_instances,
        max_images_per_request=settings.max_images_per_request,
        max_pixels=settings.max_pixels,
        decode_threads=settings.decode_threads,
        warmup=_preprocess_warmup(samples),
    )
    crop = _render(
        "crop.pbtxt",
        **common,
        instances=settings.crop_instances,
        detections=detections,
        boxes_type=boxes.data_type,
        scores_type=scores.data_type,
        classes_type=classes.data_type,
        min_score=repr(settings.min_score),
        max_crops_per_image=settings.max_crops_per_image,
        crop_margin=repr(settings.crop_margin),
        warmup=_crop_warmup(
            samples is not None,
            detections,
            settings.source_size,
            (boxes.data_type, scores.data_type, classes.data_type),
        ),
    )
    ensemble = _render(
        "fashion_pipeline.pbtxt",
        max_images_per_request=settings.max_images_per_request,
        max_crops=settings.max_crops_per_request,
        embedding_dim=embedding_dim,
        logits_type=logits.data_type,
        embedding_type=embedding.data_type,
        detector_input=DETECTOR_INPUT,
        detector_boxes=DETECTOR_OUTPUTS[0],
        detector_scores=DETECTOR_OUTPUTS[1],
        detector_classes=DETECTOR_OUTPUTS[2],
        tagger_input=CROP_INPUT,
        tagger_output=TAGGER_OUTPUT,
        embedder_input=CROP_INPUT,
        embedder_output=EMBEDDER_OUTPUT,
        detector_version=det.version,
        tagger_version=tag.version,
        embedder_version=emb.version,
        parameters=render_parameters(_ensemble_parameters(models, settings)),
    )
    _publish_model_dir(repo, PREPROCESS, preprocess, PREPROCESS_MODEL, samples)
    _publish_model_dir(repo, CROP, crop, CROP_MODEL, samples)
    _publish_model_dir(repo, ENSEMBLE, ensemble, None, None)
    built = BuiltRepository(
        path=repo,
        flavour=settings.flavour,
        detector_input_size=det_size,
        detections_per_image=detections,
        crop_size=crop_size,
        num_logits=num_logits,
        embedding_dim=embedding_dim,
        versions={name: mv.version for name, mv in models.items()},
        models=(PREPROCESS, DETECTOR, CROP, TAGGER, EMBEDDER, ENSEMBLE),
    )
    LOG.info(
        "built %s repository %s: detector v%d (%dpx), tagger v%d (%d logits), "
        "embedder v%d (%d dims), crops %dpx",
        settings.flavour,
        repo,
        det.version,
        det_size,
        tag.version,
        num_logits,
        emb.version,
        embedding_dim,
        crop_size,
    )
    return built


def newest_version(repo: Path, name: str, flavour: Flavour = "python-ort") -> ModelVersion:
    """The highest numbered version of ``name`` holding a ``model.onnx``, with its I/O."""
    model_dir = Path(repo) / name
    versions = (
        sorted(
            (int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
            reverse=True,
        )
        if model_dir.is_dir()
        else []
    )
    for version in versions:
        if (model_dir / str(version) / "model.onnx").is_file():
            return model_version(repo, name, version, flavour)
    raise RepositoryError(
        f"no exported version of {name!r} in {model_dir} (looked for <version>/model.onnx): "
        f"run `fashionserve export --checkpoint {name}.pt --repository {repo}` first"
    )


def serving_version(repo: Path, name: str, flavour: Flavour = "python-ort") -> ModelVersion:
    """The version ``build_repository`` serves: the pinned one, else the newest."""
    pinned = read_pin(Path(repo) / name)
    if pinned is not None:
        return model_version(repo, name, pinned, flavour)
    return newest_version(repo, name, flavour)


def stored_settings(repo: Path) -> RepositorySettings:
    """The settings the repository's ensemble was last built with."""
    config = read_config(Path(repo) / ENSEMBLE)
    if config is None or BUILD_SETTINGS not in config.parameters:
        raise RepositoryError(
            f"{repo} has no ensemble built by this version of `fashionserve repo build`: "
            "run it once first"
        )
    return RepositorySettings.model_validate_json(config.parameters[BUILD_SETTINGS].string_value)


def ensemble_versions(repo: Path) -> dict[str, int]:
    """Model name -> the version the ensemble calls (what Triton serves)."""
    config = read_config(Path(repo) / ENSEMBLE)
    if config is None:
        return {}
    return {
        step.model_name: int(step.model_version)
        for step in config.ensemble_scheduling.step
        if step.model_version > 0
    }


def read_pin(model_dir: Path) -> int | None:
    """The version ``fashionserve repo versions pin`` fixed for this model, if any."""
    path = model_dir / PIN_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{path} is not a valid pin ({exc})") from exc


def read_config(model_dir: Path) -> Any:
    """The model's ``config.pbtxt`` parsed with Triton's own ``ModelConfig``, or ``None``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = model_dir / "config.pbtxt"
    if not path.is_file():
        return None
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path} does not parse as a Triton model config: {exc}") from exc


def model_version(
    repo: Path, name: str, version: int, flavour: Flavour = "python-ort"
) -> ModelVersion:
    """Version ``version`` of ``name`` with its ONNX I/O and manifest."""
    onnx_path = Path(repo) / name / str(version) / "model.onnx"
    if not onnx_path.is_file():
        raise RepositoryError(f"{name} version {version} does not exist (no {onnx_path})")
    if flavour == "tensorrt" and not any(onnx_path.parent.glob("*.plan")):
        # Engines are built where they run (deploy time, per GPU type), so a missing plan
        # is expected when the repository is assembled on a machine without the GPU.
        LOG.warning(
            "%s version %d has no model.plan yet: build the TensorRT engine on the target "
            "GPU before Triton loads this repository",
            name,
            version,
        )
    inputs, outputs = read_onnx_io(onnx_path)
    manifest_path = onnx_path.parent / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise RepositoryError(f"{manifest_path} is not valid JSON: {exc}") from exc
    return ModelVersion(name, version, onnx_path.parent, inputs, outputs, manifest)


def read_onnx_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Graph inputs (initialisers excluded) and outputs of an ONNX file, batch dim dropped.

    Output dims the graph leaves symbolic are taken from ONNX shape inference, then, if
    still unknown, from one ONNX Runtime run on a zero batch of one (torch's exporter often
    leaves ``logits`` as ``[batch, ?]``; Triton needs the real width for the ensemble).
    """
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    with contextlib.suppress(Exception):  # inference is best effort; the probe backs it up
        model = onnx.shape_inference.infer_shapes(model)
    initializers = {init.name for init in model.graph.initializer}
    value_info = {v.name: v for v in model.graph.value_info}

    def spec(value: Any) -> TensorSpec:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _ONNX_TO_TRITON:
            raise RepositoryError(
                f"{path}: {value.name} has unsupported type {tensor_type.elem_type}"
            )
        dims = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor_type.shape.dim
        )
        if not dims:
            raise RepositoryError(f"{path}: {value.name} has no batch dimension")
        return TensorSpec(value.name, _ONNX_TO_TRITON[tensor_type.elem_type], dims[1:])

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(value_info.get(v.name, v)) for v in model.graph.output)
    if any(d < 0 for o in outputs for d in o.dims) and all(d > 0 for i in inputs for d in i.dims):
        outputs = _probe_output_dims(path, inputs, outputs)
    return inputs, outputs


def _probe_output_dims(
    path: Path, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> tuple[TensorSpec, ...]:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.zeros((1, *i.dims), dtype=_TRITON_TO_NUMPY.get(i.data_type, "float32"))
        for i in inputs
    }
    results = session.run([o.name for o in outputs], feeds)
    return tuple(
        TensorSpec(o.name, o.data_type, tuple(int(d) for d in r.shape[1:]))
        for o, r in zip(outputs, results, strict=True)
    )


def render_model_config(
    mv: ModelVersion,
    settings: RepositorySettings,
    max_batch_size: int,
    warmup: str = "",
    also_load: Sequence[int] = (),
) -> str:
    """``config.pbtxt`` of an exported model (detector, tagger or embedder) for a flavour,
    loading version ``mv.version`` and ``also_load``."""
    parameters: dict[str, str] = {}
    if settings.flavour == "python-ort":
        parameters["intra_op_threads"] = str(settings.intra_op_threads)
    flavour_block = _render(
        f"flavours/{settings.flavour}.pbtxt",
        tensorrt_precision=settings.tensorrt_precision,
        cc_model_filenames=render_cc_model_filenames(engine_files(mv, settings)),
    )
    return _render(
        "model.pbtxt",
        name=mv.name,
        flavour=settings.flavour,
        version=mv.version,
        flavour_block=flavour_block.strip(),
        max_batch_size=max_batch_size,
        inputs=render_tensors("input", mv.inputs),
        outputs=render_tensors("output", [_open_logits(mv.name, o) for o in mv.outputs]),
        instances=settings.model_instances,
        instance_kind=_INSTANCE_KIND[settings.flavour],
        preferred_batch_sizes=", ".join(str(s) for s in preferred_batch_sizes(max_batch_size)),
        max_queue_delay_microseconds=settings.max_queue_delay_microseconds,
        version_policy=render_version_policy([mv.version, *also_load]),
        warmup=warmup,
        parameters=render_parameters(parameters),
    )


def _open_logits(model: str, spec: TensorSpec) -> TensorSpec:
    """The tagger's logit width is left open (-1) in its config: the taxonomy grows every
    week, so the width belongs to a version, and during a rollout two versions with
    different taxonomies are loaded side by side under one config."""
    if model == TAGGER and spec.name == TAGGER_OUTPUT:
        return TensorSpec(spec.name, spec.data_type, (-1,) * len(spec.dims))
    return spec


def render_version_policy(versions: Sequence[int]) -> str:
    """``version_policy`` loading exactly ``versions`` (one, or two during a rollout)."""
    listed = ", ".join(str(v) for v in sorted(set(versions)))
    return f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}"


def engine_files(mv: ModelVersion, settings: RepositorySettings) -> dict[str, str]:
    """Compute capability -> engine file: the engines the version's manifest records
    (``export --target tensorrt``), then ``settings.engine_files`` (trtexec jobs)."""
    found: dict[str, str] = {}
    for engine in (mv.manifest.get("tensorrt") or {}).get("engines") or []:
        cc, name = engine.get("compute_capability"), engine.get("file")
        if isinstance(cc, str) and isinstance(name, str):
            found[cc] = name
    return {**found, **settings.engine_files}


def render_cc_model_filenames(files: Mapping[str, str]) -> str:
    """``cc_model_filenames``: Triton loads the engine built for the GPU it runs on (and
    ``default_model_filename`` on a GPU type not listed)."""
    return "\n".join(
        f"cc_model_filenames {{ key: {json.dumps(cc)} value: {json.dumps(name)} }}"
        for cc, name in sorted(files.items())
    )


# --------------------------------------------------------------------------- warm-up
@functools.lru_cache(maxsize=1)
def _sample_scene() -> tuple[bytes, tuple[float, float, float, float]]:
    """One rendered garment scene (JPEG bytes) and its first garment's box."""
    from fashionserve.data.dataset import render_samples

    for sample in render_samples(8, 7, splits=("val",)):
        if sample.garments:
            return sample.image, sample.garments[0].box
    raise RepositoryError("the synthetic renderer produced no garment for the warm-up sample")


def warmup_samples(det_size: int, crop_size: int, source_size: int) -> dict[str, Any]:
    """The warm-up inputs, made as serving makes them: the encoded image, the preprocess
    step's outputs for it (detector input ``[3,S,S]``, source canvas, image size) and a
    garment crop ``[3,C,C]``."""
    import numpy as np

    from fashionserve.model_repository.python_models.steps import preprocess_images

    data, box = _sample_scene()
    pre = preprocess_images([data], det_size, source_size)
    crop = square_crop(decode_image(data), box, crop_size).transpose(2, 0, 1)
    return {
        "bytes": data,
        "images": pre.det_input[0],
        "source": pre.source,
        "image_sizes": pre.image_sizes,
        "crops": np.ascontiguousarray(crop, dtype=np.float32),
    }


def render_warmup(
    model_dir: Path, input_name: str, data_type: str, dims: Sequence[int], sample: Any
) -> str:
    """Write ``sample`` (one row) to ``<model>/warmup/<input>`` and return the
    ``model_warmup`` block that feeds it at batch size 1."""
    if tuple(sample.shape) != tuple(dims):
        raise RepositoryError(
            f"{model_dir.name}: warm-up sample shape {tuple(sample.shape)} does not match "
            f"input {input_name} {tuple(dims)}"
        )
    _write_warmup_file(model_dir, input_name, sample.astype(_TRITON_TO_NUMPY[data_type]).tobytes())
    return _warmup_block(model_dir.name, 1, [(input_name, data_type, list(dims), input_name)])


def _preprocess_warmup(samples: Mapping[str, Any] | None) -> str:
    if samples is None:
        return ""
    # TYPE_STRING warm-up data: each element is a 4-byte little-endian length, then bytes.
    return _warmup_block(PREPROCESS, 1, [("IMAGE_BYTES", "TYPE_STRING", [1], "IMAGE_BYTES")])


def _crop_warmup(
    enabled: bool, detections: int, source_size: int, types: tuple[str, str, str]
) -> str:
    if not enabled:
        return ""
    # The detector's output for the sample does not exist at build time: zero scores (no
    # garment above the floor) run the step's whole path, dummy row included, on the
    # sample's real source canvas and size.
    k = max(detections, 1)
    return _warmup_block(
        CROP,
        1,
        [
            ("DET_BOXES", types[0], [1, k, 4], None),
            ("DET_SCORES", types[1], [1, k], None),
            ("DET_CLASSES", types[2], [1, k], None),
            ("SOURCE", "TYPE_UINT8", [1, source_size, source_size, 3], "SOURCE"),
            ("IMAGE_SIZES", "TYPE_INT32", [1, 2], "IMAGE_SIZES"),
        ],
    )


def _warmup_block(
    name: str, batch_size: int, inputs: Sequence[tuple[str, str, list[int], str | None]]
) -> str:
    """``model_warmup``: ``inputs`` are (name, data type, dims, file in ``warmup/`` or None
    for zeros)."""
    entries = []
    for input_name, data_type, dims, file in inputs:
        source = f'input_data_file: "{file}"' if file else "zero_data: true"
        entries.append(
            f'    inputs {{ key: "{input_name}" value: {{ data_type: {data_type} '
            f"dims: [ {', '.join(str(d) for d in dims)} ] {source} }} }}"
        )
    body = "\n".join(entries)
    return (
        "model_warmup [\n  {\n"
        f'    name: "{name}-sample"\n    batch_size: {batch_size}\n{body}\n  }}\n]'
    )


def _write_warmup_file(model_dir: Path, name: str, data: bytes) -> None:
    folder = model_dir / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / name)


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """A quarter, a half and all of ``max_batch_size`` (deduplicated, >= 1)."""
    return sorted({max(1, max_batch_size // 4), max(1, max_batch_size // 2), max_batch_size})


def render_tensors(kind: Literal["input", "output"], tensors: Sequence[TensorSpec]) -> str:
    """A config ``input [...]`` or ``output [...]`` block."""
    items = [
        "  {\n"
        f'    name: "{t.name}"\n'
        f"    data_type: {t.data_type}\n"
        f"    dims: [ {', '.join(str(d) for d in t.dims)} ]\n"
        "  }"
        for t in tensors
    ]
    return f"{kind} [\n" + ",\n".join(items) + "\n]"


def render_parameters(parameters: Mapping[str, object]) -> str:
    """Config ``parameters`` entries (string values, as Triton stores them)."""
    return "\n".join(
        f"parameters {{ key: {json.dumps(str(k))} value: {{ string_value: {json.dumps(str(v))} }} }}"
        for k, v in parameters.items()
    )


# --------------------------------------------------------------------------- helpers
def _onnx_models() -> Iterable[str]:
    return (DETECTOR, TAGGER, EMBEDDER)


def _render(template: str, **values: object) -> str:
    text = (TEMPLATES / template).read_text()
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def _find(specs: Sequence[TensorSpec], name: str, mv: ModelVersion, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    have = ", ".join(s.name for s in specs) or "none"
    raise RepositoryError(
        f"{mv.name} version {mv.version} ({mv.path / 'model.onnx'}) has no {kind} {name!r} "
        f"(it has: {have}); the ensemble needs the ONNX names of the model contract"
    )


def _detector_input_size(det: ModelVersion, spec: TensorSpec) -> int:
    """S, the square detector input: from the ONNX shape, else the version manifest."""
    if len(spec.dims) != 3 or spec.dims[0] not in (3, -1):
        raise RepositoryError(f"detector input {spec.name} must be [B,3,S,S], got {spec.dims}")
    height, width = spec.dims[1], spec.dims[2]
    if height < 0 or width < 0:
        size = _manifest_input_size(det.manifest)
        if size is None:
            raise RepositoryError(
                f"detector version {det.version} has a dynamic input size and its "
                "manifest.json does not give one"
            )
        height, width = size
    if height != width:
        raise RepositoryError(f"detector input must be square (letterboxed), got {height}x{width}")
    return height


def _manifest_input_size(manifest: Mapping[str, Any]) -> tuple[int, int] | None:
    """``input_size`` as [h, w], or ``input`` {height, width}, at the top or under ``checkpoint``."""
    for scope in (manifest, manifest.get("checkpoint") or {}):
        if not isinstance(scope, Mapping):
            continue
        size = scope.get("input_size")
        if isinstance(size, list | tuple) and len(size) == 2:
            return int(size[0]), int(size[1])
        inp = scope.get("input")
        if isinstance(inp, Mapping) and "height" in inp and "width" in inp:
            return int(inp["height"]), int(inp["width"])
    return None


def _crop_size(mv: ModelVersion) -> int:
    spec = mv.input(CROP_INPUT)
    if len(spec.dims) != 3 or spec.dims[1] != spec.dims[2] or spec.dims[1] <= 0:
        raise RepositoryError(
            f"{mv.name} input {spec.name} must be [B,3,C,C] with a fixed C, got {spec.dims}"
        )
    return spec.dims[1]


def _last_dim(mv: ModelVersion, spec: TensorSpec) -> int:
    if len(spec.dims) != 1 or spec.dims[0] <= 0:
        raise RepositoryError(
            f"{mv.name} output {spec.name} must be [B,X] with fixed X, got {spec.dims}"
        )
    return spec.dims[0]


def _ensemble_parameters(
    models: Mapping[str, ModelVersion], settings: RepositorySettings
) -> dict[str, str]:
    """Facts a client checks before decoding (taxonomy) or reports (versions)."""
    params: dict[str, str] = {
        # What `fashionserve repo versions` rebuilds with when it rolls a version out.
        BUILD_SETTINGS: settings.model_dump_json(),
        "flavour": settings.flavour,
        "max_images_per_request": str(settings.max_images_per_request),
        "max_crops_per_image": str(settings.max_crops_per_image),
        "min_score": repr(settings.min_score),
    }
    served_file = "model.plan" if settings.flavour == "tensorrt" else "model.onnx"
    for name, mv in models.items():
        params[f"{name}_version"] = str(mv.version)
        sha = mv.manifest.get("artifacts", {}).get(served_file, {}).get("sha256")
        if sha:
            params[f"{name}_sha256"] = str(sha)
    tagger = models[TAGGER].manifest
    for key in ("taxonomy_hash", "taxonomy_version"):
        value = _manifest_value(tagger, key)
        if value is not None:
            params[key] = str(value)
    document = (tagger.get("taxonomy") or {}).get("document")
    if document:
        # The gateway decodes the tagger's logits with this taxonomy (after checking it
        # against taxonomy_hash): a rollout that adds labels needs no gateway restart.
        params["taxonomy_document"] = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return params


def _manifest_value(manifest: Mapping[str, Any], key: str) -> Any:
    """``key`` at the top of a manifest, or ``taxonomy.<hash|version>`` for taxonomy keys."""
    if key in manifest:
        return manifest[key]
    taxonomy = manifest.get("taxonomy")
    if isinstance(taxonomy, Mapping) and key.startswith("taxonomy_"):
        return taxonomy.get(key.removeprefix("taxonomy_"))
    return None


def _ensure_runner(mv: ModelVersion) -> None:
    """python-ort needs the ONNX Runtime runner as the version's ``model.py``."""
    target = mv.path / "model.py"
    if not target.is_file():
        LOG.info(
            "%s version %d has no model.py: installing the ONNX Runtime runner", mv.name, mv.version
        )
        tmp = target.with_name("model.py.tmp")
        shutil.copyfile(ORT_RUNNER, tmp)
        tmp.replace(target)


def _write_config(model_dir: Path, text: str) -> None:
    """Replace ``config.pbtxt`` atomically (Triton ignores the ``.tmp`` file beside it)."""
    tmp = model_dir / "config.pbtxt.tmp"
    tmp.write_text(text)
    tmp.replace(model_dir / "config.pbtxt")


def _staging_prefix(repo: Path) -> str:
    return f".{repo.name}.staging-"


def _clean_stale_staging(repo: Path) -> None:
    for stale in repo.parent.glob(_staging_prefix(repo) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _publish_model_dir(
    repo: Path,
    name: str,
    config: str,
    model_py: Path | None,
    samples: Mapping[str, Any] | None,
) -> None:
    """Write ``<repo>/<name>/`` (config, ``1/model.py``, warm-up data) aside, then swap it in.

    The staging directory is a sibling of the repository, not inside it: Triton polls every
    directory of the repository, hidden ones included, and fails on a half-written model.
    """
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(repo), dir=repo.parent))
    try:
        new = staging / name
        (new / "1").mkdir(parents=True)
        (new / "config.pbtxt").write_text(config)
        if model_py is not None:
            shutil.copyfile(model_py, new / "1" / "model.py")
        if samples is not None and name == PREPROCESS:
            data = samples["bytes"]
            _write_warmup_file(new, "IMAGE_BYTES", struct.pack("<I", len(data)) + data)
        if samples is not None and name == CROP:
            _write_warmup_file(new, "SOURCE", samples["source"].tobytes())
            _write_warmup_file(new, "IMAGE_SIZES", samples["image_sizes"].tobytes())
        target = repo / name
        if target.exists():
            target.rename(staging / f"{name}.old")
        new.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
