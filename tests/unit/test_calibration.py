"""Threshold calibration and the per-class report on synthetic probability tables whose
recall at each threshold is known; the threshold set's file format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fashionserve import thresholds as threshold_sets
from fashionserve.calibration import (
    MIN_SUPPORT,
    Observation,
    calibrate,
    class_report,
    decisions,
    detector_curves,
    wilson,
)
from fashionserve.taxonomy import Taxonomy, load_taxonomy


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def tables_for(taxonomy: Taxonomy, confident: dict[str, tuple[str, float]]) -> dict:
    """Probability tables: in each segment named in ``confident`` (table key -> (label, p))
    the label gets p and the others share the rest; elsewhere uniform (independent: 0.1)."""
    tables: dict[str, dict[str, float]] = {}
    for seg in taxonomy.layout:
        key = f"category:{seg.owner}" if seg.kind == "category" else seg.owner
        if seg.kind == "independent":
            tables[key] = {label: 0.1 for label in seg.labels}
        else:
            tables[key] = {label: 1.0 / len(seg.labels) for label in seg.labels}
        if key in confident:
            label, p = confident[key]
            if seg.kind == "independent":
                tables[key][label] = p
            else:
                rest = (1.0 - p) / (len(seg.labels) - 1)
                tables[key] = {lbl: (p if lbl == label else rest) for lbl in seg.labels}
    return tables


def shirts(taxonomy: Taxonomy, shirt_probabilities: list[float]) -> list[Observation]:
    """Shirts, each sure to be a top (0.99), with the given probability of shirt given top
    and a red colour at 0.9."""
    return [
        Observation(
            tables_for(
                taxonomy,
                {
                    "category:": ("top", 0.99),
                    "category:top": ("shirt", p),
                    "colour": ("red", 0.9),
                },
            ),
            ["top", "shirt"],
            {"colour": "red", "pattern": "plain", "sleeve": "long", "details": []},
        )
        for p in shirt_probabilities
    ]


def test_wilson_interval_narrows_with_support() -> None:
    low_n = wilson(9, 10)
    high_n = wilson(900, 1000)
    assert low_n is not None and high_n is not None
    assert low_n[0] < 0.9 < low_n[1] and high_n[0] < 0.9 < high_n[1]
    assert (high_n[1] - high_n[0]) < (low_n[1] - low_n[0]) / 5
    assert wilson(0, 0) is None


def test_the_highest_threshold_reaching_the_target_recall(taxonomy: Taxonomy) -> None:
    # 100 shirts whose P(shirt | top) is 0.50, 0.505, ... 0.995: recall at threshold t is
    # the share of those >= t, so 0.90 recall is reached at most at 0.55 (90 of 100).
    probabilities = [0.5 + i * 0.005 for i in range(100)]
    result = calibrate(shirts(taxonomy, probabilities), taxonomy, target_recall=0.90)
    shirt = next(o for o in result.outcomes if o.key == "shirt")
    assert shirt.calibrated
    assert shirt.counts.threshold == pytest.approx(0.55, abs=1e-5)
    assert shirt.counts.recall == pytest.approx(0.90)
    assert shirt.counts.precision == pytest.approx(1.0)
    # A per-class override wins over the global target.
    strict = calibrate(
        shirts(taxonomy, probabilities), taxonomy, target_recall=0.90, targets={"shirt": 0.5}
    )
    assert next(o for o in strict.outcomes if o.key == "shirt").counts.threshold == (
        pytest.approx(0.75, abs=1e-5)
    )


def test_negatives_reaching_the_parent_count_against_precision(taxonomy: Taxonomy) -> None:
    observations = shirts(taxonomy, [0.9] * 60)
    # 40 t-shirts the model wrongly calls shirts at 0.8: below 0.9, so not taken.
    observations += [
        Observation(
            tables_for(taxonomy, {"category:": ("top", 0.99), "category:top": ("shirt", 0.8)}),
            ["top", "t-shirt"],
            {},
        )
        for _ in range(40)
    ]
    result = calibrate(observations, taxonomy, target_recall=1.0)
    shirt = next(o for o in result.outcomes if o.key == "shirt")
    assert shirt.counts.threshold == pytest.approx(0.9, abs=1e-5)
    assert shirt.counts.predicted == 60 and shirt.counts.precision == 1.0
    # At a threshold that lets them through, precision falls to 60 / 100.
    report = {r["name"]: r for r in class_report(observations, taxonomy.with_thresholds({}))}
    assert report["top/shirt"]["precision"] == pytest.approx(0.6)


def test_too_little_support_keeps_the_default_and_is_flagged(taxonomy: Taxonomy) -> None:
    result = calibrate(shirts(taxonomy, [0.9] * (MIN_SUPPORT - 1)), taxonomy, 0.9)
    shirt = next(o for o in result.outcomes if o.key == "shirt")
    assert not shirt.calibrated
    assert shirt.counts.threshold == taxonomy.threshold("category", "shirt")
    assert "default kept" in shirt.note
    blazer = next(o for o in result.outcomes if o.key == "blazer")  # no blazer at all
    assert not blazer.calibrated and blazer.counts.support == 0


def test_children_are_calibrated_on_garments_that_pass_their_parent(
    taxonomy: Taxonomy,
) -> None:
    # 50 shirts clearly tops, 50 where "top" is only 0.4 likely (another root wins).
    sure = shirts(taxonomy, [0.9] * 50)
    unsure = [
        Observation(
            tables_for(taxonomy, {"category:": ("bottom", 0.6), "category:top": ("shirt", 0.6)}),
            ["top", "shirt"],
            {},
        )
        for _ in range(50)
    ]
    observations = sure + unsure
    result = calibrate(observations, taxonomy, target_recall=0.9)
    top = next(o for o in result.outcomes if o.key == "top")
    shirt = next(o for o in result.outcomes if o.key == "shirt")
    # "top" is never the best root for the unsure half: recall 0.5 at most, flagged.
    assert top.counts.recall == pytest.approx(0.5) and "not reachable" in top.note
    # shirt is decided only where top passed: the 50 sure ones, all at 0.9.
    assert shirt.counts.support == 50
    assert shirt.counts.threshold == pytest.approx(0.9, abs=1e-5)
    served = calibrate(observations, taxonomy, 0.9).threshold_set(taxonomy, "t", {})
    report = {r["name"]: r for r in class_report(observations, served.apply(taxonomy))}
    assert report["top/shirt"]["recall"] == pytest.approx(1.0)
    assert report["top/shirt"]["recall_end_to_end"] == pytest.approx(0.5)


def test_tags_are_decided_at_their_level(taxonomy: Taxonomy) -> None:
    """A colour is decided on every garment, a sleeve only where the decoded path reached
    a top or full-body garment: 10 red long-sleeved tops whose category is not decoded at
    all still count for colour, and drop out of sleeve's support."""
    observations = shirts(taxonomy, [0.9] * 40)
    observations += [
        Observation(
            tables_for(taxonomy, {"colour": ("red", 0.9), "sleeve": ("long", 0.9)}),
            ["top", "shirt"],
            {"colour": "red", "pattern": "plain", "sleeve": "long", "details": []},
        )
        for _ in range(10)
    ]
    found = decisions(observations, taxonomy, ["colour/red", "sleeve/long"])
    assert found["colour/red"].support == 50
    assert int((found["colour/red"].score > 0).sum()) == 50
    assert found["sleeve/long"].support == 40
    # The end-to-end recall of sleeve/long counts the 10 undecided tops as misses.
    rows = {r["name"]: r for r in class_report(observations, taxonomy)}
    assert rows["colour/red"]["recall_end_to_end"] == 1.0
    long_sleeves = rows["sleeve/long"]
    assert long_sleeves["recall_end_to_end"] <= 0.8 * 1.0001
    assert long_sleeves["support"] == 40


