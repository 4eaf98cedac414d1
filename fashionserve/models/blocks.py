"""Small convolutional building blocks shared by the detector, tagger and embedder.

The networks are deliberately plain (3x3 convolutions, BatchNorm, ReLU, nearest
upsampling): every op exports to a standard ONNX op that TensorRT runs without plugins,
and they train in minutes on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)


class Normalize(nn.Module):
    """Maps RGB 0..255 input to ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` (0..1 units, as the checkpoint records them) are buffers, so they
    travel in the state dict and every runtime feeds the same raw pixels.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def set_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the normalisation statistics (0..1 units)."""
        self.mean.copy_(torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def stats(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(mean, std)`` as plain tuples, for the checkpoint."""
        m = [float(v) for v in self.mean.flatten()]
        s = [float(v) for v in self.std.flatten()]
        return (m[0], m[1], m[2]), (s[0], s[1], s[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean * 255.0) / (self.std * 255.0)


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + optional ReLU."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with a shortcut (1x1 conv on a change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(cin, cout, 3, stride)
        self.conv2 = ConvBNReLU(cout, cout, 3, 1, relu=False)
        self.short: nn.Module = (
            ConvBNReLU(cin, cout, 1, stride, relu=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.short(x))


class Backbone(nn.Module):
    """A small ResNet-style feature extractor.

    ``stem`` channels at stride 2, then one stage per entry of ``widths``, each halving the
    resolution (so stage ``i`` runs at stride ``2 ** (i + 2)``) with ``depth`` residual
    blocks (one number for every stage, or one per stage). ``forward`` returns every
    stage's output, finest first.
    """

    def __init__(self, stem: int, widths: Sequence[int], depth: int | Sequence[int] = 1) -> None:
        super().__init__()
        depths = [depth] * len(widths) if isinstance(depth, int) else list(depth)
        if len(depths) != len(widths) or min(depths) < 1:
            raise ValueError(f"depth {depth!r} does not fit {len(widths)} stages")
        self.stem = ConvBNReLU(3, stem, 3, 2)
        stages: list[nn.Module] = []
        cin = stem
        for width, n in zip(widths, depths, strict=True):
            blocks: list[nn.Module] = [ResBlock(cin, width, 2)]
            blocks += [ResBlock(width, width, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, unit BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
