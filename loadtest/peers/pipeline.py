"""The fashion pipeline in one process, for the serving stacks fashionserve is compared with.

It runs the exported model repository's own ONNX files with ONNX Runtime and the project's
own step code, so a peer does exactly the work Triton's ensemble and the gateway do:
preprocess (:func:`~fashionserve.model_repository.python_models.steps.preprocess_images`),
detector, crop (:func:`~fashionserve.model_repository.python_models.steps.crop_step`),
tagger and embedder, then the gateway's taxonomy decoding
(:func:`~fashionserve.gateway.results.assemble_result`) and its protobuf shaping. Every
setting (input sizes, score floor, crop cap and margin, pixel limit, taxonomy) is read from
the repository the ensemble was built from. Nothing here knows the serving stack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fashionserve import ensemble
from fashionserve.errors import Error, FailedPrecondition
from fashionserve.gateway.results import ImageOutput, assemble_result
from fashionserve.gateway.servicer import result_to_pb
from fashionserve.gateway.validation import ValidatedOptions, validate_options
from fashionserve.model_repository.python_models import steps
from fashionserve.model_repository.settings import stored_settings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.repository import ensemble_versions, read_config
from fashionserve.taxonomy import Taxonomy


@dataclass(frozen=True)
class PipelineSpec:
    """What the pipeline runs, read from a built model repository (picklable: a serving
    stack ships it to its worker processes)."""

    onnx: dict[str, Path]
    det_size: int
    source_size: int
    crop_size: int
    crop_margin: float
    min_score: float
    max_crops_per_image: int
    max_pixels: int
    taxonomy: dict[str, Any]
    taxonomy_hash: str

    @classmethod
    def from_repository(cls, repo: Path) -> PipelineSpec:
        """The spec of the versions ``repo``'s ensemble calls."""
        repo = Path(repo)
        settings = stored_settings(repo)
        versions = ensemble_versions(repo)
        onnx = {
            kind: repo / kind / str(versions[kind]) / "model.onnx"
            for kind in ("detector", "tagger", "embedder")
        }
        pipeline = read_config(repo / ensemble.MODEL_NAME)
        crop = read_config(repo / ensemble.CROP)
        assert pipeline is not None and crop is not None  # stored_settings read the first
        params = {k: v.string_value for k, v in pipeline.parameters.items()}
        crop_params = {k: v.string_value for k, v in crop.parameters.items()}
        return cls(
            onnx=onnx,
            det_size=int(crop_params["detector_input_size"]),
            source_size=settings.source_size,
            crop_size=int(crop_params["crop_size"]),
            crop_margin=settings.crop_margin,
            min_score=float(params["min_score"]),
            max_crops_per_image=int(params["max_crops_per_image"]),
            max_pixels=settings.max_pixels,
            taxonomy=json.loads(params["taxonomy_document"]),
            taxonomy_hash=params["taxonomy_hash"],
        )


