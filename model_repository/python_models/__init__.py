"""Sources of the python-backend models.

Each ``*.py`` here except :mod:`steps` is copied into a model version directory as
``model.py``; Triton's python backend imports it there. :mod:`steps` holds the array logic
they run, as plain functions that import nothing from Triton, so it is unit-tested alone.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

ORT_RUNNER = _HERE / "ort_runner.py"
"""ONNX Runtime runner: the ``model.py`` of detector/tagger/embedder in the python-ort flavour."""
PREPROCESS_MODEL = _HERE / "preprocess.py"
"""The ``preprocess`` step: decode, letterbox, source image for the crops."""
CROP_MODEL = _HERE / "crop.py"
"""The ``crop`` step: threshold, cap, map boxes back, cut square crops."""
