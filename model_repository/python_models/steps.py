"""The array logic of the python-backend steps, free of Triton so it is tested alone.

``preprocess`` turns N encoded images into the detector input plus a higher-resolution
"source" canvas per image; ``crop`` keeps the detections worth analysing, maps their boxes
back to original-image pixels and cuts one square crop per garment from the source canvas.
Both canvases are :func:`fashionserve.imaging.letterbox` outputs (image at the top left),
so a canvas point maps back to the original image by dividing by ``size / max(W, H)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fashionserve import ensemble
from fashionserve.errors import InvalidInput
from fashionserve.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_at_least,
    letterbox,
    square_crop,
)

# Tensors passed between the steps inside the ensemble (clients never see these).
DET_INPUT = "DET_INPUT"
SOURCE = "SOURCE"
DET_BOXES = "DET_BOXES"
DET_SCORES = "DET_SCORES"
DET_CLASSES = "DET_CLASSES"
CROPS = "CROPS"

DEFAULT_SOURCE_SIZE = 512
DEFAULT_CROP_MARGIN = 0.1  # the imaging.square_crop default, which training uses
SMALLEST_GARMENT = 0.2
"""The smallest garment whose crops keep full resolution, as a fraction of the image's
longer side: the data set's smallest (its 1st percentile is 0.2); in a phone photo a
garment usually spans far more."""


class StepError(InvalidInput):
    """A request a step refuses. ``reason`` is an UPPER_SNAKE code, ``index`` the image."""

    def __init__(self, reason: str, message: str, index: int | None = None) -> None:
        super().__init__(ensemble.format_rejection(reason, message, index), reason=reason)
        self.index = index
        self.detail = message


@dataclass(frozen=True)
class Preprocessed:
    """``det_input`` FP32 [N,3,S,S] 0..255, ``source`` UINT8 [N,R,R,3],
    ``image_sizes`` INT32 [N,2] (width, height of the upright original image, whatever
    scale it was decoded at)."""

    det_input: np.ndarray
    source: np.ndarray
    image_sizes: np.ndarray


def preprocess_images(
    images: Sequence[bytes],
    det_size: int,
    source_size: int = DEFAULT_SOURCE_SIZE,
    max_images: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 1,
    crop_size: int | None = None,
) -> Preprocessed:
    """Decode and letterbox a request's images, a JPEG at the reduced scale
    :func:`decode_side` allows for ``crop_size`` px crops (no smaller than the source
    canvas when ``crop_size`` is None).

    Raises :class:`StepError` for an empty request, more than ``max_images`` images, or
    the first image that does not decode (its index and reason in the message).
    """
    count = len(images)
    if count == 0:
        raise StepError("NO_IMAGES", "the request holds no image")
    if max_images is not None and count > max_images:
        raise StepError(
            "TOO_MANY_IMAGES",
            f"the request holds {count} images; at most {max_images} are accepted per request",
        )

    min_side = decode_side(det_size, source_size, crop_size)

    def one(index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        try:
            image = decode_at_least(bytes(images[index]), min_side, max_pixels=max_pixels)
        except ImageDecodeError as exc:
            raise StepError(exc.reason, str(exc), index) from exc
        det, box = letterbox(image, det_size)
        src, _ = letterbox(image, source_size)
        return det, src, (box.width, box.height)

    # PIL releases the GIL while decoding and resizing, so threads do run in parallel.
    if threads > 1 and count > 1:
        with ThreadPoolExecutor(min(threads, count)) as pool:
            results = list(pool.map(one, range(count)))
    else:
        results = [one(i) for i in range(count)]
    det_input = np.stack([r[0] for r in results]).transpose(0, 3, 1, 2).astype(np.float32)
    source = np.stack([r[1] for r in results])
    sizes = np.asarray([r[2] for r in results], dtype=np.int32).reshape(count, 2)
    return Preprocessed(np.ascontiguousarray(det_input), source, sizes)


def decode_side(det_size: int, source_size: int, crop_size: int | None) -> int:
    """The longer side a JPEG is decoded to, at least (DCT scaling: 1/2, 1/4, 1/8).

    The detector's canvas is never upscaled: at least ``det_size``. Crops are cut from the
    source canvas, which holds the decoded image resized to ``source_size``, so a garment
    spanning a fraction f of the longer side gets f x (decoded side, at most
    ``source_size``) pixels. Decoding to ``crop_size / SMALLEST_GARMENT`` keeps a crop at
    full resolution down to the smallest garments (the crop margin only adds context, so
    it is left out); decoding larger only adds pixels the crops throw away. With the demo
    models (256 px detector, 96 px crops, 512 px source) that is 480 px: a 12 MP photo
    (4000 px) decodes at 1/8 rather than 1/4: the entropy decoding costs the same at
    both, but a quarter of the pixels are cheaper to convert and resize (30-43 against
    49-55 ms of CPU in all on a busy 2-core machine, 340-400 ms decoded in full:
    ``python -m fashionserve.loadtest.decode_bench``).
    """
    if crop_size is None:
        return max(det_size, source_size)
    return max(det_size, min(source_size, math.ceil(crop_size / SMALLEST_GARMENT)))


@dataclass(frozen=True)
class Garments:
    """The detections kept, over all images of a request, in image order then score order.

    ``image_index`` INT32 [M], ``boxes`` FP32 [M,4] (x1, y1, x2, y2 original-image pixels),
    ``scores`` FP32 [M], ``classes`` INT32 [M].
    """

    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.image_index.shape[0])


def select_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    image_sizes: np.ndarray,
    det_size: int,
    min_score: float,
    max_per_image: int,
) -> Garments:
    """Keep each image's detections with ``score >= min_score`` (best first, at most
    ``max_per_image``), mapped from the detector's letterboxed canvas to original-image
    pixels and clipped to the image. Boxes that are empty after clipping (found in the
    letterbox padding) are dropped before the cap applies.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    classes = np.asarray(classes)
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    n = sizes.shape[0]
    if boxes.shape[:1] != (n,) or scores.shape[:1] != (n,) or classes.shape[:1] != (n,):
        raise StepError(
            "SHAPE_MISMATCH",
            f"detector outputs for {boxes.shape[0]} images, image sizes for {n}",
        )
    idx_out: list[np.ndarray] = []
    box_out: list[np.ndarray] = []
    score_out: list[np.ndarray] = []
    class_out: list[np.ndarray] = []
    for i in range(n):
        width, height = float(sizes[i, 0]), float(sizes[i, 1])
        scale = det_size / max(width, height)
        s = scores[i].reshape(-1)
        order = np.argsort(-s, kind="stable")
        order = order[s[order] >= min_score]
        b = boxes[i].reshape(-1, 4)[order] / scale
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, width)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, height)
        visible = (b[:, 2] - b[:, 0] >= 1.0) & (b[:, 3] - b[:, 1] >= 1.0)
        order, b = order[visible][:max_per_image], b[visible][:max_per_image]
        idx_out.append(np.full(len(order), i, dtype=np.int32))
        box_out.append(b)
        score_out.append(s[order])
        class_out.append(classes[i].reshape(-1)[order].astype(np.int32))
    return Garments(
        np.concatenate(idx_out) if idx_out else np.zeros(0, np.int32),
        np.concatenate(box_out).astype(np.float32) if box_out else np.zeros((0, 4), np.float32),
        np.concatenate(score_out).astype(np.float32) if score_out else np.zeros(0, np.float32),
        np.concatenate(class_out) if class_out else np.zeros(0, np.int32),
    )


