"""The deterministic synthetic garment data set: seeded scenes of garments with labels.

No pretrained weights or public data sets can be downloaded where this project is built,
so the demo models learn from scenes rendered here. Every garment is a rendering of a
*product* from a fixed catalog: a leaf category, the taxonomy's tags (colour, pattern,
sleeve, details) and product-specific looks (exact shade, pattern scale, angle and phase,
proportions, a small distinctive mark). Each rendering changes pose, scale, deformation,
background, occlusion and lighting, so the same product can be retrieved across scenes.

Splits (``out/<split>/images/*.jpg`` plus a COCO-style ``out/<split>/labels.json``):

* ``train``: ``images`` cluttered scenes with 0 to 4 garments (about 8% empty);
* ``val``: the same kind of scenes, different draws, same catalog;
* ``gallery``: one "shop" image per product (alone, centred, plain light background);
* ``query``: one "street" scene per product, with that product and maybe one more.

Rendering is a pure function of ``(seed, split, image index)``: each image draws from its
own ``numpy`` Generator, so the output is byte-identical for a seed whatever the number of
worker processes.

The renderer is designed for small CNNs at low resolution (a 256 px letterbox for the
detector, 96 px square crops for the tagger and embedder): every leaf category has a
distinct silhouette, sleeve lengths are drawn unmistakably, colours stay inside their
name's region, and patterns and details are sized relative to the garment so that they
survive a 96 px crop.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from fashionserve.taxonomy import Taxonomy

SPLITS = ("train", "val", "query", "gallery")
_SPLIT_CODE = {"train": 1, "val": 2, "query": 3, "gallery": 4}

EMPTY_FRACTION = 0.08
"""Share of train and val scenes with no garment (negatives for the detector)."""

MIN_TRAIN_OCCURRENCES = 3
"""Every product appears at least this many times in train."""

MAX_HIDDEN = 0.28
"""At most this share of a garment's own pixels may be covered by later layers."""

Pt = tuple[float, float]
RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------- vocabulary
# What the renderer can draw. A taxonomy may use any subset of these names; a name outside
# them cannot be rendered truthfully, so synthesize() refuses it.
LEAF_ROOTS = {
    "shirt": "top",
    "t-shirt": "top",
    "sweater": "top",
    "blazer": "top",
    "trousers": "bottom",
    "skirt": "bottom",
    "shorts": "bottom",
    "dress": "full-body",
    "jumpsuit": "full-body",
    "coat": "full-body",
}

# Colour name -> (hue range, saturation range, value range) in HSV. The ranges are far
# apart so that the per-product shade jitter never crosses into another colour name, and
# lighting changes in a scene (about +-12%) do not either.
_COLOURS: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "black": ((0.0, 1.0), (0.0, 0.15), (0.07, 0.15)),
    "white": ((0.0, 1.0), (0.0, 0.05), (0.91, 0.97)),
    "red": ((-0.012, 0.012), (0.78, 0.9), (0.72, 0.86)),
    "blue": ((0.585, 0.63), (0.68, 0.85), (0.62, 0.8)),
    "green": ((0.3, 0.37), (0.62, 0.8), (0.48, 0.64)),
    "yellow": ((0.135, 0.155), (0.78, 0.9), (0.92, 0.99)),
    "pink": ((0.92, 0.96), (0.32, 0.45), (0.93, 1.0)),
    "grey": ((0.0, 1.0), (0.0, 0.05), (0.46, 0.56)),
}
_PATTERNS = ("plain", "striped", "dotted", "checked", "floral")
_SLEEVES = ("sleeveless", "short", "long")
_DETAILS = ("buttons", "pockets", "hood", "bow")
_KNOWN_GROUPS = {"colour": _COLOURS, "pattern": _PATTERNS, "sleeve": _SLEEVES, "details": _DETAILS}

# Plausible sleeve lengths per leaf, with weights (a coat always has long sleeves).
_SLEEVE_PRIOR: dict[str, dict[str, float]] = {
    "shirt": {"long": 0.6, "short": 0.4},
    "t-shirt": {"short": 0.6, "sleeveless": 0.25, "long": 0.15},
    "sweater": {"long": 0.8, "sleeveless": 0.2},
    "blazer": {"long": 1.0},
    "dress": {"sleeveless": 0.4, "short": 0.3, "long": 0.3},
    "jumpsuit": {"sleeveless": 0.35, "short": 0.35, "long": 0.3},
    "coat": {"long": 1.0},
}
# Details that make sense per leaf; each is drawn with probability _DETAIL_P.
_DETAIL_ALLOWED: dict[str, tuple[str, ...]] = {
    "shirt": ("buttons", "pockets", "bow"),
    "t-shirt": ("buttons", "pockets", "hood", "bow"),
    "sweater": ("buttons", "pockets", "hood", "bow"),
    "blazer": ("buttons", "pockets"),
    "trousers": ("buttons", "pockets", "bow"),
    "skirt": ("buttons", "pockets", "bow"),
    "shorts": ("buttons", "pockets", "bow"),
    "dress": ("buttons", "pockets", "bow"),
    "jumpsuit": ("buttons", "pockets", "hood", "bow"),
    "coat": ("buttons", "pockets", "hood"),
}
_DETAIL_P = 0.3


# -------------------------------------------------------------------------------- catalog
@dataclass(frozen=True)
class Product:
    """One catalogued product: what it is (labels) and how it looks (render parameters)."""

    id: int
    leaf: str
    path: tuple[str, ...]
    tags: dict[str, Any]  # group -> label (exclusive) or list of labels (independent)
    colour: str
    pattern: str
    sleeve: str | None  # None: no sleeves drawn (bottoms)
    details: tuple[str, ...]
    rgb: RGB
    look: dict[str, float] = field(default_factory=dict)  # proportions, pattern, mark