def test_detector_curves_match_greedily_by_score() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float64)
    predictions = [(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]))]
    truth = [(np.array([[0, 0, 10, 10]], np.float64), np.array([0]))]
    (curve,) = detector_curves(predictions, truth, ["top"])
    assert curve.true_positive.tolist() == [True, False, False]
    assert curve.num_gt == 1 and curve.ap() == pytest.approx(1.0)


def test_threshold_set_round_trip_and_validation(taxonomy: Taxonomy, tmp_path: Path) -> None:
    result = calibrate(shirts(taxonomy, [0.9] * 40), taxonomy, 0.9)
    made = result.threshold_set(taxonomy, "daily", {"split": "val"})
    path = threshold_sets.save(made, tmp_path / "thresholds.yaml")
    loaded = threshold_sets.load(path)
    assert loaded == made and loaded.hash == made.hash
    assert loaded.apply(taxonomy).threshold("category", "shirt") == pytest.approx(0.9, abs=1e-5)
    assert loaded.apply(taxonomy).hash == taxonomy.hash

    doc = made.model_dump(mode="json")
    doc["schema_version"] = 2
    doc["thresholds"]["shirt"]["threshold"] = 1.5
    with pytest.raises(threshold_sets.ThresholdsError) as err:
        threshold_sets.from_dict(doc, "bad.yaml")
    assert "schema_version" in str(err.value) and "thresholds.shirt.threshold" in str(err.value)

    other = Taxonomy.from_dict({**taxonomy.to_dict(), "version": "9999.1.0"})
    with pytest.raises(threshold_sets.ThresholdsError, match="is for taxonomy"):
        made.apply(other)
