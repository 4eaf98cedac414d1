"""The client side of the Triton ensemble ``fashion_pipeline``.

The names, shapes and conventions a caller of the ensemble relies on live here, in one
place: the tensor names, how encoded images are packed (:func:`build_inputs`), how the flat
per-garment outputs are split back per image (:func:`parse_outputs`), and how a rejected
image is reported (:func:`parse_rejection`). This module knows nothing of the gateway; the
gateway calls these helpers around ``tritonclient.grpc.aio``; :func:`infer` is a small
synchronous call for scripts, tests and ``fashionserve evaluate``.

Ensemble I/O (M = garments kept over all N images of the request):

* in ``IMAGE_BYTES`` BYTES [N]: encoded JPEG/PNG/WebP images;
* out ``IMAGE_SIZES`` INT32 [N,2] (width, height), ``GARMENT_IMAGE_INDEX`` INT32 [M],
  ``GARMENT_BOXES`` FP32 [M,4] (x1, y1, x2, y2 original-image pixels), ``GARMENT_SCORES``
  FP32 [M], ``GARMENT_CLASSES`` INT32 [M] (index into ``Taxonomy.roots``), ``TAG_LOGITS``
  FP32 [M,L], ``EMBEDDINGS`` FP32 [M,D]. With no garment, M = 1 and that row's image index
  is :data:`DUMMY_INDEX` (Triton cannot feed a ``[0, ...]`` tensor to a model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from fashionserve.errors import InvalidInput

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient

MODEL_NAME = "fashion_pipeline"
"""The ensemble's name in Triton."""

PREPROCESS = "preprocess"
DETECTOR: Final = "detector"
CROP = "crop"
TAGGER: Final = "tagger"
EMBEDDER: Final = "embedder"
STEPS: tuple[str, ...] = (PREPROCESS, DETECTOR, CROP, TAGGER, EMBEDDER)
"""The models the ensemble chains, in order (each is a model of the repository)."""

ModelKind = Literal["detector", "tagger", "embedder"]
MODEL_KINDS: tuple[ModelKind, ...] = (DETECTOR, TAGGER, EMBEDDER)
"""The steps that are trained networks: each has a checkpoint of that kind, exported to
versioned ``<repository>/<kind>/<version>/model.onnx``."""

# The ONNX I/O names of the exported networks (the model contract of fashionserve.models):
# the ensemble's steps map them by these names.
DETECTOR_INPUT = "images"
DETECTOR_OUTPUTS: tuple[str, str, str] = ("boxes", "scores", "classes")
CROP_INPUT = "crops"
TAGGER_OUTPUT = "logits"
EMBEDDER_OUTPUT = "embedding"
MODEL_IO: dict[ModelKind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    DETECTOR: ((DETECTOR_INPUT,), DETECTOR_OUTPUTS),
    TAGGER: ((CROP_INPUT,), (TAGGER_OUTPUT,)),
    EMBEDDER: ((CROP_INPUT,), (EMBEDDER_OUTPUT,)),
}
"""Input and output names of each kind's ONNX graph, in graph order."""

IMAGE_BYTES = "IMAGE_BYTES"
IMAGE_SIZES = "IMAGE_SIZES"
GARMENT_IMAGE_INDEX = "GARMENT_IMAGE_INDEX"
GARMENT_BOXES = "GARMENT_BOXES"
GARMENT_SCORES = "GARMENT_SCORES"
GARMENT_CLASSES = "GARMENT_CLASSES"
TAG_LOGITS = "TAG_LOGITS"
EMBEDDINGS = "EMBEDDINGS"

OUTPUTS: tuple[str, ...] = (
    IMAGE_SIZES,
    GARMENT_IMAGE_INDEX,
    GARMENT_BOXES,
    GARMENT_SCORES,
    GARMENT_CLASSES,
    TAG_LOGITS,
    EMBEDDINGS,
)
"""Every output of the ensemble, in the order a client should request them."""

DUMMY_INDEX = -1
"""Image index of the placeholder row emitted when no garment was kept."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""gRPC message limit for calls to Triton: gRPC's default of 4 MiB is too small for a
request of full-size photos or a response of crops' logits and embeddings."""

GRPC_MAX_MESSAGE_BYTES = 2**31 - 1
"""The largest message limit gRPC accepts (its lengths are C ints): the ceiling of every
limit a server of this package sets."""

GRPC_CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
"""Channel arguments for ``tritonclient.grpc[.aio].InferenceServerClient(channel_args=...)``."""


@dataclass
class Garment:
    """One garment found in an image.

    ``box`` is (x1, y1, x2, y2) in original-image pixels (after EXIF rotation);
    ``detector_class`` indexes ``Taxonomy.roots``; ``logits`` is the tagger row to decode
    with ``Taxonomy.decode``; ``embedding`` is L2-normalised.
    """

    box: tuple[float, float, float, float]
    score: float
    detector_class: int
    logits: np.ndarray = field(repr=False)
    embedding: np.ndarray = field(repr=False)


def build_inputs(images: Sequence[bytes]) -> np.ndarray:
    """Pack encoded images as the ``IMAGE_BYTES`` tensor: an object array of shape [N].

    (``np.array(images, dtype=object)`` would turn equal-length byte strings into a 2-D
    array; filling an empty object array keeps it 1-D.)
    """
    packed = np.empty(len(images), dtype=object)
    for i, data in enumerate(images):
        packed[i] = bytes(data)
    return packed