class Pipeline:
    """The pipeline's ONNX Runtime sessions and taxonomy, serving batches of requests."""

    def __init__(self, spec: PipelineSpec, threads: int = 1) -> None:
        import onnxruntime as ort

        self.spec = spec
        self.threads = threads
        self.taxonomy = Taxonomy.from_dict(spec.taxonomy, "the repository's taxonomy_document")
        if self.taxonomy.hash != spec.taxonomy_hash:  # as the gateway refuses to decode
            raise FailedPrecondition(
                f"the repository's taxonomy hashes to {self.taxonomy.hash}, its ensemble "
                f"declares {spec.taxonomy_hash}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.sessions = {
            kind: ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
            for kind, path in spec.onnx.items()
        }

    def _run(self, kind: str, feed: np.ndarray) -> list[np.ndarray]:
        session = self.sessions[kind]
        return list(session.run(None, {session.get_inputs()[0].name: feed}))

    def analyze(self, requests: Sequence[pb.AnalyzeRequest]) -> list[pb.AnalyzeResponse | Error]:
        """One answer per request, in order: its response, or the error that refused it (a
        bad image or option refuses only its own request)."""
        checked = list(self._pool.map(self._check, requests))
        accepted = [i for i, c in enumerate(checked) if not isinstance(c, Error)]
        answers: list[pb.AnalyzeResponse | Error] = [
            c if isinstance(c, Error) else pb.AnalyzeResponse() for c in checked
        ]
        ready = [c for c in checked if not isinstance(c, Error)]
        if ready:
            results = self._infer([r[0] for r in ready], [r[1] for r in ready])
            for i, result in zip(accepted, results, strict=True):
                answers[i] = pb.AnalyzeResponse(result=result)
        return answers

    def _check(
        self, request: pb.AnalyzeRequest
    ) -> tuple[steps.Preprocessed, ValidatedOptions] | Error:
        # One image at a time (PIL releases the GIL, so the pool's threads decode in
        # parallel), so that a bad image refuses only its own request.
        o = request.options
        try:
            options = validate_options(
                o.min_score,
                o.max_garments,
                o.include_embeddings,
                o.include_probability_tables,
                max_garments_cap=self.spec.max_crops_per_image,
            )
            image = steps.preprocess_images(
                [request.image.data],
                det_size=self.spec.det_size,
                source_size=self.spec.source_size,
                max_pixels=self.spec.max_pixels,
            )
        except Error as exc:
            return exc
        return image, options

    def _infer(
        self, parts: list[steps.Preprocessed], options: list[ValidatedOptions]
    ) -> list[pb.ImageResult]:
        det_input = np.concatenate([p.det_input for p in parts])
        source = np.concatenate([p.source for p in parts])
        sizes = np.concatenate([p.image_sizes for p in parts])
        boxes, scores, classes = self._run("detector", det_input)
        crops = steps.crop_step(
            boxes,
            scores,
            classes,
            source,
            sizes,
            det_size=self.spec.det_size,
            crop_size=self.spec.crop_size,
            min_score=self.spec.min_score,
            max_per_image=self.spec.max_crops_per_image,
            margin=self.spec.crop_margin,
        )
        arrays = dict(crops)
        arrays[ensemble.TAG_LOGITS] = self._run("tagger", crops[steps.CROPS])[0]
        arrays[ensemble.EMBEDDINGS] = self._run("embedder", crops[steps.CROPS])[0]
        garments = ensemble.parse_outputs(arrays, len(parts))
        return [
            result_to_pb(
                assemble_result(
                    ImageOutput(int(sizes[i, 0]), int(sizes[i, 1]), garments[i]),
                    self.taxonomy,
                    options[i],
                )
            )
            for i in range(len(parts))
        ]


def same_answers(ours: pb.ImageResult, theirs: pb.ImageResult) -> str | None:
    """Why two answers for one image differ (``None`` when they agree): the same garments
    (count, detector class, box) with the same top category, in the same order.

    The two stacks batch differently, and ONNX Runtime's results differ in the last digits
    with the batch size; a box is found on the detector's small canvas (256 px) and scaled
    up to the photo, so it may move by a fraction of a canvas pixel: 0.5% of the image's
    longer side (at least 1 px)."""
    tolerance = max(1.0, 0.005 * max(ours.width, ours.height))
    if (ours.width, ours.height) != (theirs.width, theirs.height):
        return f"image size {ours.width}x{ours.height} != {theirs.width}x{theirs.height}"
    if len(ours.garments) != len(theirs.garments):
        return f"{len(ours.garments)} garments != {len(theirs.garments)}"
    for n, (a, b) in enumerate(zip(ours.garments, theirs.garments, strict=True)):
        top_a = a.category_path[0].name if a.category_path else ""
        top_b = b.category_path[0].name if b.category_path else ""
        if (a.detector_class, top_a) != (b.detector_class, top_b):
            return f"garment {n}: {a.detector_class}/{top_a} != {b.detector_class}/{top_b}"
        box_a = (a.box.x_min, a.box.y_min, a.box.x_max, a.box.y_max)
        box_b = (b.box.x_min, b.box.y_min, b.box.x_max, b.box.y_max)
        if max(abs(x - y) for x, y in zip(box_a, box_b, strict=True)) > tolerance:
            return f"garment {n}: box {box_a} != {box_b}"
    return None
