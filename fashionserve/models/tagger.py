"""The garment tagger: one backbone, one linear head laid out by the taxonomy.

Input: square crops ``[B, 3, C, C]`` (RGB 0..255 from ``imaging.square_crop``). Output:
``logits [B, taxonomy.num_logits]`` in the order of ``taxonomy.layout``: one softmax
segment per category parent and per exclusive tag group, one sigmoid per independent tag.
Decoding (coarse to fine) is the taxonomy's job, not the graph's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fashionserve.models.blocks import Backbone, Normalize
from fashionserve.taxonomy import Taxonomy


class Tagger(nn.Module):
    """Backbone, global average pooling, dropout, one linear layer of ``num_logits``."""

    def __init__(
        self,
        num_logits: int,
        input_size: int = 96,
        stem: int = 24,
        widths: Sequence[int] = (32, 64, 128, 192),
        depth: int | Sequence[int] = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.normalize = Normalize()
        self.backbone = Backbone(stem, widths, depth)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1], num_logits)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        x = self.backbone(self.normalize(crops))[-1]
        x = torch.mean(x, dim=(2, 3))
        return self.fc(self.dropout(x))


def tagger_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, taxonomy: Taxonomy
) -> torch.Tensor:
    """Sum over the layout's segments of the mean per-garment loss.

    Softmax segments (categories, exclusive groups): cross-entropy against the one-hot
    target, counted only for garments whose mask covers the segment (a sleeve softmax
    says nothing about trousers). Independent groups: binary cross-entropy per label,
    masked the same way. ``target`` and ``mask`` come from ``Taxonomy.encode_targets``.
    """
    total = logits.new_zeros(())
    for seg in taxonomy.layout:
        z = logits[:, seg.start : seg.stop]
        t = target[:, seg.start : seg.stop]
        m = mask[:, seg.start : seg.stop]
        if seg.kind == "independent":
            bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
            total = total + (bce * m).sum() / m.sum().clamp(min=1.0)
        else:
            present = m[:, 0]
            ce = -(t * F.log_softmax(z, dim=1)).sum(dim=1)
            total = total + (ce * present).sum() / present.sum().clamp(min=1.0)
    return total


def build_tagger(arch_params: dict[str, Any], taxonomy: Taxonomy) -> Tagger:
    """The tagger from checkpoint ``arch_params``; its head size comes from the taxonomy."""
    params = dict(arch_params)
    num_logits = params.pop("num_logits", taxonomy.num_logits)
    if num_logits != taxonomy.num_logits:
        raise ValueError(
            f"tagger was built for {num_logits} logits, taxonomy {taxonomy.version} "
            f"lays out {taxonomy.num_logits}"
        )
    return Tagger(num_logits, **params)
