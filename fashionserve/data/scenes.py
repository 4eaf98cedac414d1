"""Composing one scene: background, clutter, garments placed and partly occluded, lighting,
sensor noise, JPEG.

:func:`render_scene` is the one way a synthetic image is made, for a data set written to
disk (:mod:`fashionserve.data.writer`) as for samples kept in memory
(:mod:`fashionserve.data.dataset`). It is a pure function of ``(seed, split, image
index)`` and the products shown: each scene draws from its own ``numpy`` Generator, so a
scene is byte-identical whatever else is rendered, in whichever process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fashionserve.data.catalog import RGB, Product, hsv_rgb
from fashionserve.data.drawing import Geometry, deform, garment_patch, product_geometry, tight

SPLITS = ("train", "val", "test", "query", "gallery", "seen")
_SPLIT_CODE = {"train": 1, "val": 2, "query": 3, "gallery": 4, "test": 5, "seen": 6}

MAX_HIDDEN = 0.28
"""At most this share of a garment's own pixels may be covered by later layers."""

_NOISE_SIDE = 656  # > the largest image side


@dataclass(frozen=True)
class SceneSpec:
    """What one image shows: its split and 1-based index (its identity for the seed), its
    kind (``scene``, ``street`` or ``shop``) and the products in it."""

    split: str
    index: int
    kind: str
    products: tuple[int, ...]


@dataclass(frozen=True)
class Scene:
    """A rendered image: JPEG bytes, its size, and ``(product id, [x, y, w, h])`` per
    garment in drawing order (the box holds the garment's visible pixels)."""

    spec: SceneSpec
    jpeg: bytes
    width: int
    height: int
    garments: tuple[tuple[int, tuple[int, int, int, int]], ...]


@dataclass
class Studio:
    """What the scenes of one data set share: the seed, the catalog, each product's drawing
    (made once, on first use) and the sensor-noise bank."""

    seed: int
    products: dict[int, Product]
    geometry: dict[int, Geometry] = field(default_factory=dict)
    noise_bank: np.ndarray | None = None

    def geo(self, pid: int) -> Geometry:
        if pid not in self.geometry:
            self.geometry[pid] = product_geometry(self.products[pid])
        return self.geometry[pid]

    def patch(self, pid: int, long_px: float) -> Image.Image:
        """Product ``pid`` drawn upright as RGBA, its longer side ``long_px`` pixels."""
        return garment_patch(self.products[pid], self.geo(pid), long_px)

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


def _random_rgb(rng: np.random.Generator, muted: bool = False) -> RGB:
    h = rng.random()
    s = rng.uniform(0.0, 0.35) if muted else rng.uniform(0.0, 0.9)
    v = rng.uniform(0.3, 0.95)
    return hsv_rgb(h, s, v)


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
        leaf = (*hsv_rgb(rng.uniform(0.25, 0.4), 0.7, 0.5), 255)
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


def _scene_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = rng.uniform(300, 640)
    ratio = math.exp(rng.uniform(0.0, math.log(2.0)))
    short_side = max(192.0, long_side / ratio)
    w, h = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    return round(w), round(h)


Composed = tuple[np.ndarray, int, list[tuple[int, tuple[int, int, int, int]]]]
"""The pixels ``[h, w, 3]`` uint8, the JPEG quality, and the garments with their boxes."""


def render_scene(studio: Studio, spec: SceneSpec) -> Scene:
    """Render the image ``spec`` describes with the products and seed of ``studio``."""
    rng = np.random.default_rng([studio.seed, _SPLIT_CODE[spec.split], spec.index])
    compose = _shop_photo if spec.kind == "shop" else _cluttered_scene
    arr, quality, garments = compose(studio, spec, rng)
    encoded = io.BytesIO()
    Image.fromarray(arr).save(encoded, "JPEG", quality=quality)
    return Scene(spec, encoded.getvalue(), arr.shape[1], arr.shape[0], tuple(garments))


def _shop_photo(studio: Studio, spec: SceneSpec, rng: np.random.Generator) -> Composed:
    """The product alone, centred, on a plain light backdrop."""
    garments: list[tuple[int, tuple[int, int, int, int]]] = []
    w = round(rng.uniform(280, 400))
    h = round(w * rng.uniform(0.8, 1.3))
    img = _background(w, h, rng, plain=True)
    pid = spec.products[0]
    g = studio.geo(pid)
    x0, y0, x1, y1 = g.extent()
    fit = min(w / (x1 - x0), h / (y1 - y0)) * rng.uniform(0.72, 0.82)
    patch = tight(studio.patch(pid, max(x1 - x0, y1 - y0) * fit))
    px, py = (w - patch.width) // 2, (h - patch.height) // 2
    img.paste(patch, (px, py), patch)
    garments.append((pid, (px, py, patch.width, patch.height)))
    quality = int(rng.integers(88, 96))
    arr = np.asarray(img)
    return arr, quality, garments


def _cluttered_scene(studio: Studio, spec: SceneSpec, rng: np.random.Generator) -> Composed:
    """Garments placed on a cluttered background, partly occluded, lit and noisy."""
    garments: list[tuple[int, tuple[int, int, int, int]]] = []
    w, h = _scene_size(rng)
    img = _background(w, h, rng)
    _shapes(img, rng, int(rng.integers(2, 9)))
    side = min(w, h)
    for _ in range(int(rng.integers(0, 3)) + (2 if not spec.products else 0)):
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
    n = len(spec.products)
    lo, hi = {1: (0.38, 0.78), 2: (0.3, 0.62), 3: (0.25, 0.5), 4: (0.22, 0.44)}.get(n, (0.3, 0.6))
    strength = 1.0 if spec.kind == "scene" else 1.2
    for k, pid in enumerate(spec.products):
        g = studio.geo(pid)
        x0, y0, x1, y1 = g.extent()
        ew, eh = x1 - x0, y1 - y0
        frac = rng.uniform(lo, hi)
        # The garment's larger relative extent covers `frac` of that image side.
        scale = frac / max(ew / w, eh / h)
        # Not too small against the image's long side either: the detector sees the
        # image letterboxed by that side (a 256 px canvas by default).
        long_px = max(64.0, 0.2 * max(w, h), max(ew, eh) * scale)
        patch = tight(deform(studio.patch(pid, long_px), rng, strength))
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
        garments.append((pid, (x, y, solid.shape[1], solid.shape[0])))
    # Clutter on top: objects that partly hide garments, never more than MAX_HIDDEN.
    n_occluders = int(rng.integers(0, 3)) if placed else 0
    for _ in range(n_occluders):
        obj = tight(_object(rng, rng.uniform(0.1, 0.22) * side))
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
    noise = studio.noise(rng, h, w)
    arr = np.clip(np.asarray(img, np.int16) + noise[..., None], 0, 255).astype(np.uint8)
    quality = int(rng.integers(55, 96))
    return arr, quality, garments


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
