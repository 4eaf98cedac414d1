"""Triton python-backend model ``crop``: detections to garments and their square crops.

Copied into the repository as ``crop/1/model.py``. Inputs: the detector's ``DET_BOXES``
[N,K,4], ``DET_SCORES`` [N,K], ``DET_CLASSES`` [N,K], preprocess's ``SOURCE`` and
``IMAGE_SIZES``. Outputs ``CROPS`` FP32 [M,3,C,C] and the ``GARMENT_*`` tensors (see
:func:`fashionserve.model_repository.python_models.steps.crop_step`; M = 1 dummy row when nothing is
kept). Config parameters: ``detector_input_size``, ``crop_size``, ``min_score``,
``max_crops_per_image``, ``crop_margin``.
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils

from fashionserve import ensemble
from fashionserve.model_repository.python_models import steps

_INPUTS = (steps.DET_BOXES, steps.DET_SCORES, steps.DET_CLASSES, steps.SOURCE, ensemble.IMAGE_SIZES)
_OUTPUTS = (
    steps.CROPS,
    ensemble.GARMENT_IMAGE_INDEX,
    ensemble.GARMENT_BOXES,
    ensemble.GARMENT_SCORES,
    ensemble.GARMENT_CLASSES,
)


class TritonPythonModel:
    """Thresholds, caps and maps the detections, then cuts the crops (per request)."""

    def initialize(self, args: dict[str, str]) -> None:
        params = steps.config_parameters(json.loads(args["model_config"]))
        self.det_size = int(params["detector_input_size"])
        self.crop_size = int(params["crop_size"])
        self.min_score = float(params["min_score"])
        self.max_per_image = int(params["max_crops_per_image"])
        self.margin = float(params.get("crop_margin") or steps.DEFAULT_CROP_MARGIN)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                boxes, scores, classes, source, sizes = (
                    pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in _INPUTS
                )
                out = steps.crop_step(
                    boxes,
                    scores,
                    classes,
                    source,
                    sizes,
                    det_size=self.det_size,
                    crop_size=self.crop_size,
                    min_score=self.min_score,
                    max_per_image=self.max_per_image,
                    margin=self.margin,
                )
            except Exception as exc:
                error = pb_utils.TritonError(f"crop failed: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensors = [pb_utils.Tensor(name, out[name]) for name in _OUTPUTS]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
