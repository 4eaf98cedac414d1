"""Exported models as the builder reads them: a version's ONNX inputs and outputs, and its
manifest.

Triton needs every input and output of a model in its config, with fixed dims where the
ensemble chains models; they are read from the ONNX file itself (:func:`read_onnx_io`), so a
config can never disagree with the graph it loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashionserve.ensemble import (
    CROP_INPUT,
    DETECTOR,
    DETECTOR_INPUT,
    DETECTOR_OUTPUTS,
    EMBEDDER,
    EMBEDDER_OUTPUT,
    TAGGER,
    TAGGER_OUTPUT,
)
from fashionserve.model_repository.settings import Flavour
from fashionserve.repository import Manifest, RepositoryError, read_manifest, version_to_serve

log = logging.getLogger(__name__)

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
TRITON_TO_NUMPY: dict[str, str] = {
    "TYPE_FP32": "float32",
    "TYPE_FP16": "float16",
    "TYPE_FP64": "float64",
    "TYPE_UINT8": "uint8",
    "TYPE_INT8": "int8",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_BOOL": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX graph input or output: name, Triton data type, dims without the batch."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelVersion:
    """A published version of an exported model: its ONNX I/O and its manifest (``None``
    for a version published without one)."""

    name: str
    version: int
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    manifest: Manifest | None

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, self, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, self, "output")


def model_to_serve(repo: Path, name: str, flavour: Flavour = "python-ort") -> ModelVersion:
    """The version of ``name`` a build serves (:func:`fashionserve.repository.version_to_serve`:
    the pinned one, else the newest), with its ONNX I/O."""
    version = version_to_serve(Path(repo) / name)
    if version is None:
        raise RepositoryError(
            f"no exported version of {name!r} in {Path(repo) / name}: "
            f"run `fashionserve export --checkpoint {name}.pt --repository {repo}` first"
        )
    return model_version(repo, name, version, flavour)


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
        log.warning(
            "%s version %d has no model.plan yet: build the TensorRT engine on the target "
            "GPU before Triton loads this repository",
            name,
            version,
        )
    inputs, outputs = read_onnx_io(onnx_path)
    manifest = read_manifest(onnx_path.parent)
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
        i.name: np.zeros((1, *i.dims), dtype=TRITON_TO_NUMPY.get(i.data_type, "float32"))
        for i in inputs
    }
    results = session.run([o.name for o in outputs], feeds)
    return tuple(
        TensorSpec(o.name, o.data_type, tuple(int(d) for d in r.shape[1:]))
        for o, r in zip(outputs, results, strict=True)
    )


def _find(specs: Sequence[TensorSpec], name: str, mv: ModelVersion, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    have = ", ".join(s.name for s in specs) or "none"
    raise RepositoryError(
        f"{mv.name} version {mv.version} ({mv.path / 'model.onnx'}) has no {kind} {name!r} "
        f"(it has: {have}); the ensemble needs the ONNX names of the model contract"
    )


@dataclass(frozen=True)
class EnsembleShape:
    """The sizes and types the ensemble's configs chain, read from the exported models."""

    detector_input_size: int
    detections_per_image: int  # -1 when the detector leaves K open
    detection_types: tuple[str, str, str]  # Triton types of boxes, scores, classes
    crop_size: int
    num_logits: int
    logits_type: str
    embedding_dim: int
    embedding_type: str


def ensemble_shape(models: Mapping[str, ModelVersion]) -> EnsembleShape:
    """Check that the exported models fit together, and return the sizes they share."""
    det, tag, emb = models[DETECTOR], models[TAGGER], models[EMBEDDER]
    boxes, scores, classes = (det.output(n) for n in DETECTOR_OUTPUTS)
    crop_size = _crop_size(tag)
    emb_size = _crop_size(emb)
    if emb_size != crop_size:
        raise RepositoryError(
            f"tagger takes {crop_size}px crops but embedder takes {emb_size}px: the crop step "
            "makes one crop tensor for both, so they must be exported with the same crop size"
        )
    logits, embedding = tag.output(TAGGER_OUTPUT), emb.output(EMBEDDER_OUTPUT)
    return EnsembleShape(
        detector_input_size=_detector_input_size(det),
        detections_per_image=boxes.dims[0] if boxes.dims and boxes.dims[0] > 0 else -1,
        detection_types=(boxes.data_type, scores.data_type, classes.data_type),
        crop_size=crop_size,
        num_logits=_last_dim(tag, logits),
        logits_type=logits.data_type,
        embedding_dim=_last_dim(emb, embedding),
        embedding_type=embedding.data_type,
    )


def _detector_input_size(det: ModelVersion) -> int:
    """S, the square detector input: from the ONNX shape, else the version manifest."""
    spec = det.input(DETECTOR_INPUT)
    if len(spec.dims) != 3 or spec.dims[0] not in (3, -1):
        raise RepositoryError(f"detector input {spec.name} must be [B,3,S,S], got {spec.dims}")
    height, width = spec.dims[1], spec.dims[2]
    if height < 0 or width < 0:
        recorded = det.manifest.input if det.manifest is not None else None
        if recorded is None:
            raise RepositoryError(
                f"detector version {det.version} has a dynamic input size and its "
                "manifest.json does not give one"
            )
        height, width = recorded.height, recorded.width
    if height != width:
        raise RepositoryError(f"detector input must be square (letterboxed), got {height}x{width}")
    return height


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
