"""Build the model repository: the Triton configs that turn exported models into the ensemble.

``fashionserve export`` publishes ``<repo>/<model>/<version>/`` (``model.onnx``, ``model.py``,
``manifest.json``) for the detector, tagger and embedder. :func:`build_repository` then

* picks the version each serves (:func:`fashionserve.repository.version_to_serve`, or the
  versions a rollout asks for) and checks that they fit together
  (:func:`~fashionserve.model_repository.exported.ensemble_shape`);
* writes each of those models' ``config.pbtxt`` from its ONNX inputs and outputs, for one
  of three flavours (:mod:`~fashionserve.model_repository.configs`), with a warm-up sample
  (:mod:`~fashionserve.model_repository.warmup`);
* installs the python-backend steps ``preprocess`` and ``crop`` with their parameters
  (detector input size, crop size, score floor, caps) read from the models themselves;
* writes the ensemble that chains them, calling each exported model at its version.

Every config is written aside and renamed into place, so Triton never reads half a model.
"""

from __future__ import annotations

import logging
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashionserve.ensemble import (
    CROP,
    DETECTOR,
    IMAGE_BYTES,
    IMAGE_SIZES,
    MODEL_KINDS,
    MODEL_NAME,
    PREPROCESS,
    STEPS,
)
from fashionserve.model_repository.configs import (
    render_crop_config,
    render_ensemble_config,
    render_model_config,
    render_preprocess_config,
)
from fashionserve.model_repository.exported import (
    ModelVersion,
    ensemble_shape,
    model_to_serve,
    model_version,
)
from fashionserve.model_repository.python_models import (
    CROP_MODEL,
    ORT_RUNNER,
    PREPROCESS_MODEL,
    steps,
)
from fashionserve.model_repository.settings import Flavour, RepositorySettings
from fashionserve.model_repository.warmup import (
    crop_warmup,
    preprocess_warmup,
    render_warmup,
    warmup_samples,
    write_warmup_file,
)
from fashionserve.repository import CONFIG_FILE, RepositoryError

log = logging.getLogger(__name__)


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
    models: dict[str, ModelVersion] = {
        name: model_version(repo, name, chosen[name], settings.flavour)
        if name in chosen
        else model_to_serve(repo, name, settings.flavour)
        for name in MODEL_KINDS
    }
    shape = ensemble_shape(models)

    _clean_stale_staging(repo)
    samples = (
        warmup_samples(shape.detector_input_size, shape.crop_size, settings.source_size)
        if settings.warmup
        else None
    )
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

    preprocess = render_preprocess_config(shape, settings, preprocess_warmup(samples))
    crop = render_crop_config(
        shape,
        settings,
        crop_warmup(
            samples is not None,
            shape.detections_per_image,
            settings.source_size,
            shape.detection_types,
        ),
    )
    _publish_model_dir(repo, PREPROCESS, preprocess, PREPROCESS_MODEL, samples)
    _publish_model_dir(repo, CROP, crop, CROP_MODEL, samples)
    _publish_model_dir(
        repo, MODEL_NAME, render_ensemble_config(models, shape, settings), None, None
    )
    built = BuiltRepository(
        path=repo,
        flavour=settings.flavour,
        detector_input_size=shape.detector_input_size,
        detections_per_image=shape.detections_per_image,
        crop_size=shape.crop_size,
        num_logits=shape.num_logits,
        embedding_dim=shape.embedding_dim,
        versions={name: mv.version for name, mv in models.items()},
        models=(*STEPS, MODEL_NAME),
    )
    log.info(
        "built %s repository %s: detector v%d (%dpx), tagger v%d (%d logits), "
        "embedder v%d (%d dims), crops %dpx",
        settings.flavour,
        repo,
        built.versions["detector"],
        shape.detector_input_size,
        built.versions["tagger"],
        shape.num_logits,
        built.versions["embedder"],
        shape.embedding_dim,
        shape.crop_size,
    )
    return built


def _ensure_runner(mv: ModelVersion) -> None:
    """python-ort needs the ONNX Runtime runner as the version's ``model.py``."""
    target = mv.path / "model.py"
    if not target.is_file():
        log.info(
            "%s version %d has no model.py: installing the ONNX Runtime runner", mv.name, mv.version
        )
        tmp = target.with_name("model.py.tmp")
        shutil.copyfile(ORT_RUNNER, tmp)
        tmp.replace(target)


def _write_config(model_dir: Path, text: str) -> None:
    """Replace ``config.pbtxt`` atomically (Triton ignores the ``.tmp`` file beside it)."""
    tmp = model_dir / f"{CONFIG_FILE}.tmp"
    tmp.write_text(text)
    tmp.replace(model_dir / CONFIG_FILE)


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
        (new / CONFIG_FILE).write_text(config)
        if model_py is not None:
            shutil.copyfile(model_py, new / "1" / "model.py")
        if samples is not None and name == PREPROCESS:
            data = samples["bytes"]
            write_warmup_file(new, IMAGE_BYTES, struct.pack("<I", len(data)) + data)
        if samples is not None and name == CROP:
            write_warmup_file(new, steps.SOURCE, samples["source"].tobytes())
            write_warmup_file(new, IMAGE_SIZES, samples["image_sizes"].tobytes())
        target = repo / name
        if target.exists():
            target.rename(staging / f"{name}.old")
        new.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
