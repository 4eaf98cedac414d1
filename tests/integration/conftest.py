"""Real Triton servers for the integration tests, on free loopback ports, always stopped.

Two kinds of model repository:

* ``triton`` serves the trained demo models: each checkpoint of ``checkpoints/`` at the
  repository root (or ``$FASHIONSERVE_CHECKPOINTS``) is exported with
  :func:`fashionserve.export.exporter.export_checkpoint` into a temporary repository and the ensemble is
  built around them. Tests that use it are skipped, saying why, when no checkpoints exist.
* ``oracle_triton`` serves hand-written "oracle" models with the contract's ONNX I/O, so the
  pipeline's geometry is checked exactly with no training: the detector finds the bounding
  box of each of four pure colours in its input; the tagger and embedder report the mean
  colour of the centre of the crop they receive (so a crop cut in the wrong place shows).

``own_triton`` serves the same oracle models with the tagger declaring the packaged
taxonomy, so a gateway accepts to decode them; ``gw`` (one per test module) is a real
``fashionserve gateway`` process in front of it, with the small :data:`LIMITS`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from fashionserve.checkpoint import file_sha256
from fashionserve.ensemble import MODEL_KINDS
from fashionserve.gateway.auth.keys import create_key
from fashionserve.model_repository.build import BuiltRepository, build_repository
from fashionserve.model_repository.python_models import ORT_RUNNER
from fashionserve.model_repository.settings import RepositorySettings
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc
from fashionserve.taxonomy import Taxonomy, load_taxonomy
from fashionserve.triton import TritonServer, prepare_runtime

REPO_ROOT = Path(__file__).resolve().parents[2]

# The oracle detector's garments: one pure colour each (RGB), its class = index % 3.
ORACLE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),
    (40, 180, 60),
    (40, 60, 220),
    (25, 25, 25),
)
ORACLE_DET_SIZE = 256
ORACLE_CROP = 64
ORACLE_LOGITS = load_taxonomy().num_logits  # decodable, though the values mean nothing
ORACLE_DIM = 8
ORACLE_K = 8
ORACLE_MAX_IMAGES = 8


# ---------------------------------------------------------------------- test images
Rect = tuple[tuple[int, int, int, int], int]
"""A garment drawn in a test scene: ((x1, y1, x2, y2), index into ORACLE_COLOURS)."""


@dataclass(frozen=True)
class Oracle:
    """What a test needs to know about the oracle models, and how to draw for them."""

    colours: tuple[tuple[int, int, int], ...] = ORACLE_COLOURS
    max_images: int = ORACLE_MAX_IMAGES

    def scene(
        self, width: int, height: int, rects: list[Rect], fmt: str = "JPEG", rotated: bool = False
    ) -> bytes:
        """A white image with filled rectangles, encoded as ``fmt``.

        ``rotated``: store the pixels turned 90 degrees with EXIF orientation 6, as a phone
        held upright does; decoders that honour EXIF show the scene as drawn.
        """
        image = np.full((height, width, 3), 255, np.uint8)
        for (x1, y1, x2, y2), colour in rects:
            image[y1:y2, x1:x2] = self.colours[colour]
        pil = Image.fromarray(image)
        options: dict[str, object] = {"quality": 95} if fmt == "JPEG" else {}
        if rotated:
            pil = pil.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
            exif = Image.Exif()
            exif[0x0112] = 6
            options["exif"] = exif.tobytes()
        buf = io.BytesIO()
        pil.save(buf, fmt, **options)
        return buf.getvalue()

    def score(self, colour: int) -> float:
        """The oracle detector's score for a garment of that colour (first colour highest)."""
        return 0.9 - 0.05 * colour


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle()


