"""The checkpoint format: what training produces and export consumes.

A checkpoint is one file written by ``torch.save`` holding a plain dictionary (no pickled
classes, so it loads with ``torch.load(..., weights_only=True)``). The README section
"Checkpoint format" documents it for training teams; this module is its reference reader
and writer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fashionserve.ensemble import MODEL_KINDS, ModelKind
from fashionserve.errors import InvalidInput
from fashionserve.taxonomy import Taxonomy

if TYPE_CHECKING:
    import torch

FORMAT = "fashionserve-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(InvalidInput):
    """A checkpoint file is missing fields, has the wrong format, or does not load."""

    reason = "CHECKPOINT_INVALID"


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``input_size`` is ``(height, width)`` of the model input. Inputs are RGB float32 in
    the 0-255 range, NCHW; the model normalises internally with ``mean``/``std`` (given
    in 0-1 units), so every runtime feeds the same raw pixels.
    """

    kind: ModelKind
    arch: str
    arch_params: dict[str, Any]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    state_dict: dict[str, Any]
    taxonomy: Taxonomy
    training: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> torch.nn.Module:
        """The PyTorch module with the weights loaded, in eval mode."""
        from fashionserve.models import build_model

        model = build_model(self.kind, self.arch, self.arch_params, self.taxonomy)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "arch": {"name": self.arch, "params": self.arch_params},
            "input": {
                "height": self.input_size[0],
                "width": self.input_size[1],
                "channels": "RGB",
                "value_range": [0, 255],
                "mean": list(self.mean),
                "std": list(self.std),
            },
            "taxonomy": self.taxonomy.to_dict(),
            "taxonomy_hash": self.taxonomy.hash,
            # float16 storage halves the file (the demo checkpoints are committed);
            # load_state_dict casts back to the network's float32 parameters.
            "state_dict": {
                k: v.half() if v.is_floating_point() else v for k, v in self.state_dict.items()
            },
            "training": self.training,
        }


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt.to_dict(), tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint file. Raises :class:`CheckpointError`."""
    import torch

    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {data.get('format_version')!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    try:
        kind = data["kind"]
        if kind not in MODEL_KINDS:
            raise CheckpointError(f"{path}: kind {kind!r} is not one of {MODEL_KINDS}")
        taxonomy = Taxonomy.from_dict(data["taxonomy"], f"{path}:taxonomy")
        if data.get("taxonomy_hash") not in (None, taxonomy.hash):
            raise CheckpointError(f"{path}: taxonomy_hash does not match the taxonomy it holds")
        inp = data["input"]
        return Checkpoint(
            kind=kind,
            arch=data["arch"]["name"],
            arch_params=dict(data["arch"].get("params", {})),
            input_size=(int(inp["height"]), int(inp["width"])),
            mean=(float(inp["mean"][0]), float(inp["mean"][1]), float(inp["mean"][2])),
            std=(float(inp["std"][0]), float(inp["std"][1]), float(inp["std"][2])),
            state_dict=data["state_dict"],
            taxonomy=taxonomy,
            training=dict(data.get("training", {})),
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing field {exc}") from exc


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
