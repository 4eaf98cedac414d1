"""Triton python-backend model that runs ``model.onnx`` (next to this file) with ONNX Runtime.

This file is copied into each exported model version as ``model.py`` (the python-ort
flavour), so it imports only numpy, onnxruntime and Triton's ``triton_python_backend_utils``:
a version directory is self-contained.

Config ``parameters`` (all optional): ``intra_op_threads`` (default 1) and
``inter_op_threads`` (default 1) for the ONNX Runtime session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = (config.get("parameters") or {}).get(key, {}).get("string_value")
    return str(value) if value not in (None, "") else default


class TritonPythonModel:
    """One ONNX Runtime session per model instance, serving dynamic batches."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        here = Path(__file__).resolve().parent
        model_path = here / "model.onnx"
        if not model_path.is_file():
            # Triton passes the model directory and the version: same place, another route.
            model_path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "1"))
        options.inter_op_num_threads = int(_parameter(config, "inter_op_threads", "1"))
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            os.fspath(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [entry["name"] for entry in config["input"]]
        self.outputs = [
            (entry["name"], pb_utils.triton_string_to_numpy(entry["data_type"]))
            for entry in config["output"]
        ]
        self.output_names = [name for name, _ in self.outputs]
        self.model_name = args.get("model_name", "model")

    def execute(self, requests: list[Any]) -> list[Any]:
        # The python backend hands over the requests of a dynamic batch as a list and does
        # not concatenate them: stack every request's rows, run once, split the rows back.
        try:
            per_input = {
                name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                for name in self.inputs
            }
            rows = [arr.shape[0] for arr in per_input[self.inputs[0]]]
            feeds = {
                name: arrs[0] if len(arrs) == 1 else np.concatenate(arrs, axis=0)
                for name, arrs in per_input.items()
            }
            results = self.session.run(self.output_names, feeds)
        except Exception as exc:
            error = pb_utils.TritonError(f"{self.model_name}: inference failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum(rows)[:-1]
        split = [np.split(result, bounds, axis=0) for result in results]
        responses = []
        for i in range(len(requests)):
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(split[k][i], dtype=dtype))
                for k, (name, dtype) in enumerate(self.outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.session = None
