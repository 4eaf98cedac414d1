"""Config rendering: the ``config.pbtxt`` of every model of the ensemble, from templates.

Configs come from the ``.pbtxt`` templates in ``templates/`` (``string.Template``); the
flavour only changes the block that names the backend (``templates/flavours/``), so the
three flavours share one model template. Each exported model loads exactly the versions it
is given (``version_policy { specific }``), and the ensemble calls each by number, so its
parameters (taxonomy, artifact hashes) always describe the versions it calls.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

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
from fashionserve.model_repository.exported import EnsembleShape, ModelVersion, TensorSpec
from fashionserve.model_repository.settings import BUILD_SETTINGS, RepositorySettings
from fashionserve.thresholds import canonical_json

TEMPLATES = Path(__file__).resolve().parent / "templates"

_INSTANCE_KIND: dict[str, str] = {
    # python-ort runs ONNX Runtime's CPU provider inside python-backend processes.
    "python-ort": "KIND_CPU",
    # onnx: GPU where Triton sees one (TensorRT EP), CPU otherwise.
    "onnx": "KIND_AUTO",
    # TensorRT engines only run on the GPU they were built for.
    "tensorrt": "KIND_GPU",
}


def render_preprocess_config(
    shape: EnsembleShape, settings: RepositorySettings, warmup: str = ""
) -> str:
    """``config.pbtxt`` of the python-backend step ``preprocess``."""
    return render_template(
        "preprocess.pbtxt",
        detector_input_size=shape.detector_input_size,
        source_size=settings.source_size,
        crop_size=shape.crop_size,
        instances=settings.preprocess_instances,
        max_images_per_request=settings.max_images_per_request,
        max_pixels=settings.max_pixels,
        decode_threads=settings.decode_threads,
        warmup=warmup,
    )


def render_crop_config(shape: EnsembleShape, settings: RepositorySettings, warmup: str = "") -> str:
    """``config.pbtxt`` of the python-backend step ``crop``."""
    return render_template(
        "crop.pbtxt",
        detector_input_size=shape.detector_input_size,
        source_size=settings.source_size,
        crop_size=shape.crop_size,
        instances=settings.crop_instances,
        detections=shape.detections_per_image,
        boxes_type=shape.detection_types[0],
        scores_type=shape.detection_types[1],
        classes_type=shape.detection_types[2],
        min_score=repr(settings.min_score),
        max_crops_per_image=settings.max_crops_per_image,
        crop_margin=repr(settings.crop_margin),
        warmup=warmup,
    )


def render_ensemble_config(
    models: Mapping[str, ModelVersion], shape: EnsembleShape, settings: RepositorySettings
) -> str:
    """``config.pbtxt`` of the ensemble, calling each exported model at its version."""
    return render_template(
        "fashion_pipeline.pbtxt",
        max_images_per_request=settings.max_images_per_request,
        max_crops=settings.max_crops_per_request,
        embedding_dim=shape.embedding_dim,
        logits_type=shape.logits_type,
        embedding_type=shape.embedding_type,
        detector_input=DETECTOR_INPUT,
        detector_boxes=DETECTOR_OUTPUTS[0],
        detector_scores=DETECTOR_OUTPUTS[1],
        detector_classes=DETECTOR_OUTPUTS[2],
        tagger_input=CROP_INPUT,
        tagger_output=TAGGER_OUTPUT,
        embedder_input=CROP_INPUT,
        embedder_output=EMBEDDER_OUTPUT,
        detector_version=models[DETECTOR].version,
        tagger_version=models[TAGGER].version,
        embedder_version=models[EMBEDDER].version,
        parameters=render_parameters(ensemble_parameters(models, settings)),
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
    flavour_block = render_template(
        f"flavours/{settings.flavour}.pbtxt",
        tensorrt_precision=settings.tensorrt_precision,
        cc_model_filenames=render_cc_model_filenames(engine_files(mv, settings)),
    )
    return render_template(
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
    recorded = mv.manifest.engines if mv.manifest is not None else ()
    return {**{e.compute_capability: e.file for e in recorded}, **settings.engine_files}


def render_cc_model_filenames(files: Mapping[str, str]) -> str:
    """``cc_model_filenames``: Triton loads the engine built for the GPU it runs on (and
    ``default_model_filename`` on a GPU type not listed)."""
    return "\n".join(
        f"cc_model_filenames {{ key: {json.dumps(cc)} value: {json.dumps(name)} }}"
        for cc, name in sorted(files.items())
    )


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


def render_template(template: str, **values: object) -> str:
    text = (TEMPLATES / template).read_text()
    return string.Template(text).substitute({k: str(v) for k, v in values.items()})


def ensemble_parameters(
    models: Mapping[str, ModelVersion], settings: RepositorySettings
) -> dict[str, str]:
    """The ensemble's parameters: facts a client checks before decoding (taxonomy) or
    reports (versions), and the settings a rollout rebuilds with."""
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
        artifact = mv.manifest.artifacts.get(served_file) if mv.manifest is not None else None
        if artifact is not None:
            params[f"{name}_sha256"] = artifact.sha256
    tagger = models[TAGGER].manifest
    taxonomy = tagger.taxonomy if tagger is not None else None
    if taxonomy is not None:
        params["taxonomy_hash"] = taxonomy.hash
        params["taxonomy_version"] = taxonomy.version
        if taxonomy.document is not None:
            # The gateway decodes the tagger's logits with this taxonomy (after checking it
            # against taxonomy_hash): a rollout that adds labels needs no gateway restart.
            params["taxonomy_document"] = json.dumps(
                taxonomy.document.to_dict(), sort_keys=True, separators=(",", ":")
            )
    thresholds = tagger.thresholds if tagger is not None else None
    if thresholds is not None:
        # The calibrated set this tagger version decides with (`repo thresholds publish`):
        # the gateway decodes with it once this version is served, and rolling back serves
        # the earlier version's set, or the taxonomy's own thresholds.
        params["thresholds_name"] = thresholds.name
        params["thresholds_hash"] = thresholds.hash
        params["thresholds_document"] = canonical_json(thresholds.document)
    return params
