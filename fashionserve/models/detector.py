"""The garment detector: anchor-free, CenterNet-style, decoded inside the graph.

The network predicts, on a stride-4 grid, a per-class centre heatmap, a box size (log
scale) and a sub-cell centre offset. :meth:`CenterNetDetector.forward` decodes them into a
fixed number ``K`` of boxes per image with ops every runtime has (Sigmoid, MaxPool,
Equal, Mul, TopK, Gather, GatherElements, Exp, Clip): the 3x3 max-pool keeps local peaks,
which replaces NMS, and the constant ``K`` keeps every shape static apart from the batch.
TensorRT runs all of them without plugins. The score threshold is applied downstream (the
crop step), never in the graph, so the output shape never depends on the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fashionserve.models.blocks import Backbone, ConvBNReLU, Normalize, init_weights

STRIDE = 4
# Heat logits start at a 1% prior, so the focal loss does not begin with a flood of
# confident negatives (RetinaNet / CenterNet initialisation).
HEAT_PRIOR = 0.01
# Predicted log-sizes are clipped before exp(): a box can never exceed a few canvases.
MAX_LOG_SIZE = math.log(4096.0 / STRIDE)


class CenterNetDetector(nn.Module):
    """Backbone + top-down feature pyramid to stride 4 + heatmap/size/offset heads.

    ``forward(images)`` takes RGB float32 ``[B, 3, S, S]`` in 0..255 (a letterboxed
    canvas) and returns ``(boxes [B, K, 4] float32 x1,y1,x2,y2 canvas pixels,
    scores [B, K] float32, classes [B, K] int32)`` sorted by score, descending.
    :meth:`heads` returns the raw maps for training.
    """

    cell_class: torch.Tensor
    cell_pixel: torch.Tensor
    grid: torch.Tensor

    def __init__(
        self,
        num_classes: int = 3,
        input_size: int = 256,
        max_detections: int = 16,
        stem: int = 16,
        widths: Sequence[int] = (24, 48, 96, 128),
        depth: int | Sequence[int] = 1,
        neck: int = 48,
    ) -> None:
        super().__init__()
        if input_size % (STRIDE * 2 ** (len(widths) - 1)) != 0:
            raise ValueError(f"input_size {input_size} must divide by the coarsest stride")
        self.num_classes = num_classes
        self.input_size = input_size
        self.max_detections = max_detections
        self.normalize = Normalize()
        self.backbone = Backbone(stem, widths, depth)
        self.lateral = nn.ModuleList(ConvBNReLU(w, neck, 1) for w in widths)
        self.smooth = ConvBNReLU(neck, neck, 3)
        self.head = ConvBNReLU(neck, neck, 3)
        self.heat = nn.Conv2d(neck, num_classes, 1)
        self.size = nn.Conv2d(neck, 2, 1)
        self.offset = nn.Conv2d(neck, 2, 1)
        init_weights(self)
        for conv, bias in (
            (self.heat, -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR)),
            (self.size, 0.0),
            (self.offset, 0.0),
        ):
            nn.init.normal_(conv.weight, std=0.01)
            assert conv.bias is not None
            nn.init.constant_(conv.bias, bias)

        # Decoding tables, constants in the exported graph (not in the state dict): for
        # each flattened (class, y, x) heatmap cell its class and its pixel index, and
        # the (x, y) coordinate of each cell.
        side = input_size // STRIDE
        cells = side * side
        self.register_buffer(
            "cell_class",
            torch.arange(num_classes, dtype=torch.int32).repeat_interleave(cells),
            persistent=False,
        )
        self.register_buffer(
            "cell_pixel",
            torch.arange(cells, dtype=torch.int64).repeat(num_classes),
            persistent=False,
        )
        ys, xs = torch.meshgrid(
            torch.arange(side, dtype=torch.float32),
            torch.arange(side, dtype=torch.float32),
            indexing="ij",
        )
        self.register_buffer("grid", torch.stack([xs, ys]).unsqueeze(0), persistent=False)

    @property
    def output_size(self) -> int:
        """Side of the heatmap grid."""
        return self.input_size // STRIDE

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw maps at stride 4: heat logits ``[B, C, H, W]``, log-size in cells
        ``[B, 2, H, W]`` (w, h), centre offset in cells ``[B, 2, H, W]`` (x, y)."""
        feats = self.backbone(self.normalize(images))
        x = self.lateral[-1](feats[-1])
        for lateral, feat in zip(self.lateral[-2::-1], feats[-2::-1], strict=True):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest") + lateral(feat)
        x = self.head(self.smooth(x))
        return self.heat(x), self.size(x), self.offset(x)

    def decode(
        self, heat_logits: torch.Tensor, size: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Peak picking and box assembly: the in-graph replacement for NMS."""
        heat = torch.sigmoid(heat_logits)
        peaks = F.max_pool2d(heat, 3, stride=1, padding=1)
        heat = heat * (peaks == heat).to(heat.dtype)
        scores, index = torch.topk(heat.flatten(1), self.max_detections, dim=1)
        classes = self.cell_class[index]
        pixel = self.cell_pixel[index]

        wh = torch.exp(torch.clamp(size, max=MAX_LOG_SIZE)) * STRIDE
        centre = (self.grid + offset) * STRIDE
        dense = torch.cat([centre - wh / 2, centre + wh / 2], dim=1).flatten(2)  # [B, 4, HW]
        coords = [torch.gather(dense[:, i], 1, pixel) for i in range(4)]
        boxes = torch.clamp(torch.stack(coords, dim=2), 0.0, float(self.input_size))
        return boxes, scores, classes

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode(*self.heads(images))


# ----------------------------------------------------------------------------- training
def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift that keeps IoU >= ``min_overlap``."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def encode_targets(
    boxes: np.ndarray, classes: np.ndarray, num_classes: int, side: int, max_objects: int
) -> dict[str, np.ndarray]:
    """Training targets for one image.

    ``boxes`` are x1,y1,x2,y2 canvas pixels, ``classes`` root indices. Returns the
    gaussian heatmap ``[C, side, side]`` and, per object (padded to ``max_objects``), its
    centre cell index, log-size in cells, sub-cell offset and a validity mask.
    """
    heat = np.zeros((num_classes, side, side), np.float32)
    index = np.zeros(max_objects, np.int64)
    size = np.zeros((max_objects, 2), np.float32)
    offset = np.zeros((max_objects, 2), np.float32)
    mask = np.zeros(max_objects, np.float32)
    n = 0
    for box, cls in zip(boxes, classes, strict=True):
        x1, y1, x2, y2 = (float(v) / STRIDE for v in box)
        w, h = x2 - x1, y2 - y1
        if w <= 0.25 or h <= 0.25 or n >= max_objects:
            continue
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = min(side - 1, max(0, int(cx))), min(side - 1, max(0, int(cy)))
        radius = max(0, int(gaussian_radius(h, w)))
        draw_gaussian(heat[int(cls)], ix, iy, radius)
        index[n] = iy * side + ix
        size[n] = (math.log(w), math.log(h))
        offset[n] = (cx - ix, cy - iy)
        mask[n] = 1.0
        n += 1
    return {"heat": heat, "index": index, "size": size, "offset": offset, "mask": mask}


def draw_gaussian(heat: np.ndarray, x: int, y: int, radius: int) -> None:
    """Max-blend a gaussian peak of value 1 at ``(x, y)`` into ``heat`` ``[H, W]``."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    r = np.arange(-radius, radius + 1, dtype=np.float32)
    g = np.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma * sigma))
    height, width = heat.shape
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    region = heat[y - top : y + bottom, x - left : x + right]
    patch = g[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(region, patch, out=region)


def focal_loss(heat_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, normalised by the object count."""
    pred = torch.sigmoid(heat_logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg_weight = torch.pow(1 - target, 4)
    pos_loss = torch.log(pred) * torch.pow(1 - pred, 2) * pos
    neg_loss = torch.log(1 - pred) * torch.pow(pred, 2) * neg_weight * (1 - pos)
    num_pos = pos.sum().clamp(min=1.0)
    return -(pos_loss.sum() + neg_loss.sum()) / num_pos


def detector_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    targets: dict[str, torch.Tensor],
    size_weight: float = 1.0,
    offset_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Focal heatmap loss + L1 on log-size and offset at the object centres."""
    heat_logits, size, offset = outputs
    mask = targets["mask"]
    num = mask.sum().clamp(min=1.0)
    index = targets["index"].unsqueeze(1).expand(-1, 2, -1)  # [B, 2, M]
    pred_size = torch.gather(size.flatten(2), 2, index).transpose(1, 2)  # [B, M, 2]
    pred_off = torch.gather(offset.flatten(2), 2, index).transpose(1, 2)
    m = mask.unsqueeze(2)
    l_heat = focal_loss(heat_logits, targets["heat"])
    l_size = (torch.abs(pred_size - targets["size"]) * m).sum() / num
    l_off = (torch.abs(pred_off - targets["offset"]) * m).sum() / num
    total = l_heat + size_weight * l_size + offset_weight * l_off
    return {"loss": total, "heat": l_heat, "size": l_size, "offset": l_off}


def build_detector(arch_params: dict[str, Any]) -> CenterNetDetector:
    """The detector from checkpoint ``arch_params``."""
    return CenterNetDetector(**arch_params)
