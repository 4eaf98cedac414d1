"""Turning the ensemble's raw garment rows into what a caller reads."""

from __future__ import annotations

import numpy as np
import pytest

from fashionserve.ensemble import Garment
from fashionserve.gateway.results import ImageOutput, assemble_result, clip_box
from fashionserve.gateway.validation import ValidatedOptions
from fashionserve.taxonomy import Taxonomy, load_taxonomy


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def logits_for(
    taxonomy: Taxonomy, chosen: dict[str, list[str]], strength: float = 8.0
) -> np.ndarray:
    """A logit row confident in ``chosen`` (segment owner -> labels; "" is the root)."""
    row = np.zeros(taxonomy.num_logits, np.float32)
    for seg in taxonomy.layout:
        if seg.kind == "independent":
            row[seg.start : seg.stop] = -strength
        for label in chosen.get(seg.owner, []):
            row[seg.start + seg.labels.index(label)] = strength
    return row


def garment(
    taxonomy: Taxonomy,
    box: tuple[float, float, float, float],
    score: float,
    cls: int,
    chosen: dict[str, list[str]],
) -> Garment:
    emb = np.ones(8, np.float32) / np.sqrt(8)
    return Garment(
        box=box, score=score, detector_class=cls, logits=logits_for(taxonomy, chosen), embedding=emb
    )


def options(**kw: object) -> ValidatedOptions:
    base: dict[str, object] = {"min_score": 0.0, "max_garments": 16}
    base.update(kw)
    return ValidatedOptions(**base)  # type: ignore[arg-type]


SHIRT = {
    "": ["top"],
    "top": ["shirt"],
    "colour": ["red"],
    "pattern": ["striped"],
    "sleeve": ["long"],
    "details": ["buttons", "pockets"],
}
SKIRT = {
    "": ["bottom"],
    "bottom": ["skirt"],
    "colour": ["blue"],
    "pattern": ["plain"],
    "sleeve": ["short"],
    "details": [],
}


def test_coarse_to_fine_path_and_tags(taxonomy: Taxonomy) -> None:
    out = ImageOutput(400, 300, [garment(taxonomy, (10, 20, 110, 220), 0.9, 0, SHIRT)])
    result = assemble_result(out, taxonomy, options())
    (g,) = result.garments
    assert [s.name for s in g.category_path] == ["top", "shirt"]
    # A category's probability is the product along its path: it never grows going down.
    assert g.category_path[0].probability >= g.category_path[1].probability > 0.9
    tags = {name: [s.name for s in labels] for name, labels in g.tag_groups}
    assert tags == {
        "colour": ["red"],
        "pattern": ["striped"],
        "sleeve": ["long"],
        "details": ["buttons", "pockets"],
    }
    assert g.detector_class == "top"
    assert g.embedding is None and g.probability_tables == []


def test_tag_group_applies_only_where_its_categories_are(taxonomy: Taxonomy) -> None:
    # The model says "short sleeve" for a skirt; sleeve applies to tops and full-body only.
    out = ImageOutput(400, 300, [garment(taxonomy, (0, 0, 50, 50), 0.8, 1, SKIRT)])
    (g,) = assemble_result(out, taxonomy, options()).garments
    groups = [name for name, _ in g.tag_groups]
    assert "sleeve" not in groups
    assert groups == ["colour", "pattern", "details"]  # taxonomy order
    assert dict(g.tag_groups)["details"] == []  # applies, nothing passed its threshold


def test_exclusive_group_yields_at_most_one_label(taxonomy: Taxonomy) -> None:
    chosen = dict(SHIRT, colour=["red", "blue"])  # two equally confident colours
    out = ImageOutput(100, 100, [garment(taxonomy, (0, 0, 50, 50), 0.8, 0, chosen)])
    (g,) = assemble_result(out, taxonomy, options()).garments
    assert len(dict(g.tag_groups)["colour"]) <= 1


def test_unconfident_category_stops_at_the_parent(taxonomy: Taxonomy) -> None:
    # Fairly sure it is full-body (p ~ 0.58), no opinion among dress/jumpsuit/coat: the
    # probability of any child given full-body (1/3) is under the threshold, so it stops there.
    g0 = garment(taxonomy, (0, 0, 50, 50), 0.8, 2, {"colour": ["black"]})
    g0.logits[0:3] = [0.0, 0.0, 1.0]
    (g,) = assemble_result(ImageOutput(100, 100, [g0]), taxonomy, options()).garments
    assert [s.name for s in g.category_path] == ["full-body"]
    assert g.category_path[0].probability == pytest.approx(np.e / (2 + np.e), abs=1e-5)


def test_min_score_and_max_garments_keep_the_best_first(taxonomy: Taxonomy) -> None:
    rows = [garment(taxonomy, (0, 0, 10, 10), s, 0, SHIRT) for s in (0.4, 0.95, 0.6, 0.8)]
    out = ImageOutput(100, 100, rows)
    kept = assemble_result(out, taxonomy, options(min_score=0.5)).garments
    assert [round(g.detector_score, 2) for g in kept] == [0.95, 0.8, 0.6]
    top2 = assemble_result(out, taxonomy, options(max_garments=2)).garments
    assert [round(g.detector_score, 2) for g in top2] == [0.95, 0.8]


def test_zero_garments_is_an_empty_list(taxonomy: Taxonomy) -> None:
    result = assemble_result(ImageOutput(640, 480, []), taxonomy, options())
    assert (result.width, result.height, result.garments) == (640, 480, [])


def test_boxes_are_clipped_and_normalised(taxonomy: Taxonomy) -> None:
    out = ImageOutput(200, 100, [garment(taxonomy, (-5, 10, 150, 130), 0.9, 0, SHIRT)])
    (g,) = assemble_result(out, taxonomy, options()).garments
    assert (g.box.x_min, g.box.y_min, g.box.x_max, g.box.y_max) == (0, 10, 150, 100)
    n = g.normalized_box
    assert (n.x_min, n.y_min, n.x_max, n.y_max) == pytest.approx((0, 0.1, 0.75, 1.0))


def test_clip_box_orders_swapped_corners() -> None:
    box, norm = clip_box((50, 40, 10, 20), 100, 100)
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (10, 20, 50, 40)
    assert 0 <= norm.x_min <= norm.x_max <= 1


def test_embeddings_and_tables_only_when_asked(taxonomy: Taxonomy) -> None:
    out = ImageOutput(100, 100, [garment(taxonomy, (0, 0, 50, 50), 0.9, 0, SHIRT)])
    (g,) = assemble_result(
        out, taxonomy, options(include_embeddings=True, include_probability_tables=True)
    ).garments
    assert g.embedding is not None and len(g.embedding) == 8
    assert np.linalg.norm(g.embedding) == pytest.approx(1.0, abs=1e-5)
    names = [name for name, _ in g.probability_tables]
    assert names[:4] == ["category:", "category:top", "category:bottom", "category:full-body"]
    assert {"colour", "pattern", "sleeve", "details"} <= set(names)
    root = dict(g.probability_tables)["category:"]
    assert sum(s.probability for s in root) == pytest.approx(1.0, abs=1e-5)


def test_unknown_detector_class_is_named_not_crashed(taxonomy: Taxonomy) -> None:
    out = ImageOutput(100, 100, [garment(taxonomy, (0, 0, 50, 50), 0.9, 7, SHIRT)])
    (g,) = assemble_result(out, taxonomy, options()).garments
    assert g.detector_class == "class-7"
