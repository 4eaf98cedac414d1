"""How the repository is assembled: the flavour, request caps, batching and instances.

:class:`RepositorySettings` is what ``fashionserve repo build`` takes; the build records it in
the ensemble's config (parameter :data:`BUILD_SETTINGS`), so that a rollout rebuilds with the
same settings (:func:`stored_settings`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fashionserve.ensemble import MODEL_NAME
from fashionserve.imaging import DEFAULT_MAX_PIXELS
from fashionserve.repository import RepositoryError, read_config

Flavour = Literal["python-ort", "onnx", "tensorrt"]
FLAVOURS: tuple[Flavour, ...] = ("python-ort", "onnx", "tensorrt")
BUILD_SETTINGS = "build_settings"
"""The ensemble config parameter holding the settings it was built with (JSON)."""
_CC = re.compile(r"^\d+\.\d+$")


class RepositorySettings(BaseModel):
    """How the ensemble is assembled: flavour, request caps, batching, instances."""

    # protected_namespaces: "model_instances" is named like Triton, not a pydantic method.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    flavour: Flavour = Field(
        default="python-ort",
        description="backend of detector/tagger/embedder: python-ort (ONNX Runtime in the "
        "python backend), onnx (onnxruntime backend) or tensorrt (engines)",
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


def stored_settings(repo: Path) -> RepositorySettings:
    """The settings the repository's ensemble was last built with."""
    config = read_config(Path(repo) / MODEL_NAME)
    if config is None or BUILD_SETTINGS not in config.parameters:
        raise RepositoryError(
            f"{repo} has no ensemble built by this version of `fashionserve repo build`: "
            "run it once first"
        )
    return RepositorySettings.model_validate_json(config.parameters[BUILD_SETTINGS].string_value)