def cut_crops(
    source: np.ndarray,
    image_sizes: np.ndarray,
    garments: Garments,
    crop_size: int,
    margin: float = DEFAULT_CROP_MARGIN,
) -> np.ndarray:
    """One square crop per garment, cut from its image's source canvas: FP32 [M,3,C,C] 0..255.

    The source canvas of image ``i`` holds the image scaled by ``R / max(W, H)``, so the
    original-pixel box is scaled the same way before :func:`square_crop` (which pads to a
    square and never stretches, as in training).
    """
    source_size = int(source.shape[1])
    sizes = np.asarray(image_sizes).reshape(-1, 2)
    crops = np.empty((len(garments), 3, crop_size, crop_size), dtype=np.float32)
    for row, (i, box) in enumerate(zip(garments.image_index, garments.boxes, strict=True)):
        r = source_size / float(max(sizes[i]))
        x1, y1, x2, y2 = (float(v) * r for v in box)
        crop = square_crop(source[i], (x1, y1, x2, y2), crop_size, margin=margin)
        crops[row] = crop.transpose(2, 0, 1)
    return crops


def crop_step(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    source: np.ndarray,
    image_sizes: np.ndarray,
    *,
    det_size: int,
    crop_size: int,
    min_score: float,
    max_per_image: int,
    margin: float = DEFAULT_CROP_MARGIN,
) -> dict[str, np.ndarray]:
    """The crop step's outputs by tensor name.

    With no garment kept the outputs hold ONE dummy row whose image index is -1: Triton
    rejects a ``[0, ...]`` tensor fed to the tagger and embedder ("unexpected shape"), and
    clients drop rows with index -1 (:func:`fashionserve.ensemble.parse_outputs`).
    """
    garments = select_detections(
        boxes, scores, classes, image_sizes, det_size, min_score, max_per_image
    )
    if len(garments) == 0:
        return {
            CROPS: np.zeros((1, 3, crop_size, crop_size), np.float32),
            ensemble.GARMENT_IMAGE_INDEX: np.full(1, ensemble.DUMMY_INDEX, np.int32),
            ensemble.GARMENT_BOXES: np.zeros((1, 4), np.float32),
            ensemble.GARMENT_SCORES: np.zeros(1, np.float32),
            ensemble.GARMENT_CLASSES: np.full(1, -1, np.int32),
        }
    return {
        CROPS: cut_crops(source, image_sizes, garments, crop_size, margin),
        ensemble.GARMENT_IMAGE_INDEX: garments.image_index,
        ensemble.GARMENT_BOXES: garments.boxes,
        ensemble.GARMENT_SCORES: garments.scores,
        ensemble.GARMENT_CLASSES: garments.classes,
    }


def config_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a Triton model config (as the python backend passes it, JSON)."""
    raw = model_config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in raw.items()}
