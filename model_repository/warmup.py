"""Warm-up: every model but the ensemble runs once on a real sample while Triton loads it.

Each config gets ``model_warmup`` with a rendered garment scene: its JPEG bytes for
preprocess, the letterboxed image for the detector, a garment crop for the tagger and
embedder, the source canvas for the crop step. The data lies in ``<model>/warmup/``. So the
first caller does not pay for lazy initialisation (TensorRT's execution context, ONNX
Runtime's first-run allocations, python imports).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fashionserve.ensemble import CROP, IMAGE_BYTES, IMAGE_SIZES, PREPROCESS
from fashionserve.imaging import decode_image, square_crop
from fashionserve.model_repository.exported import TRITON_TO_NUMPY
from fashionserve.model_repository.python_models import steps
from fashionserve.repository import RepositoryError

WARMUP_DIR = "warmup"


@functools.lru_cache(maxsize=1)
def _sample_scene() -> tuple[bytes, tuple[float, float, float, float]]:
    """One rendered garment scene (JPEG bytes) and its first garment's box."""
    from fashionserve.data.dataset import render_samples

    for sample in render_samples(8, seed=7, splits=("val",)):
        if sample.garments:
            return sample.image, sample.garments[0].box
    raise RepositoryError("the synthetic renderer produced no garment for the warm-up sample")


def warmup_samples(det_size: int, crop_size: int, source_size: int) -> dict[str, Any]:
    """The warm-up inputs, made as serving makes them: the encoded image, the preprocess
    step's outputs for it (detector input ``[3,S,S]``, source canvas, image size) and a
    garment crop ``[3,C,C]``."""
    import numpy as np

    data, box = _sample_scene()
    pre = steps.preprocess_images([data], det_size, source_size)
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
    write_warmup_file(model_dir, input_name, sample.astype(TRITON_TO_NUMPY[data_type]).tobytes())
    return _warmup_block(model_dir.name, 1, [(input_name, data_type, list(dims), input_name)])


def preprocess_warmup(samples: Mapping[str, Any] | None) -> str:
    """The ``model_warmup`` block of ``preprocess`` (its file is written with the model)."""
    if samples is None:
        return ""
    # TYPE_STRING warm-up data: each element is a 4-byte little-endian length, then bytes.
    return _warmup_block(PREPROCESS, 1, [(IMAGE_BYTES, "TYPE_STRING", [1], IMAGE_BYTES)])


def crop_warmup(
    enabled: bool, detections: int, source_size: int, types: tuple[str, str, str]
) -> str:
    """The ``model_warmup`` block of ``crop`` (its files are written with the model)."""
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
            (steps.DET_BOXES, types[0], [1, k, 4], None),
            (steps.DET_SCORES, types[1], [1, k], None),
            (steps.DET_CLASSES, types[2], [1, k], None),
            (steps.SOURCE, "TYPE_UINT8", [1, source_size, source_size, 3], steps.SOURCE),
            (IMAGE_SIZES, "TYPE_INT32", [1, 2], IMAGE_SIZES),
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


def write_warmup_file(model_dir: Path, name: str, data: bytes) -> None:
    """Write ``<model>/warmup/<name>`` atomically."""
    folder = model_dir / WARMUP_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / name)
