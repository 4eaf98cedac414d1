"""The catalog: the products a synthetic data set shows, and what the renderer can draw.

Every garment in a scene is a rendering of a *product*: a leaf category, the taxonomy's
tags (colour, pattern, sleeve, details) and product-specific looks (exact shade, pattern
scale, angle and phase, proportions, a small distinctive mark), all drawn once from the
seed. The same product is rendered in several scenes, so it can be retrieved across them.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fashionserve.errors import InvalidInput
from fashionserve.taxonomy import Taxonomy


class CannotRender(InvalidInput):
    """The data set cannot be rendered as asked: the taxonomy names categories or tags the
    renderer cannot draw, or too few images are asked for every product to appear."""

    reason = "CANNOT_RENDER"


RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------- vocabulary
# What the renderer can draw. A taxonomy may use any subset of these names; a name outside
# them cannot be rendered truthfully, so check_taxonomy() refuses it.
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
# A trend: sleeve priors that replace the leaf's above, for data sets that show a season the
# demo models were never trained on (the active-learning experiment's shifted traffic).
TRENDS: dict[str, dict[str, dict[str, float]]] = {
    # Sweaters with short sleeves: a band cuff and a rib hem, like every sweater, on the
    # sleeve of a t-shirt. The standard catalog has none.
    "short-sleeve-sweaters": {"sweater": {"short": 0.6, "long": 0.3, "sleeveless": 0.1}},
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


def hsv_rgb(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(colour: str, rng: np.random.Generator) -> RGB:
    (h0, h1), (s0, s1), (v0, v1) = _COLOURS[colour]
    return hsv_rgb(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


def check_taxonomy(taxonomy: Taxonomy) -> None:
    problems = [f"leaf category {leaf!r}" for leaf in taxonomy.leaves if leaf not in LEAF_ROOTS]
    for group in taxonomy.groups:
        known = _KNOWN_GROUPS.get(group.name)
        if known is None:
            problems.append(f"tag group {group.name!r}")
            continue
        problems += [f"{group.name} label {lbl!r}" for lbl in group.labels if lbl not in known]
    if problems:
        raise CannotRender(
            "the synthetic renderer cannot draw: " + ", ".join(problems) + f" (it draws leaves "
            f"{sorted(LEAF_ROOTS)} and groups { {k: list(v) for k, v in _KNOWN_GROUPS.items()} })"
        )


def make_catalog(
    taxonomy: Taxonomy, count: int, seed: int, trend: str | None = None
) -> list[Product]:
    """``count`` products, leaves in turn; (colour, pattern) pairs distinct within a leaf
    until the pairs run out, so most products differ from each other in their labels.
    ``trend``: a key of :data:`TRENDS` whose sleeve priors replace the standard ones."""
    if trend is not None and trend not in TRENDS:
        raise CannotRender(f"unknown trend {trend!r}: known are {', '.join(TRENDS)}")
    sleeve_prior = {**_SLEEVE_PRIOR, **(TRENDS[trend] if trend else {})}
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
            prior = sleeve_prior[leaf]
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
