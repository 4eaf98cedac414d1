"""Benchmark of the three models alone: what the accelerator (or CPU) itself sustains.

In one command, with nothing else running::

    python -m fashionserve.loadtest.model_bench [--checkpoints checkpoints] [--device auto]

For each model (detector on its canvas, tagger and embedder on their crops) and each batch
size of the ensemble's dynamic batcher (1, 8, 32, 128), it times the PyTorch forward pass
of the checkpoint: float32, and on a GPU also float16 autocast (the precision the
``tensorrt`` flavour serves). It prints items/s (images for the detector, crops for the
others), the median milliseconds per batch, and the speed-up over the same model's
float32 batch of 1 measured in the same run. The last table combines them into a ceiling
for whole images per second, ``1 / (1/detector + g * (1/tagger + 1/embedder))`` with ``g``
garments per image, before decoding, transfers and the gateway.

This is PyTorch eager, not Triton and not TensorRT: a floor for what the GPU does with
these models (an engine fuses layers that eager launches one by one), and a way to size GPU
nodes where neither Docker nor TensorRT can be had (``scripts/gpu_bench.sh`` needs both
for the served flavours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fashionserve.checkpoint import load_checkpoint
from fashionserve.ensemble import MODEL_KINDS

BATCH_SIZES = (1, 8, 32, 128)
# Garments per image of the demo scenes (`data synth`: 593 garments in 300 test scenes).
GARMENTS_PER_IMAGE = 2.0


@dataclass(frozen=True)
class Row:
    model: str
    precision: str
    batch: int
    items_per_s: float
    ms_per_batch: float
    speedup: float  # over this model's float32 batch of 1, same run


def time_forward(
    model: nn.Module, batch: torch.Tensor, fp16: bool, seconds: float
) -> tuple[float, float]:
    """``(items per second, median ms per batch)`` of ``model(batch)``, each call waited
    for (a served batch is answered only when it is done), after a warm-up."""
    device = batch.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once() -> float:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=fp16):
            model(batch)
        sync()
        return time.perf_counter() - start

    for _ in range(3):
        once()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        times.append(once())
    median = statistics.median(times)
    return len(batch) / median, median * 1000.0


def run(checkpoints: Path, device: torch.device, seconds: float) -> list[Row]:
    """Every model x precision x batch size, in that order."""
    precisions = ["fp32", "fp16-autocast"] if device.type == "cuda" else ["fp32"]
    rows: list[Row] = []
    for kind in MODEL_KINDS:
        model: Any = load_checkpoint(checkpoints / f"{kind}.pt").build_model().eval().to(device)
        side = int(model.input_size)
        reference = 0.0
        for precision in precisions:
            for size in BATCH_SIZES:
                # Pixel values as the ensemble feeds them (float 0..255); the work of these
                # convolutional models does not depend on the content.
                batch = torch.randint(0, 256, (size, 3, side, side), device=device).float()
                ips, ms = time_forward(model, batch, precision != "fp32", seconds)
                reference = reference or ips
                rows.append(Row(kind, precision, size, ips, ms, ips / reference))
                print(f"{kind} {precision} batch {size}: {ips:,.0f}/s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def image_ceiling(rows: list[Row], precision: str, batch: int, garments: float) -> float:
    """Whole images per second when each model runs at ``batch`` in ``precision``."""
    rate = {r.model: r.items_per_s for r in rows if r.precision == precision and r.batch == batch}
    return 1.0 / (
        1.0 / rate["detector"] + garments * (1.0 / rate["tagger"] + 1.0 / rate["embedder"])
    )


def markdown(rows: list[Row], device_name: str, garments: float) -> str:
    lines = [
        f"Device: {device_name}; PyTorch {torch.__version__}.",
        "",
        "| model | precision | batch | items/s | ms per batch | x float32 batch 1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.precision} | {r.batch} | {r.items_per_s:,.0f} | "
            f"{r.ms_per_batch:.2f} | {r.speedup:.1f}x |"
        )
    lines += [
        "",
        f"Whole images per second, models only, {garments:g} garments per image:",
        "",
        "| precision | batch | images/s |",
        "|---|---:|---:|",
    ]
    for precision in dict.fromkeys(r.precision for r in rows):
        for size in BATCH_SIZES:
            lines.append(
                f"| {precision} | {size} | {image_ceiling(rows, precision, size, garments):,.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="timed per row")
    parser.add_argument("--garments-per-image", type=float, default=GARMENTS_PER_IMAGE)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = run(args.checkpoints, device, args.seconds)
    print(markdown(rows, device_name, args.garments_per_image))
    if args.json_out:
        report: dict[str, Any] = {
            "device": device_name,
            "torch": torch.__version__,
            "garments_per_image": args.garments_per_image,
            "rows": [asdict(r) for r in rows],
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
