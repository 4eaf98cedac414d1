"""Triton python-backend model ``preprocess``: N encoded images to detector input and sources.

Copied into the repository as ``preprocess/1/model.py``. Input ``IMAGE_BYTES`` BYTES [N];
outputs ``DET_INPUT`` FP32 [N,3,S,S] (letterboxed, 0..255), ``SOURCE`` UINT8 [N,R,R,3]
(letterboxed at the higher resolution the crops are cut from) and ``IMAGE_SIZES`` INT32
[N,2]. Config parameters: ``detector_input_size`` (S), ``source_size`` (R), ``crop_size``
(what the tagger and embedder take: it sets the scale JPEGs are decoded at),
``max_images_per_request``, ``max_pixels``, ``decode_threads``.
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils

from fashionserve import ensemble
from fashionserve.model_repository.python_models import steps


def _invalid(message: str) -> Any:
    """A client error: INVALID_ARG where this Triton supports error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return (
        pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    )


class TritonPythonModel:
    """Decodes and letterboxes each request's images (one request at a time)."""

    def initialize(self, args: dict[str, str]) -> None:
        params = steps.config_parameters(json.loads(args["model_config"]))
        self.det_size = int(params["detector_input_size"])
        self.source_size = int(params.get("source_size") or steps.DEFAULT_SOURCE_SIZE)
        self.crop_size = int(params["crop_size"]) if params.get("crop_size") else None
        self.max_images = int(params["max_images_per_request"])
        self.max_pixels = int(params.get("max_pixels") or steps.DEFAULT_MAX_PIXELS)
        self.threads = int(params.get("decode_threads") or 1)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, ensemble.IMAGE_BYTES).as_numpy()
                out = steps.preprocess_images(
                    list(raw.reshape(-1)),
                    det_size=self.det_size,
                    source_size=self.source_size,
                    max_images=self.max_images,
                    max_pixels=self.max_pixels,
                    threads=self.threads,
                    crop_size=self.crop_size,
                )
            except steps.StepError as exc:
                responses.append(pb_utils.InferenceResponse(error=_invalid(str(exc))))
                continue
            except Exception as exc:
                error = pb_utils.TritonError(f"preprocess failed: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            tensors = [
                pb_utils.Tensor(steps.DET_INPUT, out.det_input),
                pb_utils.Tensor(steps.SOURCE, out.source),
                pb_utils.Tensor(ensemble.IMAGE_SIZES, out.image_sizes),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
