"""Drawing one garment: a product's outline, texture and details rasterised as an RGBA patch.

A product's drawing is a list of commands in garment units (:class:`Geometry`, made once
per product); :func:`garment_patch` rasterises it upright at a pixel size, with the
product's colour, pattern, seams and mark, and :func:`deform` warps a patch the way a
garment lies in a photo. Every leaf category has a distinct silhouette and patterns and
details are sized relative to the garment, so that they survive a 96 px crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fashionserve.data.catalog import LEAF_ROOTS, RGB, Product, hsv_rgb

Pt = tuple[float, float]


# ------------------------------------------------------------------------------ geometry
@dataclass
class Geometry:
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
    g: Geometry,
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


def _neck(g: Geometry, nw: float, v_neck: bool, depth: float = 0.1) -> None:
    # The back of the neck is part of the silhouette; the opening shows the inside.
    g.poly([(-nw - 0.02, -0.03), (nw + 0.02, -0.03), (nw + 0.02, 0.02), (-nw - 0.02, 0.02)])
    if v_neck:
        g.poly([(-nw, -0.0), (nw, -0.0), (0.0, depth * 2.6)], "inner")
    else:
        g.ellipse(0.0, 0.0, nw, depth, "inner")


def _hood(g: Geometry, nw: float) -> None:
    g.ellipse(0.0, -0.07, nw + 0.15, 0.25, "body")
    g.ellipse(0.0, -0.05, nw + 0.03, 0.17, "inner")


def _bow(g: Geometry, x: float, y: float, size: float = 1.0) -> None:
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


def _buttons(g: Geometry, x: float, y0: float, y1: float, n: int, r: float = 0.05) -> None:
    for k in range(n):
        y = y0 + (y1 - y0) * k / max(1, n - 1)
        g.ellipse(x, y, r, r, "button")


def _pocket(g: Geometry, x: float, y: float, w: float, h: float, flap: bool = False) -> None:
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


def _rib_lines(g: Geometry, x0: float, x1: float, y0: float, y1: float, step: float) -> None:
    n = int((x1 - x0) / step)
    for k in range(1, n):
        x = x0 + k * step
        g.line([(x, y0), (x, y1)], "rib")


def product_geometry(p: Product) -> Geometry:
    """The drawing of a product, in units of its shoulder (or waist) width."""
    g = Geometry()
    draw = {"top": _top, "bottom": _bottom, "full-body": _full_body}[LEAF_ROOTS[p.leaf]]
    draw(g, p)
    return g


def _top(g: Geometry, p: Product) -> None:
    """A shirt, t-shirt, sweater or blazer."""
    look = p.look
    lj, wj, nw = look["length"], look["width"], look["neck"]
    details = set(p.details)
    sleeve = p.sleeve or "long"
    leaf = p.leaf
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


def _bottom(g: Geometry, p: Product) -> None:
    """Trousers, shorts or a skirt."""
    look = p.look
    lj, wj = look["length"], look["width"]
    details = set(p.details)
    leaf = p.leaf
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


def _full_body(g: Geometry, p: Product) -> None:
    """A dress, jumpsuit or coat."""
    look = p.look
    lj, wj, nw = look["length"], look["width"], look["neck"]
    details = set(p.details)
    sleeve = p.sleeve or "long"
    leaf = p.leaf
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
            _sleeve(g, (hw, sy), (hw * 0.98, ay), "short", 52.0 + look["angle"], 0.28, 0.15, None)
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


# --------------------------------------------------------------------------------- patch
def garment_patch(p: Product, g: Geometry, long_px: float) -> Image.Image:
    """Product ``p`` (drawn as ``g``) upright as RGBA, its longer side ``long_px`` pixels."""
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
    g: Geometry,
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
    colour = hsv_rgb(look["mark_hue"], 0.8, value)
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


# ---------------------------------------------------------------------------------- warp
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


def deform(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
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


def tight(img: Image.Image) -> Image.Image:
    """Crop an RGBA patch to its visible pixels (alpha > 127)."""
    alpha = img.getchannel("A").point(lambda v: 255 if v > 127 else 0)
    box = alpha.getbbox()
    return img.crop(box) if box else img
