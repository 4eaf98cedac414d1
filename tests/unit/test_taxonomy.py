"""The taxonomy loader, hash, logit layout and coarse-to-fine decoding."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from fashionserve.taxonomy import Taxonomy, TaxonomyError, load_taxonomy


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def logits_for(
    t: Taxonomy, path: list[str], tags: Mapping[str, str | Sequence[str]], strength: float = 8.0
) -> np.ndarray:
    """Logits that strongly favour ``path`` and ``tags``: the decoder must recover them."""
    target, _ = t.encode_targets(path, tags)
    return (target * 2 - 1) * strength


def test_default_taxonomy_layout(taxonomy: Taxonomy) -> None:
    assert taxonomy.roots == ("top", "bottom", "full-body")
    assert len(taxonomy.leaves) == 10
    kinds = [(s.kind, s.owner) for s in taxonomy.layout]
    assert kinds[:4] == [
        ("category", ""),
        ("category", "top"),
        ("category", "bottom"),
        ("category", "full-body"),
    ]
    assert ("independent", "details") in kinds
    # Segments tile the logit vector without gaps or overlaps.
    assert [s.start for s in taxonomy.layout[1:]] == [s.stop for s in taxonomy.layout[:-1]]
    assert taxonomy.num_logits == taxonomy.layout[-1].stop == 33


def test_hash_is_stable_under_formatting_and_sensitive_to_content(taxonomy: Taxonomy) -> None:
    raw = taxonomy.to_dict()
    same = Taxonomy.from_dict(copy.deepcopy(raw))
    assert same.hash == taxonomy.hash
    renamed = copy.deepcopy(raw)
    renamed["tag_groups"][0]["labels"][0] = "charcoal"
    assert Taxonomy.from_dict(renamed).hash != taxonomy.hash


def test_layout_is_deterministic_and_grows_at_the_end_when_a_group_is_added(
    taxonomy: Taxonomy,
) -> None:
    raw = taxonomy.to_dict()
    raw["tag_groups"].append({"name": "fit", "exclusive": True, "labels": ["slim", "loose"]})
    grown = Taxonomy.from_dict(raw)
    assert grown.layout[: len(taxonomy.layout)] == taxonomy.layout
    assert grown.num_logits == taxonomy.num_logits + 2


def test_every_problem_is_reported_with_its_location() -> None:
    bad = {
        "version": "1",
        "categories": [
            {"name": "top", "children": ["shirt", "shirt"]},
            {"name": "bottom", "children": []},
        ],
        "tag_groups": [
            {"name": "colour", "exclusive": True, "labels": ["red"], "applies_to": ["hats"]},
            {"name": "colour", "labels": ["blue"]},
        ],
        "thresholds": {"colour/purple": 0.5, "shirt": 1.5, "socks": 0.2},
    }
    with pytest.raises(TaxonomyError) as info:
        Taxonomy.from_dict(bad, "bad.yaml")
    problems = "\n".join(info.value.problems)
    assert "categories[0].children[1]: duplicate category name 'shirt'" in problems
    assert "categories[1].children: expected a non-empty list" in problems
    assert "tag_groups[0].applies_to[0]: unknown category 'hats'" in problems
    assert "tag_groups[1].name: duplicate group 'colour'" in problems
    assert "thresholds.colour/purple: unknown label 'purple'" in problems
    assert "thresholds.shirt: expected a probability in [0, 1]" in problems
    assert "thresholds.socks: unknown category 'socks'" in problems
    assert len(info.value.problems) == 7
    assert "bad.yaml" in str(info.value)


def test_decode_recovers_path_and_tags(taxonomy: Taxonomy) -> None:
    tags = {"colour": "red", "pattern": "striped", "sleeve": "long", "details": ["buttons", "hood"]}
    decoded = taxonomy.decode(logits_for(taxonomy, ["top", "shirt"], tags))
    assert [s.name for s in decoded.category_path] == ["top", "shirt"]
    assert decoded.leaf == "shirt"
    # The leaf probability is the product of the conditionals along the path.
    assert decoded.category_path[1].probability <= decoded.category_path[0].probability
    assert [t.name for t in decoded.tags["colour"]] == ["red"]
    assert [t.name for t in decoded.tags["sleeve"]] == ["long"]
    assert sorted(t.name for t in decoded.tags["details"]) == ["buttons", "hood"]


def test_group_that_does_not_apply_is_not_decoded(taxonomy: Taxonomy) -> None:
    logits = logits_for(taxonomy, ["bottom", "skirt"], {"colour": "blue", "pattern": "plain"})
    # Even a confident sleeve logit must not produce a sleeve tag on a skirt.
    sleeve = next(s for s in taxonomy.layout if s.owner == "sleeve")
    logits[sleeve.start] = 20.0
    decoded = taxonomy.decode(logits)
    assert decoded.leaf == "skirt"
    assert "sleeve" not in decoded.tags


def test_decode_stops_descending_when_not_confident(taxonomy: Taxonomy) -> None:
    logits = logits_for(taxonomy, ["top", "shirt"], {"colour": "red", "pattern": "plain"})
    top = next(s for s in taxonomy.layout if s.owner == "top")
    logits[top.start : top.stop] = 0.0  # four equally likely children: 0.25 < 0.3
    decoded = taxonomy.decode(logits, full_tables=True)
    assert [s.name for s in decoded.category_path] == ["top"]
    assert decoded.tables["category:top"]["shirt"] == pytest.approx(0.25)


def test_thresholds_from_the_file_apply(taxonomy: Taxonomy) -> None:
    raw = taxonomy.to_dict()
    raw["thresholds"] = {"colour/red": 0.99999}
    strict = Taxonomy.from_dict(raw)
    logits = logits_for(strict, ["top", "shirt"], {"colour": "red", "pattern": "plain"}, 2.0)
    assert strict.decode(logits).tags["colour"] == []
    assert [t.name for t in taxonomy.decode(logits).tags["colour"]] == ["red"]


def test_decode_rejects_a_row_of_the_wrong_length(taxonomy: Taxonomy) -> None:
    with pytest.raises(ValueError, match="expected 33 logits"):
        taxonomy.decode(np.zeros(32))