# ------------------------------------------------------------------------ oracle models
def export_oracle_models(repo: Path) -> None:
    """Write detector/tagger/embedder version 1 (ONNX + runner + manifest) into ``repo``."""
    pytest.importorskip("torch", reason="the oracle models are exported with PyTorch")
    import torch
    from torch import nn

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("colours", torch.tensor(ORACLE_COLOURS, dtype=torch.float32))

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            side = images.shape[-1]
            colours: torch.Tensor = self.colours  # type: ignore[assignment]
            diff = (images[:, None] - colours[None, :, :, None, None]).abs().amax(2)
            mask = (diff < 40).float()  # [B, colours, S, S]
            rows, cols = mask.amax(3), mask.amax(2)
            idx = torch.arange(side, dtype=torch.float32)
            far = torch.full_like(rows, float(side))
            zero = torch.zeros_like(rows)
            y1 = torch.where(rows > 0, idx, far).amin(-1)
            y2 = torch.where(rows > 0, idx + 1, zero).amax(-1)
            x1 = torch.where(cols > 0, idx, far).amin(-1)
            x2 = torch.where(cols > 0, idx + 1, zero).amax(-1)
            present = rows.amax(-1)
            n = len(ORACLE_COLOURS)
            scores = present * (0.9 - 0.05 * torch.arange(n, dtype=torch.float32))
            boxes = torch.stack([x1, y1, x2, y2], -1) * present[..., None]
            pad = ORACLE_K - n
            scores = torch.cat([scores, torch.zeros_like(scores[:, :1]).expand(-1, pad)], 1)
            boxes = torch.cat([boxes, torch.zeros_like(boxes[:, :1]).expand(-1, pad, -1)], 1)
            classes = torch.cat([torch.arange(n) % 3, torch.zeros(pad, dtype=torch.long)])
            classes = classes[None].expand(images.shape[0], -1)
            top, order = torch.topk(scores, ORACLE_K, dim=1)
            boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
            return boxes, top, torch.gather(classes, 1, order).to(torch.int32)

    class CentreColour(nn.Module):
        """[mean R, G, B of the crop's central fifth / 255, 1, 0, ...]."""

        def __init__(self, width: int, normalise: bool) -> None:
            super().__init__()
            self.width, self.normalise = width, normalise

        def forward(self, crops: torch.Tensor) -> torch.Tensor:
            lo, hi = int(ORACLE_CROP * 0.4), int(ORACLE_CROP * 0.6)
            mean = crops[:, :, lo:hi, lo:hi].mean((2, 3)) / 255.0
            ones = torch.ones_like(mean[:, :1])
            rest = torch.zeros_like(mean[:, :1]).expand(-1, self.width - 4)
            out = torch.cat([mean, ones, rest], 1)
            return out / out.norm(dim=1, keepdim=True) if self.normalise else out

    models: dict[str, tuple[nn.Module, int, list[str], list[str]]] = {
        "detector": (Detector(), ORACLE_DET_SIZE, ["images"], ["boxes", "scores", "classes"]),
        "tagger": (CentreColour(ORACLE_LOGITS, False), ORACLE_CROP, ["crops"], ["logits"]),
        "embedder": (CentreColour(ORACLE_DIM, True), ORACLE_CROP, ["crops"], ["embedding"]),
    }
    for name, (module, size, inputs, outputs) in models.items():
        version = repo / name / "1"
        version.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
            torch.onnx.export(
                module.eval(),
                (torch.zeros(2, 3, size, size),),
                str(version / "model.onnx"),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
                opset_version=17,
                dynamo=False,
            )
        shutil.copyfile(ORT_RUNNER, version / "model.py")
        manifest = {
            "model": {"name": name, "kind": name, "version": 1},
            "oracle": True,
            "artifacts": {"model.onnx": {"sha256": file_sha256(version / "model.onnx")}},
        }
        (version / "manifest.json").write_text(json.dumps(manifest))


