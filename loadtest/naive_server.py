"""The naive reference server: what a team would write without this platform.

The three reference PyTorch models in one process behind a plain ``grpcio`` server that
implements the same ``FashionAnalysisService.Analyze``, serving one request at a time:
decode, letterbox, detector, square crops, tagger, embedder, taxonomy decoding. No
batching across requests, no separate model processes, no auth. The benchmark measures
fashionserve against it on the same machine with the same images, so the platform's
claim is a ratio, not an absolute number.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fashionserve.errors import FailedPrecondition
from fashionserve.imaging import ImageDecodeError, decode_image, letterbox, square_crop
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MIN_SCORE = 0.3
DEFAULT_MAX_GARMENTS = 16
"""The same defaults as the served repository (``fashionserve repo build``), so both
servers keep the same garments and do the same work per image."""


class NaivePipeline:
    """The reference models run one image at a time in this process."""

    def __init__(
        self,
        checkpoints: Path,
        min_score: float = DEFAULT_MIN_SCORE,
        max_garments: int = DEFAULT_MAX_GARMENTS,
        device: str = "auto",
    ) -> None:
        import torch

        from fashionserve.checkpoint import load_checkpoint

        self._torch = torch
        # On a GPU host the naive team would use the GPU too: "equal hardware".
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        detector = load_checkpoint(checkpoints / "detector.pt")
        tagger = load_checkpoint(checkpoints / "tagger.pt")
        embedder = load_checkpoint(checkpoints / "embedder.pt")
        self.detector = detector.build_model().to(self.device)
        self.tagger = tagger.build_model().to(self.device)
        self.embedder = embedder.build_model().to(self.device)
        self.detector_size = int(detector.input_size[0])
        self.crop_size = int(tagger.input_size[0])
        self.taxonomy = tagger.taxonomy
        self.min_score = min_score
        self.max_garments = max_garments

    def _tensor(self, images: np.ndarray) -> Any:
        # uint8 NHWC -> float32 NCHW in 0..255: the models normalise internally.
        batch = self._torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return batch.to(self.device).float()

    def analyze(self, data: bytes, options: pb.AnalyzeOptions) -> pb.ImageResult:
        """The garments of one encoded image (raises ``ImageDecodeError`` for bad bytes)."""
        image = decode_image(data)
        height, width = image.shape[:2]
        canvas, placement = letterbox(image, self.detector_size)
        with self._torch.inference_mode():
            boxes, scores, classes = self.detector(self._tensor(canvas[None]))
        boxes_np = boxes[0].cpu().numpy() / placement.scale
        scores_np = scores[0].cpu().numpy()
        classes_np = classes[0].cpu().numpy()
        floor = max(self.min_score, options.min_score)
        cap = min(self.max_garments, options.max_garments or self.max_garments)
        keep = [i for i in np.argsort(-scores_np) if scores_np[i] >= floor][:cap]
        result = pb.ImageResult(width=width, height=height)
        if not keep:
            return result
        kept_boxes = [
            (
                float(np.clip(boxes_np[i, 0], 0, width)),
                float(np.clip(boxes_np[i, 1], 0, height)),
                float(np.clip(boxes_np[i, 2], 0, width)),
                float(np.clip(boxes_np[i, 3], 0, height)),
            )
            for i in keep
        ]
        crops = np.stack([square_crop(image, box, self.crop_size) for box in kept_boxes])
        with self._torch.inference_mode():
            batch = self._tensor(crops)
            logits = self.tagger(batch).cpu().numpy()
            embeddings = self.embedder(batch).cpu().numpy()
        for row, (i, box) in enumerate(zip(keep, kept_boxes, strict=True)):
            decoded = self.taxonomy.decode(
                logits[row], full_tables=options.include_probability_tables
            )
            garment = pb.Garment(
                box=pb.Box(x_min=box[0], y_min=box[1], x_max=box[2], y_max=box[3]),
                normalized_box=pb.Box(
                    x_min=box[0] / width,
                    y_min=box[1] / height,
                    x_max=box[2] / width,
                    y_max=box[3] / height,
                ),
                detector_score=float(scores_np[i]),
                detector_class=self.taxonomy.roots[int(classes_np[i])],
                category_path=[
                    pb.ScoredLabel(name=s.name, probability=s.probability)
                    for s in decoded.category_path
                ],
                tag_groups=[
                    pb.TagGroupResult(
                        group=group,
                        labels=[
                            pb.ScoredLabel(name=s.name, probability=s.probability) for s in labels
                        ],
                    )
                    for group, labels in decoded.tags.items()
                ],
            )
            if options.include_embeddings:
                garment.embedding.extend(embeddings[row].tolist())
            for name, table in decoded.tables.items():
                garment.probability_tables.append(
                    pb.ProbabilityTable(
                        name=name,
                        labels=[pb.ScoredLabel(name=k, probability=v) for k, v in table.items()],
                    )
                )
            result.garments.append(garment)
        return result


class NaiveServicer(pb_grpc.FashionAnalysisServiceServicer):
    """``Analyze`` only; the other RPCs are left unimplemented, as a quick server would."""

    def __init__(self, pipeline: NaivePipeline) -> None:
        self.pipeline = pipeline

    def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.ServicerContext
    ) -> pb.AnalyzeResponse:
        try:
            result = self.pipeline.analyze(request.image.data, request.options)
        except ImageDecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.reason}: {exc}")
        return pb.AnalyzeResponse(result=result)


def create_naive_server(
    pipeline: NaivePipeline, address: str = "127.0.0.1:0"
) -> tuple[grpc.Server, int]:
    """A started server serving one request at a time; returns it and its bound port."""
    server = grpc.server(
        # One worker thread: requests are served strictly one after another, queued by gRPC.
        futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="naive"),
        options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ],
    )
    pb_grpc.add_FashionAnalysisServiceServicer_to_server(NaiveServicer(pipeline), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise FailedPrecondition(f"cannot listen on {address}")
    server.start()
    return server, port


def serve_naive(
    checkpoints: Path,
    address: str = "127.0.0.1:50061",
    ready_file: Path | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    max_garments: int = DEFAULT_MAX_GARMENTS,
    device: str = "auto",
) -> int:
    """Serve until SIGTERM or SIGINT. Writes the bound ``host:port`` to ``ready_file``
    once serving (written aside and renamed, so a reader never sees half of it)."""
    pipeline = NaivePipeline(
        checkpoints, min_score=min_score, max_garments=max_garments, device=device
    )
    server, port = create_naive_server(pipeline, address)
    host = address.rsplit(":", 1)[0]
    log.info("naive server listening on %s:%d (models on %s)", host, port, pipeline.device)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(f"{host}:{port}\n")
        tmp.replace(ready_file)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    return 0