def parse_outputs(arrays: Mapping[str, np.ndarray], n_images: int) -> list[list[Garment]]:
    """Split the ensemble's flat per-garment outputs into one list per image.

    Rows whose image index is :data:`DUMMY_INDEX` are dropped. Garments keep the order the
    crop step emitted them in (best score first within an image).
    """
    index = np.asarray(arrays[GARMENT_IMAGE_INDEX]).reshape(-1).astype(np.int64)
    boxes = np.asarray(arrays[GARMENT_BOXES], dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(arrays[GARMENT_SCORES], dtype=np.float32).reshape(-1)
    classes = np.asarray(arrays[GARMENT_CLASSES]).reshape(-1)
    logits = np.asarray(arrays[TAG_LOGITS], dtype=np.float32)
    embeddings = np.asarray(arrays[EMBEDDINGS], dtype=np.float32)
    rows = index.shape[0]
    for name, arr in (
        (GARMENT_BOXES, boxes),
        (GARMENT_SCORES, scores),
        (GARMENT_CLASSES, classes),
        (TAG_LOGITS, logits),
        (EMBEDDINGS, embeddings),
    ):
        if arr.shape[0] != rows:
            raise ValueError(f"{name} has {arr.shape[0]} rows, {GARMENT_IMAGE_INDEX} has {rows}")
    per_image: list[list[Garment]] = [[] for _ in range(n_images)]
    for row in range(rows):
        i = int(index[row])
        if i == DUMMY_INDEX:
            continue
        if not 0 <= i < n_images:
            raise ValueError(f"garment row {row} names image {i}, the request had {n_images}")
        x1, y1, x2, y2 = (float(v) for v in boxes[row])
        per_image[i].append(
            Garment(
                box=(x1, y1, x2, y2),
                score=float(scores[row]),
                detector_class=int(classes[row]),
                logits=logits[row],
                embedding=embeddings[row],
            )
        )
    return per_image


# --------------------------------------------------------------------------- rejections
_REJECTION = re.compile(r"(?:image (?P<index>\d+) )?rejected \((?P<reason>[A-Z][A-Z0-9_]*)\): ")


@dataclass(frozen=True)
class Rejection:
    """Why the ensemble refused a request; ``index`` is the offending image, if one."""

    reason: str
    message: str
    index: int | None = None


def format_rejection(reason: str, message: str, index: int | None = None) -> str:
    """The error text the python steps return, e.g.
    ``image 2 rejected (NOT_AN_IMAGE): bytes are not a recognised image``."""
    subject = f"image {index} rejected" if index is not None else "rejected"
    return f"{subject} ({reason}): {message}"


def parse_rejection(error_text: str) -> Rejection | None:
    """Find a step's rejection in an error message from Triton (which may wrap it)."""
    match = _REJECTION.search(error_text)
    if match is None:
        return None
    index = match.group("index")
    return Rejection(
        reason=match.group("reason"),
        message=error_text[match.end() :].strip(),
        index=int(index) if index is not None else None,
    )


class EnsembleRejected(InvalidInput):
    """The ensemble refused the request (bad image, too many images)."""

    def __init__(self, rejection: Rejection, raw: str) -> None:
        super().__init__(raw)
        self.rejection = rejection


# ------------------------------------------------------------------------ sync client
def connect(url: str) -> grpcclient.InferenceServerClient:
    """A ``tritonclient.grpc`` client for ``host:port`` with the message limits raised."""
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)


def make_infer_inputs(images: Sequence[bytes]) -> list[Any]:
    """The ``InferInput`` list for a request (shared with callers of the aio client)."""
    import tritonclient.grpc as grpcclient

    packed = build_inputs(images)
    tensor = grpcclient.InferInput(IMAGE_BYTES, [len(images)], "BYTES")
    tensor.set_data_from_numpy(packed)
    return [tensor]


def infer(
    client: grpcclient.InferenceServerClient,
    images: Sequence[bytes],
    timeout: float | None = 60.0,
    model_name: str = MODEL_NAME,
) -> list[list[Garment]]:
    """Run ``images`` through the ensemble and return the garments of each image.

    Raises :class:`EnsembleRejected` when a step refused the request (the reason and the
    image index are parsed from Triton's error), ``tritonclient.utils.InferenceServerException``
    otherwise.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    try:
        result = client.infer(
            model_name,
            make_infer_inputs(images),
            outputs=outputs,
            client_timeout=timeout,
        )
    except InferenceServerException as exc:
        text = str(exc.message() or exc)
        rejection = parse_rejection(text)
        if rejection is not None:
            raise EnsembleRejected(rejection, text) from exc
        raise
    arrays = {name: result.as_numpy(name) for name in OUTPUTS}
    return parse_outputs(arrays, len(images))


def pipeline_parameters(
    client: grpcclient.InferenceServerClient, model_name: str = MODEL_NAME
) -> dict[str, str]:
    """The ensemble config's ``parameters``: ``taxonomy_hash``, ``taxonomy_version``,
    ``max_images_per_request``, ``max_crops_per_image``, ``min_score``, model versions.

    Written by ``fashionserve repo build``; a client checks the taxonomy hash here before
    decoding logits and sizes its requests from ``max_images_per_request``.
    """
    config = client.get_model_config(model_name).config
    return {key: value.string_value for key, value in config.parameters.items()}