def publish_taxonomy(version_dir: Path, taxonomy: Taxonomy) -> None:
    """Declare ``taxonomy`` in a tagger version's manifest, as an exported tagger does."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["taxonomy"] = {
        "version": taxonomy.version,
        "hash": taxonomy.hash,
        "document": taxonomy.to_dict(),
    }
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


def _oracle_repository(root: Path, *, declare_taxonomy: bool = False, **settings: object) -> Path:
    repo = root / "repository"
    export_oracle_models(repo)
    if declare_taxonomy:
        publish_taxonomy(repo / "tagger" / "1", load_taxonomy())
    build_repository(
        repo,
        RepositorySettings(
            max_images_per_request=ORACLE_MAX_IMAGES,
            preprocess_instances=1,
            max_queue_delay_microseconds=1000,
            **settings,  # type: ignore[arg-type]
        ),
    )
    return repo


def start_triton(repo: Path, log_dir: Path) -> TritonServer:
    """A started server on free loopback ports; its log in ``log_dir/triton.log``."""
    return TritonServer(repo, log_file=log_dir / "triton.log", ready_timeout=120).start()


@pytest.fixture(scope="session")
def triton_runtime() -> Path:
    """The runnable Triton tree (copied from the nvidia-pytriton wheel once)."""
    return prepare_runtime()


@pytest.fixture(scope="session")
def oracle_repository(tmp_path_factory: pytest.TempPathFactory, triton_runtime: Path) -> Path:
    del triton_runtime
    return _oracle_repository(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="session")
def oracle_triton(
    oracle_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """Triton serving the oracle models (8 images per request, 16 crops per image)."""
    server = start_triton(oracle_repository, tmp_path_factory.mktemp("oracle-log"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def capped_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Triton serving the oracle models with at most 2 crops per image."""
    root = tmp_path_factory.mktemp("capped")
    server = start_triton(_oracle_repository(root, max_crops_per_image=2), root)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------ trained models
def checkpoint_dir() -> Path:
    """``$FASHIONSERVE_CHECKPOINTS`` or ``checkpoints/`` at the repository root."""
    return Path(os.environ.get("FASHIONSERVE_CHECKPOINTS") or REPO_ROOT / "checkpoints")


@pytest.fixture(scope="session")
def checkpoints() -> Path:
    """The directory holding detector.pt, tagger.pt and embedder.pt (else the test skips)."""
    source = checkpoint_dir()
    missing = [k for k in MODEL_KINDS if not (source / f"{k}.pt").is_file()]
    if missing:
        pytest.skip(
            f"no trained checkpoints: {source} lacks {', '.join(k + '.pt' for k in missing)} "
            "(commit the demo checkpoints under checkpoints/ or set FASHIONSERVE_CHECKPOINTS)"
        )
    return source


