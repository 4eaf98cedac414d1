"""What Triton loads: the model repository builder, its templates and the python-backend models.

The ensemble and step names below are the contract between :mod:`fashionserve.model_repository.build`
(which writes the configs), the python-backend models and the clients
(:mod:`fashionserve.ensemble`).
"""

from __future__ import annotations

ENSEMBLE = "fashion_pipeline"
PREPROCESS = "preprocess"
CROP = "crop"
DETECTOR = "detector"
TAGGER = "tagger"
EMBEDDER = "embedder"
ONNX_MODELS: tuple[str, ...] = (DETECTOR, TAGGER, EMBEDDER)
"""Models exported from checkpoints (``<repo>/<name>/<version>/model.onnx``)."""