def _hsv_rgb(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(colour: str, rng: np.random.Generator) -> RGB:
    (h0, h1), (s0, s1), (v0, v1) = _COLOURS[colour]
    return _hsv_rgb(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


def _check_taxonomy(taxonomy: Taxonomy) -> None:
    problems = [f"leaf category {leaf!r}" for leaf in taxonomy.leaves if leaf not in LEAF_ROOTS]
    for group in taxonomy.groups:
        known = _KNOWN_GROUPS.get(group.name)
        if known is None:
            problems.append(f"tag group {group.name!r}")
            continue
        problems += [f"{group.name} label {lbl!r}" for lbl in group.labels if lbl not in known]
    if problems:
        raise ValueError(
            "the synthetic renderer cannot draw: " + ", ".join(problems) + f" (it draws leaves "
            f"{sorted(LEAF_ROOTS)} and groups { {k: list(v) for k, v in _KNOWN_GROUPS.items()} })"
        )


def _make_catalog(taxonomy: Taxonomy, count: int, seed: int) -> list[Product]:
    """``count`` products, leaves in turn; (colour, pattern) pairs distinct within a leaf
    until the pairs run out, so most products differ from each other in their labels."""
    rng = np.random.default_rng([seed, 0, 1])
    groups = {g.name: g for g in taxonomy.groups}
    colours = list(groups["colour"].labels) if "colour" in groups else ["grey"]
    patterns = list(groups["pattern"].labels) if "pattern" in groups else ["plain"]
    leaves = taxonomy.leaves
    combos: dict[str, list[tuple[str, str]]] = {}
    for leaf in leaves:
        # Walk the (colour, pattern) grid diagonally in a shuffled order: any run of
        # consecutive products of a leaf spreads evenly over colours and patterns, and the
        # pairs only repeat once every pair has been used.
        pc = rng.permutation(len(colours))
        pp = rng.permutation(len(patterns))
        pairs = []
        for k in range(len(colours) * len(patterns)):
            shift = k // math.lcm(len(colours), len(patterns))
            pairs.append((colours[pc[k % len(colours)]], patterns[pp[(k + shift) % len(patterns)]]))
        combos[leaf] = pairs
    products: list[Product] = []
    for i in range(count):
        leaf = leaves[i % len(leaves)]
        path = taxonomy.path(leaf)
        colour, pattern = combos[leaf][(i // len(leaves)) % len(combos[leaf])]
        sleeve: str | None = None
        sleeve_group = groups.get("sleeve")
        sleeve_applies = sleeve_group is not None and taxonomy.group_applies(sleeve_group, path)
        if LEAF_ROOTS[leaf] != "bottom":
            prior = _SLEEVE_PRIOR[leaf]
            labels = [s for s in prior if sleeve_group is None or s in sleeve_group.labels]
            if not labels:
                labels = list(sleeve_group.labels) if sleeve_group else ["long"]
            weights = np.array([prior.get(s, 1.0) for s in labels])
            sleeve = labels[int(rng.choice(len(labels), p=weights / weights.sum()))]
        details: list[str] = []
        detail_group = groups.get("details")
        if detail_group is not None and taxonomy.group_applies(detail_group, path):
            details = [
                d
                for d in detail_group.labels
                if d in _DETAIL_ALLOWED[leaf] and rng.random() < _DETAIL_P
            ]
        tags: dict[str, Any] = {}
        for group in taxonomy.groups:
            if not taxonomy.group_applies(group, path):
                continue
            if group.name == "colour":
                tags["colour"] = colour
            elif group.name == "pattern":
                tags["pattern"] = pattern
            elif group.name == "sleeve" and sleeve_applies and sleeve is not None:
                tags["sleeve"] = sleeve
            elif group.name == "details":
                tags["details"] = list(details)
        prng = np.random.default_rng([seed, 0, 2, i])
        products.append(
            Product(
                id=i + 1,
                leaf=leaf,
                path=tuple(path),
                tags=tags,
                colour=colour,
                pattern=pattern,
                sleeve=sleeve,
                details=tuple(details),
                rgb=_shade(colour, prng),
                look=_look(prng),
            )
        )
    return products


def _look(rng: np.random.Generator) -> dict[str, float]:
    """Product-specific appearance: fixed for the product, drawn once."""
    u = rng.uniform
    return {
        "length": u(0.92, 1.08),
        "width": u(0.93, 1.07),
        "neck": u(0.14, 0.19),
        "flare": u(0.0, 1.0),
        "angle": u(-4.0, 4.0),
        "v_neck": float(rng.random() < 0.4),
        "pleats": float(rng.random() < 0.4),
        "belt": float(rng.random() < 0.4),
        "period": u(0.2, 0.28),  # pattern period, in pattern units
        "duty": u(0.38, 0.5),
        "pattern_angle": float(rng.choice([0.0, 90.0, 45.0, -45.0]) + u(-8.0, 8.0)),
        "phase_x": u(0.0, 1.0),
        "phase_y": u(0.0, 1.0),
        "flower_seed": float(rng.integers(0, 2**31)),
        "mark_shape": float(rng.integers(0, 5)),
        "mark_u": u(0.2, 0.8),
        "mark_v": u(0.25, 0.75),
        "mark_size": u(0.09, 0.13),
        "mark_hue": u(0.0, 1.0),
        "mark_value": u(0.0, 1.0),
    }


# ------------------------------------------------------------------------------- geometry
@dataclass
class _Geometry:
    """A garment drawn as commands in garment units (x right, y down).

    ``cmds`` are ``(op, data, style)``: op ``poly`` (points), ``ellipse`` (cx, cy, rx, ry)
    or ``line`` (points). Style ``body`` parts make up the silhouette (mask); the other
    styles paint over the texture. ``region`` is where the product mark may go.
    """

    cmds: list[tuple[str, Any, str]] = field(default_factory=list)
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def poly(self, pts: Sequence[Pt], style: str = "body") -> None:
        self.cmds.append(("poly", [tuple(p) for p in pts], style))

    def mirror_poly(self, pts: Sequence[Pt], style: str = "body") -> None:
        """The polygon and its mirror image across x = 0."""
        self.poly(pts, style)
        self.poly([(-x, y) for x, y in pts], style)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, style: str) -> None:
        self.cmds.append(("ellipse", (cx, cy, rx, ry), style))

    def line(self, pts: Sequence[Pt], style: str = "seam") -> None:
        self.cmds.append(("line", [tuple(p) for p in pts], style))

    def extent(self) -> tuple[float, float, float, float]:
        xs: list[float] = []
        ys: list[float] = []
        for op, data, style in self.cmds:
            if style != "body":
                continue
            if op == "poly":
                xs += [p[0] for p in data]
                ys += [p[1] for p in data]
            elif op == "ellipse":
                cx, cy, rx, ry = data
                xs += [cx - rx, cx + rx]
                ys += [cy - ry, cy + ry]
        return min(xs), min(ys), max(xs), max(ys)


def _arc(x0: float, x1: float, y_side: float, y_mid: float, n: int = 7) -> list[Pt]:
    """Points from (x0, y_side) to (x1, y_side) bulging to y_mid in the middle."""
    pts = []
    for k in range(n):
        t = k / (n - 1)
        pts.append((x0 + (x1 - x0) * t, y_side + (y_mid - y_side) * math.sin(math.pi * t)))
    return pts


def _sleeve(
    g: _Geometry,
    shoulder: Pt,
    armpit: Pt,
    kind: str,
    angle_deg: float,
    length: float,
    cuff: float,
    cuff_style: str | None,
) -> None:
    """A sleeve on each side from the armhole (shoulder..armpit), pointing down and out."""
    th = math.radians(angle_deg)
    dx, dy = math.sin(th), math.cos(th)
    nx, ny = math.cos(th), -math.sin(th)
    mx, my = (shoulder[0] + armpit[0]) / 2, (shoulder[1] + armpit[1]) / 2
    cx, cy = mx + dx * length, my + dy * length
    outer = (cx + nx * cuff, cy + ny * cuff)
    inner = (cx - nx * cuff, cy - ny * cuff)
    g.mirror_poly([shoulder, outer, inner, armpit])
    if cuff_style is not None:
        band = 0.1 if kind == "long" else 0.05
        bo = (outer[0] - dx * band, outer[1] - dy * band)
        bi = (inner[0] - dx * band, inner[1] - dy * band)
        g.mirror_poly([bo, outer, inner, bi], cuff_style)


def _neck(g: _Geometry, nw: float, v_neck: bool, depth: float = 0.1) -> None:
    # The back of the neck is part of the silhouette; the opening shows the inside.
    g.poly([(-nw - 0.02, -0.03), (nw + 0.02, -0.03), (nw + 0.02, 0.02), (-nw - 0.02, 0.02)])
    if v_neck:
        g.poly([(-nw, -0.0), (nw, -0.0), (0.0, depth * 2.6)], "inner")
    else:
        g.ellipse(0.0, 0.0, nw, depth, "inner")


def _hood(g: _Geometry, nw: float) -> None:
    g.ellipse(0.0, -0.07, nw + 0.15, 0.25, "body")
    g.ellipse(0.0, -0.05, nw + 0.03, 0.17, "inner")


def _bow(g: _Geometry, x: float, y: float, size: float = 1.0) -> None:
    w, h = 0.17 * size, 0.1 * size
    g.poly([(x, y), (x - w, y - h), (x - w, y + h)], "accent")
    g.poly([(x, y), (x + w, y - h), (x + w, y + h)], "accent")
    g.poly(
        [
            (x - 0.035, y - 0.045),
            (x + 0.035, y - 0.045),
            (x + 0.035, y + 0.045),
            (x - 0.035, y + 0.045),
        ],
        "accent",
    )


def _buttons(g: _Geometry, x: float, y0: float, y1: float, n: int, r: float = 0.05) -> None:
    for k in range(n):
        y = y0 + (y1 - y0) * k / max(1, n - 1)
        g.ellipse(x, y, r, r, "button")


def _pocket(g: _Geometry, x: float, y: float, w: float, h: float, flap: bool = False) -> None:
    g.poly([(x - w / 2, y), (x + w / 2, y), (x + w / 2, y + h), (x - w / 2, y + h)], "pocket")
    if flap:
        g.poly(
            [
                (x - w / 2 - 0.01, y - 0.01),
                (x + w / 2 + 0.01, y - 0.01),
                (x + w / 2 + 0.01, y + h * 0.35),
                (x - w / 2 - 0.01, y + h * 0.35),
            ],
            "flap",
        )
    else:
        g.line([(x - w / 2, y + 0.035), (x + w / 2, y + 0.035)], "stitch")


def _rib_lines(g: _Geometry, x0: float, x1: float, y0: float, y1: float, step: float) -> None:
    n = int((x1 - x0) / step)
    for k in range(1, n):
        x = x0 + k * step
        g.line([(x, y0), (x, y1)], "rib")


def _geometry(p: Product) -> _Geometry:
    """The drawing of a product, in units of its shoulder (or waist) width."""
    look = p.look
    g = _Geometry()
    lj, wj, nw = look["length"], look["width"], look["neck"]
    details = set(p.details)
    sleeve = p.sleeve or "long"
    leaf = p.leaf
    if leaf in ("shirt", "t-shirt", "sweater", "blazer"):
        length = {"shirt": 1.32, "t-shirt": 1.05, "sweater": 1.12, "blazer": 1.3}[leaf] * lj
        hw = {"shirt": 0.5, "t-shirt": 0.52, "sweater": 0.54, "blazer": 0.54}[leaf] * wj
        sy, ay = 0.07, 0.42
        if "hood" in details:
            _hood(g, nw)
        if sleeve != "sleeveless":
            long_angle = {"sweater": 24.0, "blazer": 22.0}.get(leaf, 27.0) + look["angle"]
            if sleeve == "long":
                cuff_style = {"sweater": "band", "shirt": "flap", "blazer": None}.get(leaf)
                _sleeve(
                    g,
                    (hw, sy),
                    (hw * 0.97, ay),
                    "long",
                    long_angle,
                    length * 0.9,
                    0.13 if leaf == "sweater" else 0.1,
                    cuff_style,
                )
            else:
                _sleeve(
                    g,
                    (hw, sy),
                    (hw * 0.97, ay),
                    "short",
                    58.0 + look["angle"],
                    0.3,
                    0.16,
                    "band" if leaf == "sweater" else None,
                )
            shoulder: list[Pt] = [(-nw, 0.0), (-hw, sy), (-hw * 0.97, ay)]
        else:
            # A tank top: narrow straps, then a scooped armhole out to the armpit.
            strap = nw + 0.1
            shoulder = [
                (-nw, 0.0),
                (-strap, 0.0),
                (-strap - 0.015, 0.13),
                (-strap - 0.05, 0.25),
                (-hw * 0.84, ay - 0.06),
                (-hw * 0.97, ay),
            ]
        if leaf == "shirt":
            hh = hw * 0.96
            hem = [
                (-hh, length - 0.12),
                *_arc(-hh * 0.75, hh * 0.75, length - 0.06, length + 0.04),
                (hh, length - 0.12),
            ]
            left = [*shoulder]
        elif leaf == "sweater":
            hh = hw * 0.84
            hem = [(-hh, length - 0.13), (-hh, length), (hh, length), (hh, length - 0.13)]
            left = [*shoulder, (-hw * 1.03, length - 0.15)]
        elif leaf == "blazer":
            hh = hw * 0.94
            hem = [
                (-hh, length),
                (-0.05, length),
                (0.0, length - 0.05),
                (0.05, length),
                (hh, length),
            ]
            left = [*shoulder, (-hw * 0.86, length * 0.62)]
        else:  # t-shirt
            hh = hw
            hem = [(-hh, length), (hh, length)]
            left = [*shoulder]
        right = [(-x, y) for x, y in reversed(left)]
        g.poly([*left, *hem, *right])
        if leaf == "shirt":
            g.ellipse(0.0, 0.0, nw, 0.07, "inner")
            g.poly(
                [(-0.035, 0.02), (0.035, 0.02), (0.035, length + 0.035), (-0.035, length + 0.035)],
                "body",
            )
            g.mirror_poly([(-nw - 0.03, -0.04), (0.0, 0.03), (-0.06, 0.25), (-nw - 0.09, 0.13)])
            top_button = 0.12
        elif leaf == "blazer":
            depth = 0.55
            g.poly([(-nw, 0.0), (nw, 0.0), (0.0, depth)], "shirt")
            g.mirror_poly(
                [
                    (-nw, -0.01),
                    (-0.02, depth + 0.02),
                    (-0.22, depth * 0.6),
                    (-0.3, 0.22),
                    (-0.21, 0.17),
                    (-nw - 0.05, -0.01),
                ]
            )
            g.line([(0.0, depth), (0.0, length - 0.05)])
            top_button = depth + 0.08
        elif leaf == "sweater":
            if "hood" not in details:
                g.ellipse(0.0, 0.0, nw + 0.06, 0.14, "band")
                g.ellipse(0.0, 0.0, nw, 0.085, "inner")
            g.poly([(-hh, length - 0.13), (hh, length - 0.13), (hh, length), (-hh, length)], "band")
            _rib_lines(g, -hh, hh, length - 0.13, length, 0.055)
            top_button = 0.2
        else:
            if "hood" not in details:
                _neck(g, nw, bool(look["v_neck"]))
                g.line([(-hh, length - 0.05), (hh, length - 0.05)], "stitch")
            top_button = 0.16
        if "pockets" in details:
            if leaf in ("blazer",):
                _pocket(g, -0.3, length * 0.68, 0.26, 0.14, flap=True)
                _pocket(g, 0.3, length * 0.68, 0.26, 0.14, flap=True)
            elif leaf == "sweater":
                g.poly(
                    [
                        (-0.28, length * 0.55),
                        (0.28, length * 0.55),
                        (0.34, length - 0.15),
                        (-0.34, length - 0.15),
                    ],
                    "pocket",
                )
            else:
                _pocket(g, 0.24, 0.3, 0.22, 0.22)
        if "buttons" in details:
            _buttons(g, 0.0, top_button, length - 0.12, 5 if leaf == "shirt" else 4, 0.055)
        if "bow" in details:
            _bow(g, 0.0, 0.1 if leaf != "shirt" else 0.05)
        g.region = (-hw * 0.7, 0.25, hw * 0.7, length * 0.9)
    elif leaf in ("trousers", "shorts", "skirt"):
        wb = 0.1
        g.poly([(-0.5, 0.0), (0.5, 0.0), (0.5, wb), (-0.5, wb)])
        if leaf == "skirt":
            length = (1.0 + 0.45 * look["flare"]) * lj
            hem_w = (0.82 + 0.18 * look["flare"]) * wj
            g.poly(
                [
                    (-0.5, wb),
                    (0.5, wb),
                    (hem_w, length - 0.06),
                    *_arc(hem_w, -hem_w, length - 0.06, length + 0.04),
                    (-hem_w, length - 0.06),
                ]
            )
            if look["pleats"]:
                for k in range(-3, 4):
                    g.line([(0.12 * k, wb), (0.12 * k * hem_w / 0.5, length)], "stitch")
            if "pockets" in details:
                _pocket(g, -0.33, 0.3, 0.22, 0.22)
                _pocket(g, 0.33, 0.3, 0.22, 0.22)
            if "buttons" in details:
                _buttons(g, 0.0, 0.25, length - 0.15, 5, 0.055)
            g.region = (-0.45, 0.2, 0.45, length * 0.8)
        else:
            short = leaf == "shorts"
            length = (0.95 if short else 2.5) * lj
            crotch = 0.62 if short else 0.82
            outer = (0.64 if short else 0.47 + 0.06 * look["flare"]) * wj
            inner = 0.08 if short else 0.13
            g.poly(
                [
                    (-0.5, wb),
                    (0.5, wb),
                    (0.54, 0.4),
                    (outer, length),
                    (inner, length),
                    (0.0, crotch),
                    (-inner, length),
                    (-outer, length),
                    (-0.54, 0.4),
                ]
            )
            g.line([(0.0, wb), (0.0, crotch * 0.8)])
            g.line([(0.0, crotch * 0.8), (0.1, crotch * 0.68), (0.1, wb)], "stitch")
            if short:
                g.poly(
                    [
                        (outer - 0.03, length - 0.1),
                        (inner, length - 0.1),
                        (inner, length),
                        (outer, length),
                    ],
                    "flap",
                )
                g.poly(
                    [
                        (-outer + 0.03, length - 0.1),
                        (-inner, length - 0.1),
                        (-inner, length),
                        (-outer, length),
                    ],
                    "flap",
                )
            else:
                g.line([(0.28, 0.45), (0.28 + 0.3 * (outer - 0.5), length)], "stitch")
                g.line([(-0.28, 0.45), (-0.28 - 0.3 * (outer - 0.5), length)], "stitch")
            if "pockets" in details:
                y = 0.3 if short else 1.05
                _pocket(g, -0.3, y, 0.24, 0.26, flap=not short)
                _pocket(g, 0.3, y, 0.24, 0.26, flap=not short)
            if "buttons" in details:
                _buttons(g, 0.0, 0.05, crotch * 0.62, 3, 0.055)
            g.region = (-0.4, 0.2, 0.4, crotch * 0.9 if short else length * 0.8)
        if "bow" in details:
            _bow(g, 0.0, 0.05)
    else:  # full body: dress, jumpsuit, coat
        hw = {"dress": 0.44, "jumpsuit": 0.47, "coat": 0.56}[leaf] * wj
        sy = 0.06
        ay = 0.45 if leaf == "coat" else 0.38
        if leaf == "coat":
            sleeve = "long"
        if "hood" in details:
            _hood(g, nw)
        if sleeve != "sleeveless":
            if sleeve == "long":
                angle = (18.0 if leaf == "coat" else 22.0) + look["angle"]
                _sleeve(
                    g,
                    (hw, sy),
                    (hw * 0.98, ay),
                    "long",
                    angle,
                    1.15 if leaf == "coat" else 0.95,
                    0.14 if leaf == "coat" else 0.1,
                    "flap" if leaf == "coat" else None,
                )
            else:
                _sleeve(
                    g, (hw, sy), (hw * 0.98, ay), "short", 52.0 + look["angle"], 0.28, 0.15, None
                )
            shoulder = [(-nw, 0.0), (-hw, sy), (-hw * 0.98, ay)]
        else:
            strap = nw + 0.08
            shoulder = [
                (-nw, 0.0),
                (-strap, 0.0),
                (-strap - 0.015, 0.12),
                (-strap - 0.04, 0.23),
                (-hw * 0.84, ay - 0.06),
                (-hw * 0.97, ay),
            ]
        if leaf == "dress":
            waist = 0.8
            length = (2.2 + 0.3 * look["flare"]) * lj
            hem_w = (0.8 + 0.25 * look["flare"]) * wj
            left = [*shoulder, (-0.33 * wj, waist)]
            g.poly([*left, *[(-x, y) for x, y in reversed(left)]])
            g.poly(
                [
                    (-0.33 * wj, waist),
                    (0.33 * wj, waist),
                    (hem_w, length - 0.08),
                    *_arc(hem_w, -hem_w, length - 0.08, length + 0.04),
                    (-hem_w, length - 0.08),
                ]
            )
            if look["pleats"]:
                for k in range(-2, 3):
                    g.line([(0.12 * k, waist), (0.12 * k * hem_w / 0.33, length)], "stitch")
            if "hood" not in details:
                _neck(g, nw, bool(look["v_neck"]), 0.12)
            if "pockets" in details:
                _pocket(g, -0.42, 1.15, 0.24, 0.26)
                _pocket(g, 0.42, 1.15, 0.24, 0.26)
            if "buttons" in details:
                _buttons(g, 0.0, 0.3 if look["v_neck"] else 0.2, waist - 0.06, 4, 0.05)
            if "bow" in details:
                _bow(g, 0.0, waist)
            g.region = (-0.3, 0.25, 0.3, length * 0.8)
        elif leaf == "jumpsuit":
            waist, crotch = 0.9, 1.45
            length = 2.55 * lj
            outer, inner = 0.46 * wj, 0.13
            left = [
                *shoulder,
                (-0.4 * wj, waist),
                (-0.48 * wj, 1.2),
                (-outer, length),
                (-inner, length),
                (0.0, crotch),
            ]
            g.poly([*left, *[(-x, y) for x, y in reversed(left[:-1])]])
            g.poly(
                [
                    (-0.41 * wj, waist - 0.05),
                    (0.41 * wj, waist - 0.05),
                    (0.42 * wj, waist + 0.05),
                    (-0.42 * wj, waist + 0.05),
                ],
                "band",
            )
            if "hood" not in details:
                _neck(g, nw, bool(look["v_neck"]))
            g.line([(0.0, 0.2), (0.0, crotch)])
            if "pockets" in details:
                _pocket(g, -0.2, 0.28, 0.2, 0.2)
                _pocket(g, 0.2, 0.28, 0.2, 0.2)
                _pocket(g, -0.27, 1.6, 0.22, 0.25, flap=True)
                _pocket(g, 0.27, 1.6, 0.22, 0.25, flap=True)
            if "buttons" in details:
                _buttons(g, 0.0, 0.22, waist - 0.1, 4, 0.05)
            if "bow" in details:
                _bow(g, 0.0, waist)
            g.region = (-0.3, 0.2, 0.3, length * 0.8)
        else:  # coat
            length = (2.0 + 0.25 * look["flare"]) * lj
            hem_w = 0.64 * wj
            left = [*shoulder, (-hem_w, length)]
            g.poly([*left, *[(-x, y) for x, y in reversed(left)]])
            depth = 0.6
            g.poly([(-nw, 0.0), (nw, 0.0), (0.0, depth)], "inner")
            g.mirror_poly(
                [
                    (-nw, -0.04),
                    (-0.03, depth + 0.03),
                    (-0.26, depth * 0.62),
                    (-0.36, 0.22),
                    (-0.25, 0.16),
                    (-nw - 0.1, -0.05),
                ]
            )
            g.line([(0.08, depth), (0.08, length)])
            if look["belt"]:
                g.poly(
                    [(-hw * 1.02, 0.95), (hw * 1.02, 0.95), (hw * 1.04, 1.07), (-hw * 1.04, 1.07)],
                    "band",
                )
            if "pockets" in details:
                _pocket(g, -0.34, 1.3, 0.3, 0.2, flap=True)
                _pocket(g, 0.34, 1.3, 0.3, 0.2, flap=True)
            if "buttons" in details:
                _buttons(g, -0.1, depth + 0.08, 1.3, 4, 0.055)
                _buttons(g, 0.26, depth + 0.08, 1.3, 4, 0.055)
            g.region = (-0.35, 0.7, 0.35, length * 0.85)
    return g


# -------------------------------------------------------------------------------- texture
def _luma(rgb: Sequence[float]) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0


def _secondary(p: Product) -> RGB:
    """The pattern's second colour: a tone of the base, so the colour name stays clear
    (a lighter tint on black, red, blue and green; a darker shade on the light colours)."""
    if p.colour == "black":
        return _tint(p.rgb, 0.5)
    if p.colour in ("blue", "green", "red"):
        return _tint(p.rgb, 0.62)
    return _scaled(p.rgb, 0.5 if _luma(p.rgb) > 0.5 else 0.42)


def _scaled(rgb: RGB, k: float) -> RGB:
    return (round(rgb[0] * k), round(rgb[1] * k), round(rgb[2] * k))


def _tint(rgb: RGB, k: float) -> RGB:
    """``rgb`` moved a share ``k`` of the way to white."""
    return (
        round(rgb[0] + (255 - rgb[0]) * k),
        round(rgb[1] + (255 - rgb[1]) * k),
        round(rgb[2] + (255 - rgb[2]) * k),
    )


def _outline_rgb(p: Product) -> RGB:
    # Seams on a near-black garment are drawn lighter, or they would vanish.
    return (110, 110, 115) if _luma(p.rgb) < 0.22 else _scaled(p.rgb, 0.42)


def _accent_rgb(p: Product) -> RGB:
    return (32, 30, 34) if _luma(p.rgb) > 0.5 else (238, 236, 228)


def _texture(
    p: Product, size: tuple[int, int], scale: float, origin: Pt, unit: float
) -> Image.Image:
    """Base colour, pattern and soft shading over the whole patch (the mask cuts it)."""
    w, h = size
    look = p.look
    ys = ((np.arange(h, dtype=np.float32) - origin[1]) / (scale * unit))[:, None]
    xs = ((np.arange(w, dtype=np.float32) - origin[0]) / (scale * unit))[None, :]
    period = look["period"]
    base = np.array(p.rgb, np.float32)
    sec = np.array(_secondary(p), np.float32)
    amount: np.ndarray | None = None
    if p.pattern == "striped":
        th = math.radians(look["pattern_angle"])
        t = (xs * math.cos(th) + ys * math.sin(th)) / period + look["phase_x"]
        amount = ((t - np.floor(t)) < look["duty"]).astype(np.float32)
    elif p.pattern == "checked":
        tx = xs / (period * 1.1) + look["phase_x"]
        ty = ys / (period * 1.1) + look["phase_y"]
        a = ((tx - np.floor(tx)) < 0.45).astype(np.float32)
        b = ((ty - np.floor(ty)) < 0.45).astype(np.float32)
        amount = 0.55 * a + 0.55 * b - 0.1 * a * b
    elif p.pattern == "dotted":
        step = period * 1.15
        tx = xs / step + look["phase_x"]
        ty = ys / step + look["phase_y"]
        row = np.floor(ty)
        fx = tx + 0.5 * (row % 2) - np.floor(tx + 0.5 * (row % 2)) - 0.5
        fy = ty - row - 0.5
        amount = ((fx * fx + fy * fy) < 0.3**2).astype(np.float32)
    tex = (
        np.broadcast_to(base, (h, w, 3)).copy()
        if amount is None
        else (base + (sec - base) * amount[..., None])
    )
    # Soft light and folds: cloth is never flat.
    shade = 1.0 + 0.07 * (xs - ys) / 3.0 + 0.04 * np.sin(xs * 5.0 + ys * 2.0 + look["phase_y"] * 6)
    tex = np.clip(tex * shade[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(tex, "RGB")
    if p.pattern == "floral":
        _flowers(img, p, scale * unit, origin, _secondary(p))
    return img.convert("RGBA")


def _flowers(img: Image.Image, p: Product, px_per_unit: float, origin: Pt, petal: RGB) -> None:
    """Five-petal flowers on a jittered grid fixed per product (same layout every time)."""
    frng = np.random.default_rng(int(p.look["flower_seed"]))
    draw = ImageDraw.Draw(img)
    w, h = img.size
    step = p.look["period"] * 1.35
    radius = step * 0.36
    centre = _accent_rgb(p) if p.colour not in ("yellow",) else (200, 80, 40)
    ncols = int(w / (step * px_per_unit)) + 3
    nrows = int(h / (step * px_per_unit)) + 3
    jitter = frng.uniform(-0.22, 0.22, (nrows, ncols, 2))
    rot = frng.uniform(0, 2 * math.pi, (nrows, ncols))
    x_first = math.floor(-origin[0] / (step * px_per_unit)) - 1
    y_first = math.floor(-origin[1] / (step * px_per_unit)) - 1
    r_px = radius * px_per_unit
    pr = r_px * 0.45
    for i in range(nrows):
        for j in range(ncols):
            # Grid cells are indexed from the garment origin, so the layout does not depend
            # on the patch size of this rendering.
            gi, gj = (y_first + i), (x_first + j)
            jx, jy = jitter[gi % nrows, gj % ncols]
            cx = origin[0] + (gj + 0.5 * (gi % 2) + jx) * step * px_per_unit
            cy = origin[1] + (gi + jy) * step * px_per_unit
            if cx < -r_px or cy < -r_px or cx > w + r_px or cy > h + r_px:
                continue
            a0 = rot[gi % nrows, gj % ncols]
            for k in range(5):
                a = a0 + k * 2 * math.pi / 5
                px, py = cx + math.cos(a) * r_px * 0.55, cy + math.sin(a) * r_px * 0.55
                draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=petal)
            cr = r_px * 0.3
            draw.ellipse((cx - cr, cy - cr, cx + cr, cy + cr), fill=centre)


# ------------------------------------------------------------------------------ rendering
@dataclass
class _Worker:
    """Per-process state: the catalog and each product's geometry (drawn once)."""

    out: Path
    seed: int
    products: dict[int, Product]
    geometry: dict[int, _Geometry] = field(default_factory=dict)
    noise_bank: np.ndarray | None = None

    def geo(self, pid: int) -> _Geometry:
        if pid not in self.geometry:
            self.geometry[pid] = _geometry(self.products[pid])
        return self.geometry[pid]

    def noise(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        """Gaussian noise ``[h, w]`` int16 with a random strength: a random window of a
        fixed bank (drawing fresh normals per pixel was a tenth of the render time)."""
        if self.noise_bank is None:
            bank_rng = np.random.default_rng([self.seed, 0, 3])
            self.noise_bank = bank_rng.standard_normal((2 * _NOISE_SIDE,) * 2, np.float32)
        y = int(rng.integers(0, 2 * _NOISE_SIDE - h))
        x = int(rng.integers(0, 2 * _NOISE_SIDE - w))
        sigma = rng.uniform(1.0, 6.0)
        return (self.noise_bank[y : y + h, x : x + w] * sigma).astype(np.int16)


_STATE: _Worker | None = None
_NOISE_SIDE = 656  # > the largest image side


def _init_worker(out: str, seed: int, products: list[Product]) -> None:
    global _STATE
    _STATE = _Worker(Path(out), seed, {p.id: p for p in products})


def _garment_patch(state: _Worker, pid: int, long_px: float) -> Image.Image:
    """The product drawn upright as RGBA, its longer side ``long_px`` pixels."""
    p = state.products[pid]
    g = state.geo(pid)
    x0, y0, x1, y1 = g.extent()
    ext_w, ext_h = x1 - x0, y1 - y0
    s = long_px / max(ext_w, ext_h)
    pad = 2
    size = (math.ceil(ext_w * s) + 2 * pad, math.ceil(ext_h * s) + 2 * pad)
    ox, oy = pad - x0 * s, pad - y0 * s
    unit = max(ext_w, ext_h) / 2.0

    def px(pts: Sequence[Pt]) -> list[Pt]:
        return [(ox + x * s, oy + y * s) for x, y in pts]

    mask = Image.new("L", size, 0)
    mdraw = ImageDraw.Draw(mask)
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    dark = (*_outline_rgb(p), 255)
    accent = (*_accent_rgb(p), 255)
    ow = max(1, round(s * 0.022))
    inner_rgb = _scaled(p.rgb, 0.55)
    if _luma(p.rgb) <= 0.22:
        inner_rgb = (55, 55, 58)
    shirt_rgb = (236, 236, 230) if p.colour != "white" else (70, 75, 95)
    fills: dict[str, tuple[int, int, int, int]] = {
        "body": (0, 0, 0, 0),
        "inner": (*inner_rgb, 255),
        "shirt": (*shirt_rgb, 255),
        "band": (0, 0, 0, 50),
        "pocket": (0, 0, 0, 30),
        "flap": (0, 0, 0, 45),
        "accent": accent,
        "button": accent,
    }
    for op, data, style in g.cmds:
        if op == "line":
            colour = (*dark[:3], 120) if style in ("rib", "stitch") else dark
            width = max(1, round(ow * (0.7 if style != "seam" else 1.0)))
            odraw.line(px(data), fill=colour, width=width)
            continue
        fill = fills[style]
        if op == "poly":
            pts = px(data)
            if style == "body":
                mdraw.polygon(pts, fill=255)
            odraw.polygon(pts, fill=fill, outline=dark, width=ow)
        else:
            cx, cy, rx, ry = data
            box = (ox + (cx - rx) * s, oy + (cy - ry) * s, ox + (cx + rx) * s, oy + (cy + ry) * s)
            if style == "body":
                mdraw.ellipse(box, fill=255)
            odraw.ellipse(box, fill=fill, outline=dark, width=ow)
    _mark(odraw, p, g, px, s)
    tex = _texture(p, size, s, (ox, oy), unit)
    img = Image.alpha_composite(tex, overlay)
    img.putalpha(mask)
    return img


def _mark(
    draw: ImageDraw.ImageDraw,
    p: Product,
    g: _Geometry,
    px: Callable[[Sequence[Pt]], list[Pt]],
    s: float,
) -> None:
    """The product's small distinctive mark (a logo), always at the same spot."""
    look = p.look
    rx0, ry0, rx1, ry1 = g.region
    cx = rx0 + (rx1 - rx0) * look["mark_u"]
    cy = ry0 + (ry1 - ry0) * look["mark_v"]
    r = look["mark_size"] / 2
    value = 0.95 if _luma(p.rgb) < 0.5 else 0.3
    colour = _hsv_rgb(look["mark_hue"], 0.8, value)
    shape = int(look["mark_shape"])
    if shape == 0:
        (x0, y0), (x1, y1) = px([(cx - r, cy - r), (cx + r, cy + r)])
        draw.ellipse((x0, y0, x1, y1), fill=colour)
        return
    if shape == 1:
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == 2:
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif shape == 3:
        pts = [(cx, cy - r * 1.2), (cx + r, cy), (cx, cy + r * 1.2), (cx - r, cy)]
    else:
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r * (1.2 if k % 2 == 0 else 0.5)
            pts.append((cx + math.cos(a) * rr, cy + math.sin(a) * rr))
    draw.polygon(px(pts), fill=colour)


def _homography(src: np.ndarray, dst: np.ndarray) -> tuple[float, ...]:
    """Coefficients of the perspective transform taking ``src`` points to ``dst`` points."""
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return tuple(_solve(rows, rhs))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gauss-Jordan elimination with partial pivoting (8x8: no need for LAPACK threads in
    forked workers)."""
    n = len(b)
    m = [[float(v) for v in row] + [float(r)] for row, r in zip(a, b, strict=True)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        pv = m[col][col]
        m[col] = [v / pv for v in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col]
                m[r] = [v - f * w for v, w in zip(m[r], m[col], strict=True)]
    return [m[r][n] for r in range(n)]


def _deform(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Small rotation, shear, anisotropic scale and perspective warp of a garment patch."""
    w, h = img.size
    th = math.radians(rng.uniform(-14, 14) * strength)
    shear = rng.uniform(-0.12, 0.12) * strength
    sx = 1.0 + rng.uniform(-0.1, 0.1) * strength
    sy = 1.0 + rng.uniform(-0.1, 0.1) * strength
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64) - [w / 2, h / 2]
    lin = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]) @ np.array(
        [[sx, shear], [0.0, sy]]
    )
    dst = corners @ lin.T
    dst += rng.uniform(-0.05, 0.05, (4, 2)) * strength * np.array([w, h])
    dst -= dst.min(axis=0) - 1.0
    out_w, out_h = (math.ceil(v) + 1 for v in dst.max(axis=0))
    # PIL maps output pixels back to input pixels: solve for dst -> src.
    coef = _homography(dst, corners + np.array([w / 2, h / 2]))
    return img.transform(
        (out_w, out_h), Image.Transform.PERSPECTIVE, coef, resample=Image.Resampling.BILINEAR
    )


def _tight(img: Image.Image) -> Image.Image:
    """Crop an RGBA patch to its visible pixels (alpha > 127)."""
    alpha = img.getchannel("A").point(lambda v: 255 if v > 127 else 0)
    box = alpha.getbbox()
    return img.crop(box) if box else img


# ----------------------------------------------------------------------- backgrounds, clutter
def _random_rgb(rng: np.random.Generator, muted: bool = False) -> RGB:
    h = rng.random()
    s = rng.uniform(0.0, 0.35) if muted else rng.uniform(0.0, 0.9)
    v = rng.uniform(0.3, 0.95)
    return _hsv_rgb(h, s, v)


def _background(w: int, h: int, rng: np.random.Generator, plain: bool = False) -> Image.Image:
    """A gradient, panels or a wall-and-floor split; or a plain light shop backdrop.

    Computed at a quarter of the size and enlarged: it is smooth, and this is the largest
    array an image needs.
    """
    sw, sh = max(2, w // 4), max(2, h // 4)
    ys = np.linspace(0, 1, sh, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, sw, dtype=np.float32)[None, :]
    if plain:
        tone = np.array(rng.uniform(228, 250) + rng.uniform(-4, 4, 3), np.float32)
        arr = tone - (ys * rng.uniform(0, 12))[..., None] + xs[..., None] * 0
    else:
        c0 = np.array(_random_rgb(rng, muted=rng.random() < 0.7), np.float32)
        c1 = np.array(_random_rgb(rng, muted=rng.random() < 0.7), np.float32)
        th = rng.uniform(0, 2 * math.pi)
        t = np.clip((xs * math.cos(th) + ys * math.sin(th)) * 0.7 + 0.5 - 0.35, 0, 1)
        kind = rng.integers(0, 3)
        if kind == 1:  # floorboards / wall panels
            n = rng.integers(4, 12)
            bands = np.floor((xs if rng.random() < 0.5 else ys) * n) % 2
            t = t * 0.7 + 0.3 * bands
        elif kind == 2:  # a wall and a floor
            horizon = rng.uniform(0.3, 0.7)
            t = np.where(ys < horizon, t * 0.3, 0.7 + t * 0.3) + xs * 0.0
        arr = c0 + (c1 - c0) * t[..., None]
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return small.resize((w, h), Image.Resampling.BILINEAR)


def _shapes(img: Image.Image, rng: np.random.Generator, count: int) -> None:
    """Random flat shapes and lines: background clutter."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    side = min(w, h)
    for _ in range(count):
        kind = rng.integers(0, 4)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.04, 0.2) * side
        colour = _random_rgb(rng, muted=rng.random() < 0.5)
        if kind == 0:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r), fill=colour)
        elif kind == 1:
            draw.rectangle((cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r), fill=colour)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * math.pi, n))
            rad = rng.uniform(0.5, 1.0, n) * r
            draw.polygon(
                [
                    (cx + math.cos(a) * q, cy + math.sin(a) * q)
                    for a, q in zip(ang, rad, strict=True)
                ],
                fill=colour,
            )
        else:
            x2, y2 = cx + rng.uniform(-2, 2) * r, cy + rng.uniform(-2, 2) * r
            draw.line((cx, cy, x2, y2), fill=colour, width=max(1, int(r * 0.1)))


def _object(rng: np.random.Generator, size: float) -> Image.Image:
    """A non-garment object (bag, shoe, bottle, plant, ball, book, glasses, cup) as RGBA."""
    s = max(8, int(size))
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    c = (*_random_rgb(rng), 255)
    dark = (*(round(v * 0.4) for v in c[:3]), 255)
    ow = max(1, s // 40)
    kind = int(rng.integers(0, 8))
    if kind == 0:  # handbag
        d.arc((s * 0.25, s * 0.05, s * 0.75, s * 0.6), 180, 360, fill=dark, width=max(2, s // 16))
        d.rounded_rectangle((s * 0.1, s * 0.32, s * 0.9, s * 0.95), s * 0.08, c, dark, ow)
        d.rectangle((s * 0.45, s * 0.4, s * 0.55, s * 0.48), fill=dark)
    elif kind == 1:  # shoe
        d.chord((s * 0.05, s * 0.35, s * 0.95, s * 0.9), 180, 360, c, dark, ow)
        d.rectangle((s * 0.05, s * 0.62, s * 0.95, s * 0.72), fill=dark)
        d.ellipse((s * 0.5, s * 0.2, s * 0.85, s * 0.65), c, dark, ow)
    elif kind == 2:  # bottle
        d.rounded_rectangle((s * 0.3, s * 0.3, s * 0.7, s * 0.98), s * 0.06, c, dark, ow)
        d.rectangle((s * 0.42, s * 0.05, s * 0.58, s * 0.32), c, dark, ow)
        d.rectangle((s * 0.3, s * 0.5, s * 0.7, s * 0.7), fill=(240, 240, 235, 255))
    elif kind == 3:  # potted plant
        d.polygon(
            [(s * 0.3, s * 0.6), (s * 0.7, s * 0.6), (s * 0.62, s * 0.98), (s * 0.38, s * 0.98)],
            (150, 80, 50, 255),
        )
        leaf = (*_hsv_rgb(rng.uniform(0.25, 0.4), 0.7, 0.5), 255)
        for k in range(6):
            a = math.pi * (0.15 + 0.7 * k / 5)
            ex, ey = s * 0.5 - math.cos(a) * s * 0.3, s * 0.55 - math.sin(a) * s * 0.35
            d.ellipse((ex - s * 0.1, ey - s * 0.16, ex + s * 0.1, ey + s * 0.16), fill=leaf)
    elif kind == 4:  # ball
        d.ellipse((s * 0.05, s * 0.05, s * 0.95, s * 0.95), c, dark, ow)
        d.arc((s * -0.3, s * 0.1, s * 0.5, s * 0.9), -60, 60, fill=dark, width=ow * 2)
        d.arc((s * 0.5, s * 0.1, s * 1.3, s * 0.9), 120, 240, fill=dark, width=ow * 2)
    elif kind == 5:  # book
        d.rectangle((s * 0.15, s * 0.05, s * 0.85, s * 0.95), c, dark, ow)
        d.rectangle((s * 0.15, s * 0.05, s * 0.27, s * 0.95), fill=dark)
        d.line((s * 0.35, s * 0.3, s * 0.75, s * 0.3), fill=dark, width=ow * 2)
    elif kind == 6:  # sunglasses
        d.ellipse((s * 0.02, s * 0.35, s * 0.45, s * 0.7), (25, 25, 30, 255), dark, ow)
        d.ellipse((s * 0.55, s * 0.35, s * 0.98, s * 0.7), (25, 25, 30, 255), dark, ow)
        d.line((s * 0.42, s * 0.45, s * 0.58, s * 0.45), fill=c, width=max(2, s // 20))
    else:  # mug
        d.rounded_rectangle((s * 0.15, s * 0.2, s * 0.7, s * 0.95), s * 0.05, c, dark, ow)
        d.arc((s * 0.55, s * 0.35, s * 0.92, s * 0.75), -90, 90, fill=c, width=max(2, s // 12))
    return img.rotate(float(rng.uniform(-40, 40)), Image.Resampling.BILINEAR, expand=True)


# ------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class _Task:
    split: str
    index: int  # 1-based image id within the split
    kind: str  # "scene", "street" or "shop"
    products: tuple[int, ...]


def _scene_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = rng.uniform(300, 640)
    ratio = math.exp(rng.uniform(0.0, math.log(2.0)))
    short_side = max(192.0, long_side / ratio)
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    return round(w), round(h)


def _render(task: _Task) -> tuple[str, int, int, int, list[dict[str, Any]]]:
    """Render one image, write it, return its size and annotations (unlabelled fields)."""
    state = _STATE
    assert state is not None, "worker not initialised"
    rng = np.random.default_rng([state.seed, _SPLIT_CODE[task.split], task.index])
    anns: list[dict[str, Any]] = []
    if task.kind == "shop":
        w = round(rng.uniform(280, 400))
        h = round(w * rng.uniform(0.8, 1.3))
        img = _background(w, h, rng, plain=True)
        pid = task.products[0]
        g = state.geo(pid)
        x0, y0, x1, y1 = g.extent()
        fit = min(w / (x1 - x0), h / (y1 - y0)) * rng.uniform(0.72, 0.82)
        patch = _tight(_garment_patch(state, pid, max(x1 - x0, y1 - y0) * fit))
        px, py = (w - patch.width) // 2, (h - patch.height) // 2
        img.paste(patch, (px, py), patch)
        anns.append({"product_id": pid, "bbox": [px, py, patch.width, patch.height]})
        quality = int(rng.integers(88, 96))
        arr = np.asarray(img)
    else:
        w, h = _scene_size(rng)
        img = _background(w, h, rng)
        _shapes(img, rng, int(rng.integers(2, 9)))
        side = min(w, h)
        for _ in range(int(rng.integers(0, 3)) + (2 if not task.products else 0)):
            obj = _object(rng, rng.uniform(0.12, 0.3) * side)
            img.paste(
                obj,
                (
                    int(rng.integers(-obj.width // 4, w - obj.width * 3 // 4)),
                    int(rng.integers(-obj.height // 4, h - obj.height * 3 // 4)),
                ),
                obj,
            )
        owner = np.full((h, w), -1, np.int16)
        placed: list[tuple[int, int, int, int, int]] = []  # x, y, w, h, own pixels
        n = len(task.products)
        lo, hi = {1: (0.38, 0.78), 2: (0.3, 0.62), 3: (0.25, 0.5), 4: (0.22, 0.44)}.get(
            n, (0.3, 0.6)
        )
        strength = 1.0 if task.kind == "scene" else 1.2
        for k, pid in enumerate(task.products):
            g = state.geo(pid)
            x0, y0, x1, y1 = g.extent()
            ew, eh = x1 - x0, y1 - y0
            frac = rng.uniform(lo, hi)
            # The garment's larger relative extent covers `frac` of that image side.
            scale = frac / max(ew / w, eh / h)
            # Not too small against the image's long side either: the detector sees the
            # image letterboxed by that side (a 256 px canvas by default).
            long_px = max(64.0, 0.2 * max(w, h), max(ew, eh) * scale)
            patch = _tight(_deform(_garment_patch(state, pid, long_px), rng, strength))
            if patch.width > w - 2 or patch.height > h - 2:
                shrink = min((w - 4) / patch.width, (h - 4) / patch.height)
                patch = patch.resize(
                    (max(1, int(patch.width * shrink)), max(1, int(patch.height * shrink))),
                    Image.Resampling.BILINEAR,
                )
            solid = np.asarray(patch.getchannel("A")) > 127
            x, y = _place(owner, placed, solid, rng)
            img.paste(patch, (x, y), patch)
            owner[y : y + solid.shape[0], x : x + solid.shape[1]][solid] = k
            placed.append((x, y, solid.shape[1], solid.shape[0], int(solid.sum())))
            anns.append({"product_id": pid, "bbox": [x, y, solid.shape[1], solid.shape[0]]})
        # Clutter on top: objects that partly hide garments, never more than MAX_HIDDEN.
        n_occluders = int(rng.integers(0, 3)) if placed else 0
        for _ in range(n_occluders):
            obj = _tight(_object(rng, rng.uniform(0.1, 0.22) * side))
            solid = np.asarray(obj.getchannel("A")) > 127
            if solid.shape[0] >= h or solid.shape[1] >= w:
                continue
            tx, ty, tw, th, _own = placed[int(rng.integers(0, len(placed)))]
            for _try in range(12):
                x = int(
                    np.clip(
                        tx + rng.uniform(-0.5, 1.0) * tw - solid.shape[1] / 2, 0, w - solid.shape[1]
                    )
                )
                y = int(
                    np.clip(
                        ty + rng.uniform(-0.5, 1.0) * th - solid.shape[0] / 2, 0, h - solid.shape[0]
                    )
                )
                if _hidden_ok(owner, placed, solid, x, y):
                    img.paste(obj, (x, y), obj)
                    owner[y : y + solid.shape[0], x : x + solid.shape[1]][solid] = -2
                    break
        # Lighting (overall gain and a colour cast), sensor noise, sometimes a soft focus.
        gain = rng.uniform(0.9, 1.1) * (1.0 + rng.uniform(-0.04, 0.04, 3))
        levels = np.arange(256, dtype=np.float64)[None, :] * gain[:, None]
        img = img.point(np.clip(np.round(levels), 0, 255).astype(np.uint8).ravel().tolist())
        if rng.random() < 0.25:
            img = img.filter(ImageFilter.SMOOTH)
        noise = state.noise(rng, h, w)
        arr = np.clip(np.asarray(img, np.int16) + noise[..., None], 0, 255).astype(np.uint8)
        quality = int(rng.integers(55, 96))
    path = state.out / task.split / "images" / f"{task.index:06d}.jpg"
    Image.fromarray(arr).save(path, "JPEG", quality=quality)
    return task.split, task.index, w, h, anns


def _hidden_ok(
    owner: np.ndarray,
    placed: Sequence[tuple[int, int, int, int, int]],
    solid: np.ndarray,
    x: int,
    y: int,
) -> bool:
    """Whether drawing ``solid`` at (x, y) keeps every garment at most MAX_HIDDEN hidden."""
    region = owner[y : y + solid.shape[0], x : x + solid.shape[1]][solid]
    counts = np.bincount(region.astype(np.int64) + 2, minlength=len(placed) + 2)
    visible = np.bincount((owner[owner >= 0]).astype(np.int64), minlength=len(placed))
    for k, (*_, own) in enumerate(placed):
        if visible[k] - counts[k + 2] < (1.0 - MAX_HIDDEN) * own:
            return False
    return True


def _place(
    owner: np.ndarray,
    placed: Sequence[tuple[int, int, int, int, int]],
    solid: np.ndarray,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """A position inside the image that hides at most MAX_HIDDEN of every garment so far;
    the least hiding of the candidates tried when none qualifies."""
    h, w = owner.shape
    ph, pw = solid.shape
    best, best_loss = (0, 0), math.inf
    visible = np.bincount((owner[owner >= 0]).astype(np.int64), minlength=len(placed))
    for _ in range(30):
        x = int(rng.integers(0, max(1, w - pw + 1)))
        y = int(rng.integers(0, max(1, h - ph + 1)))
        if not placed:
            return x, y
        region = owner[y : y + ph, x : x + pw][solid]
        counts = np.bincount(region.astype(np.int64) + 2, minlength=len(placed) + 2)
        loss = max(
            (counts[k + 2] - (visible[k] - (1.0 - MAX_HIDDEN) * own)) / own
            for k, (*_, own) in enumerate(placed)
        )
        if loss <= 0:
            return x, y
        if loss < best_loss:
            best, best_loss = (x, y), loss
    return best


# ---------------------------------------------------------------------------------- plan
def _garment_counts(rng: np.random.Generator, n: int) -> list[int]:
    counts = rng.choice([1, 2, 3, 4], size=n, p=[0.3, 0.32, 0.22, 0.16])
    empty = rng.random(n) < EMPTY_FRACTION
    return [0 if e else int(c) for c, e in zip(counts, empty, strict=True)]


def _assign(
    rng: np.random.Generator, counts: list[int], slots: list[int], n_products: int
) -> list[tuple[int, ...]]:
    """Deal product ids (``slots``, then uniform draws) into images, no repeats per image."""
    total = sum(counts)
    fill = rng.integers(1, n_products + 1, max(0, total - len(slots))).tolist()
    pool = [*slots, *fill][:total]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    images: list[list[int]] = []
    pos = 0
    for c in counts:
        images.append(pool[pos : pos + c])
        pos += c
    # Swap away duplicates within an image (a scene shows two different products).
    for i, ids in enumerate(images):
        for a in range(len(ids)):
            if ids.count(ids[a]) == 1:
                continue
            for _ in range(200):
                j = int(rng.integers(0, len(images)))
                if not images[j] or j == i:
                    continue
                b = int(rng.integers(0, len(images[j])))
                if images[j][b] not in ids and ids[a] not in images[j]:
                    ids[a], images[j][b] = images[j][b], ids[a]
                    break
    return [tuple(ids) for ids in images]


def _plan(images: int, seed: int, taxonomy: Taxonomy) -> tuple[list[Product], list[_Task]]:
    rng = np.random.default_rng([seed, 0, 0])
    n_leaves = len(taxonomy.leaves)
    counts = _garment_counts(rng, images)
    n_products = max(60, images // 15)
    # A small run cannot show a large catalog three times each: shrink the catalog.
    n_products = max(n_leaves, min(n_products, sum(counts) // (MIN_TRAIN_OCCURRENCES + 1)))
    needed = n_products * MIN_TRAIN_OCCURRENCES
    for i in rng.permutation(images):
        if sum(counts) >= needed:
            break
        counts[i] = 4
    if sum(counts) < needed:
        raise ValueError(
            f"{images} train images are too few to show {n_leaves} products "
            f"{MIN_TRAIN_OCCURRENCES} times each; use at least {math.ceil(needed / 4)}"
        )
    products = _make_catalog(taxonomy, n_products, seed)
    ids = [p.id for p in products]
    tasks: list[_Task] = []
    train_slots = [pid for pid in ids for _ in range(MIN_TRAIN_OCCURRENCES)]
    for i, prods in enumerate(_assign(rng, counts, train_slots, n_products)):
        tasks.append(_Task("train", i + 1, "scene", prods))

    n_val = max(20, images // 10)
    val_counts = _garment_counts(rng, n_val)
    while sum(val_counts) < n_leaves:
        val_counts[int(rng.integers(0, n_val))] = 4
    by_leaf = {leaf: [p.id for p in products if p.leaf == leaf] for leaf in taxonomy.leaves}
    val_slots = [int(rng.choice(by_leaf[leaf])) for leaf in taxonomy.leaves]
    for i, prods in enumerate(_assign(rng, val_counts, val_slots, n_products)):
        tasks.append(_Task("val", i + 1, "scene", prods))

    order = rng.permutation(n_products)
    for i, k in enumerate(order):
        pid = ids[k]
        shown: tuple[int, ...] = (pid,)
        if rng.random() < 0.4:
            other = int(rng.integers(1, n_products + 1))
            if other != pid:
                shown = (pid, other) if rng.random() < 0.5 else (other, pid)
        tasks.append(_Task("query", i + 1, "street", shown))
    for i, pid in enumerate(ids):
        tasks.append(_Task("gallery", i + 1, "shop", (pid,)))
    return products, tasks


# ----------------------------------------------------------------------------------- API
def synthesize(
    out: Path,
    images: int,
    seed: int,
    taxonomy: Taxonomy,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Render the synthetic data set into ``out`` and return a summary.

    Writes ``out/<split>/images/NNNNNN.jpg`` and ``out/<split>/labels.json`` (COCO-style,
    with ``category_path``, ``tags`` and ``product_id`` per annotation) for the splits
    train (``images`` scenes), val (``max(20, images // 10)`` scenes), query (one street
    scene per product) and gallery (one shop image per product). The catalog holds
    ``max(60, images // 15)`` products (fewer when ``images`` is too small to show each at
    least three times in train).

    The output depends only on ``seed``, ``images`` and the taxonomy: byte-identical
    across runs and across ``workers`` (default: up to 2 processes; 1 renders in-process).
    Raises ``ValueError`` when the taxonomy names categories or tags the renderer cannot
    draw, or when ``images`` is too small for every category to appear.
    """
    start = time.monotonic()
    _check_taxonomy(taxonomy)
    out = Path(out)
    products, tasks = _plan(images, seed, taxonomy)
    for split in SPLITS:
        (out / split / "images").mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(tasks) > 200 else 1
    results: dict[str, list[tuple[int, int, int, list[dict[str, Any]]]]] = {s: [] for s in SPLITS}
    with (
        _renderer(tasks, out, seed, products, workers) as rendered,
        tqdm(total=len(tasks), desc="synth", unit="img", disable=not progress or None) as bar,
    ):
        for split, index, w, h, anns in rendered:
            results[split].append((index, w, h, anns))
            bar.update(1)

    by_id = {p.id: p for p in products}
    categories = [
        {
            "id": i + 1,
            "name": leaf,
            "supercategory": taxonomy.nodes[leaf].parent or leaf,
            "path": list(taxonomy.path(leaf)),
        }
        for i, leaf in enumerate(taxonomy.leaves)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    summary: dict[str, Any] = {"out": str(out), "seed": seed, "products": len(products)}
    splits: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        rows = sorted(results[split], key=lambda r: r[0])
        image_rows: list[dict[str, Any]] = []
        ann_rows: list[dict[str, Any]] = []
        for index, w, h, anns in rows:
            image_rows.append(
                {"id": index, "file_name": f"{index:06d}.jpg", "width": w, "height": h}
            )
            for ann in anns:
                p = by_id[ann["product_id"]]
                bw, bh = ann["bbox"][2], ann["bbox"][3]
                ann_rows.append(
                    {
                        "id": len(ann_rows) + 1,
                        "image_id": index,
                        "bbox": ann["bbox"],
                        "area": bw * bh,
                        "iscrowd": 0,
                        "category_id": category_id[p.leaf],
                        "category_path": list(p.path),
                        "tags": json.loads(json.dumps(p.tags)),
                        "product_id": p.id,
                    }
                )
        labels = {
            "info": {
                "seed": seed,
                "split": split,
                "taxonomy_version": taxonomy.version,
                "taxonomy_hash": taxonomy.hash,
            },
            "images": image_rows,
            "annotations": ann_rows,
            "categories": categories,
        }
        (out / split / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
        splits[split] = {"images": len(image_rows), "annotations": len(ann_rows)}
    summary["splits"] = splits
    summary["seconds"] = round(time.monotonic() - start, 2)
    print(
        f"synth: {out} seed={seed} products={len(products)} "
        + " ".join(f"{s}={v['images']}img/{v['annotations']}ann" for s, v in splits.items())
        + f" in {summary['seconds']:.1f}s"
    )
    return summary


@contextmanager
def _renderer(
    tasks: list[_Task], out: Path, seed: int, products: list[Product], workers: int
) -> Iterator[Iterator[tuple[str, int, int, int, list[dict[str, Any]]]]]:
    """An iterator over rendered tasks, in-process or from a pool of ``workers``."""
    if workers <= 1:
        global _STATE
        _init_worker(str(out), seed, products)
        try:
            yield map(_render, tasks)
        finally:
            _STATE = None
        return
    # fork where available: spawn would re-import the caller's __main__, which breaks
    # scripts without a main guard. The pool is made before the progress bar starts its
    # monitor thread, and workers use no thread pools (no BLAS), so forking is safe.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    ctx = get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(out), seed, products)) as pool:
        yield pool.imap_unordered(_render, tasks, chunksize=8)
