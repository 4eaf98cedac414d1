"""The garment embedder: the re-identification "strong baseline" (BNNeck) recipe.

Backbone, global average pooling, a linear projection to ``D`` (the feature the triplet
loss sees), then BNNeck: a BatchNorm1d whose output feeds the identity classifier during
training and, L2-normalised, is the served embedding. The classifier is not part of the
model: it only exists while training (its size is the number of training products).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fashionserve.models.blocks import Backbone, Normalize


class Embedder(nn.Module):
    """``forward(crops) -> embedding [B, D]``, unit L2 norm."""

    def __init__(
        self,
        input_size: int = 96,
        dim: int = 128,
        stem: int = 24,
        widths: Sequence[int] = (32, 64, 128, 192),
        depth: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.dim = dim
        self.normalize = Normalize()
        self.backbone = Backbone(stem, widths, depth)
        self.project = nn.Linear(widths[-1], dim, bias=False)
        self.bnneck = nn.BatchNorm1d(dim)
        # BNNeck: no shift, so the classifier's hyperplanes pass through the origin and
        # the post-BN feature stays suited to cosine distance (Luo et al., 2019).
        self.bnneck.bias.requires_grad_(False)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)

    def features(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pre-BN feature, post-BN feature)``, both ``[B, D]``, for training."""
        x = self.backbone(self.normalize(crops))[-1]
        feat = self.project(torch.mean(x, dim=(2, 3)))
        return feat, self.bnneck(feat)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(crops)[1], dim=1)


def batch_hard_triplet_loss(
    features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances."""
    dist = torch.cdist(features, features).clamp(min=1e-12)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    hardest_pos = (dist * same.float()).max(dim=1).values
    hardest_neg = (dist + same.float() * 1e6).min(dim=1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def build_embedder(arch_params: dict[str, Any]) -> Embedder:
    """The embedder from checkpoint ``arch_params``."""
    return Embedder(**arch_params)