@pytest.fixture(scope="session")
def trained_repository(
    checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> BuiltRepository:
    """The demo checkpoints exported and assembled into a python-ort repository."""
    from fashionserve.export.exporter import export_checkpoint

    source = checkpoints

    repo = tmp_path_factory.mktemp("trained") / "repository"
    for kind in MODEL_KINDS:
        export_checkpoint(source / f"{kind}.pt", repo, echo=None)
    return build_repository(repo, RepositorySettings(max_images_per_request=ORACLE_MAX_IMAGES))


@pytest.fixture(scope="session")
def triton(
    trained_repository: BuiltRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """Triton serving the trained demo models (skipped when there are no checkpoints)."""
    server = start_triton(trained_repository.path, tmp_path_factory.mktemp("trained-log"))
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------- the gateway
# Small limits, so that over-limit inputs stay small.
LIMITS: dict[str, Any] = {
    "max_image_bytes": 1_000_000,
    "max_image_pixels": 4_000_000,
    "max_message_bytes": 2 * 1024 * 1024,
    "max_images_per_batch_request": 8,
    "max_batch_size": 4,
    "max_queue_delay_microseconds": 5000,
    "max_stream_in_flight": 6,
    "health_check_interval_seconds": 0.2,
}
SERVICE = "fashion.v1.FashionAnalysisService"


@dataclass
class Gateway:
    """One ``fashionserve gateway`` process and a channel to it."""

    process: subprocess.Popen[bytes]
    address: str
    key: str
    log: Path
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.FashionAnalysisServiceStub:
        return pb_grpc.FashionAnalysisServiceStub(self.channel)

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        return (("x-api-key", self.key),)

    def health(self, service: str = "") -> int:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)

    def wait_health(self, status: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == status and self.health(SERVICE) == status:
                return
            assert self.process.poll() is None, "gateway died:\n" + self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(
            f"health did not become {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
            f" within {timeout:.0f}s:\n{self.log.read_text()[-4000:]}"
        )

    def analyze(self, data: bytes, **options: Any) -> pb.ImageResult:
        request = pb.AnalyzeRequest(image=pb.Image(data=data), options=pb.AnalyzeOptions(**options))
        return self.stub.Analyze(request, metadata=self.auth, timeout=60).result

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_gateway(triton_url: str | list[str], workdir: Path, **settings: Any) -> Gateway:
    """Start ``fashionserve gateway`` on a free port with a fresh key file, in front of one
    Triton or several."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "keys.yaml"
    key = create_key(keys, "tests")
    config = workdir / "gateway.yaml"
    config.write_text(yaml.safe_dump({**LIMITS, **settings}))
    ready = workdir / "ready.json"
    log = workdir / "gateway.log"
    urls = [triton_url] if isinstance(triton_url, str) else triton_url
    cmd = [
        sys.executable, "-m", "fashionserve.cli", "gateway",
        "--config", str(config),
        "--listen-address", "127.0.0.1:0",
        *(arg for url in urls for arg in ("--triton-url", url)),
        "--api-keys-file", str(keys),
        "--ready-file", str(ready),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASHIONSERVE_GATEWAY_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("gateway did not start:\n" + log.read_text())
        time.sleep(0.05)
    address = json.loads(ready.read_text())["address"]
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ],
    )
    return Gateway(process, address, key, log, channel)


def own_repository(root: Path) -> Path:
    """The conftest's oracle models, the tagger declaring the packaged taxonomy."""
    return _oracle_repository(root, declare_taxonomy=True)


@pytest.fixture(scope="session")
def own_repo(tmp_path_factory: pytest.TempPathFactory, triton_runtime: Path) -> Path:
    del triton_runtime
    return own_repository(tmp_path_factory.mktemp("gateway-oracle"))


@pytest.fixture(scope="session")
def own_triton(own_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = start_triton(own_repo, tmp_path_factory.mktemp("gateway-oracle-log"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gw(own_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway in front of the oracle models, SERVING."""
    gateway = start_gateway(own_triton.grpc_url, tmp_path_factory.mktemp("gw"))
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway
    finally:
        gateway.stop()


@dataclass
class Call:
    """One call of a :class:`Load`."""

    started: float
    ended: float
    code: grpc.StatusCode  # OK for a success
    details: str = ""


@dataclass
class Load:
    """``threads`` clients calling Analyze back to back until stopped; every call recorded
    (``list.append`` is atomic, so the threads need no lock)."""

    gateway: Gateway
    image: bytes
    threads: int = 3
    timeout: float = 10.0  # each call's deadline, seconds
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        request = pb.AnalyzeRequest(image=pb.Image(data=self.image))
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.gateway.stub.Analyze(request, metadata=self.gateway.auth, timeout=self.timeout)
                call = Call(started, time.monotonic(), grpc.StatusCode.OK)
            except grpc.RpcError as err:
                call = Call(started, time.monotonic(), err.code(), err.details() or "")
                time.sleep(0.02)  # a refused call returns at once: do not spin
            self.calls.append(call)

    def __enter__(self) -> Load:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout + 5)

    def failures(self) -> list[Call]:
        return [c for c in self.calls if c.code != grpc.StatusCode.OK]

    def ok(self) -> int:
        return sum(c.code == grpc.StatusCode.OK for c in self.calls)


def error_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None, "the error carries a google.rpc.Status"
    assert len(status.details) == 1, "exactly one ErrorInfo"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "fashionserve"
    return info.reason


def encode(image: Image.Image | np.ndarray, fmt: str, **kw: Any) -> bytes:
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def corrupt_png_that_passes_the_header_checks() -> bytes:
    """A PNG with IEND in place but garbage inside its compressed data: only a full decode
    (Triton's preprocess step) finds out."""
    rng = np.random.default_rng(1)
    data = bytearray(encode((rng.random((200, 300, 3)) * 255).astype(np.uint8), "PNG"))
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4 : at], "big")
    middle = at + 4 + length // 2
    data[middle : middle + 64] = b"\xff" * 64
    return bytes(data)
