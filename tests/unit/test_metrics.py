"""Quality metrics on hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fashionserve.metrics import (
    box_iou,
    category_accuracy,
    detection_map50,
    exclusive_tag_accuracy,
    match_detections,
    retrieval_accuracy,
)

GT_BOXES = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 0, 60, 30]], np.float64)
GT_CLASSES = np.array([0, 0, 1])


def _perfect() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return GT_BOXES.copy(), np.array([0.9, 0.8, 0.7]), GT_CLASSES.copy()


def test_iou_of_identical_disjoint_and_half_overlapping_boxes() -> None:
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]])
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 0.0, 50 / 150])


def test_perfect_detections_give_map_one() -> None:
    result = detection_map50([_perfect()], [(GT_BOXES, GT_CLASSES)], num_classes=2)
    assert result["map50"] == pytest.approx(1.0)
    assert result["ap"] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_a_top_scored_false_positive_costs_the_right_amount() -> None:
    boxes, scores, classes = _perfect()
    # A confident class-0 box on empty space: class 0's ranking becomes FP, TP, TP:
    # precision 1/2 at recall 1/2 and 2/3 at recall 1, so AP = 0.5*2/3 + 0.5*2/3 = 2/3.
    fp = np.array([[100, 100, 120, 120]])
    pred = (np.vstack([boxes, fp]), np.append(scores, 0.95), np.append(classes, 0))
    result = detection_map50([pred], [(GT_BOXES, GT_CLASSES)], num_classes=2)
    assert result["ap"][0] == pytest.approx(2 / 3)
    assert result["ap"][1] == pytest.approx(1.0)
    assert result["map50"] == pytest.approx((2 / 3 + 1) / 2)


def test_a_low_scored_false_positive_costs_nothing_and_a_miss_costs_recall() -> None:
    boxes, scores, classes = _perfect()
    pred = (
        np.vstack([boxes, [[100, 100, 120, 120]]]),
        np.append(scores, 0.1),
        np.append(classes, 0),
    )
    assert detection_map50([pred], [(GT_BOXES, GT_CLASSES)], 2)["map50"] == pytest.approx(1.0)
    missing = (boxes[1:], scores[1:], classes[1:])
    result = detection_map50([missing], [(GT_BOXES, GT_CLASSES)], 2)
    assert result["ap"][0] == pytest.approx(0.5)


def test_duplicates_and_wrong_classes_are_false_positives() -> None:
    boxes, scores, _ = _perfect()
    wrong = (boxes, scores, np.array([1, 1, 0]))
    assert detection_map50([wrong], [(GT_BOXES, GT_CLASSES)], 2)["map50"] == pytest.approx(0.0)
    dup = (np.vstack([boxes[:1], boxes[:1]]), np.array([0.9, 0.8]), np.array([0, 0]))
    result = detection_map50([dup], [(GT_BOXES[:1], GT_CLASSES[:1])], 2)
    assert result["ap"][0] == pytest.approx(1.0)  # duplicate ranked after the hit
    assert math.isnan(result["ap"][1]) and result["map50"] == pytest.approx(1.0)


def test_map_pools_detections_across_images() -> None:
    gt = [(GT_BOXES[:1], GT_CLASSES[:1]), (GT_BOXES[1:2], GT_CLASSES[1:2])]
    # Image 0's detection is a miss with the highest score; image 1's is a hit.
    preds = [
        (np.array([[30, 30, 35, 35]]), np.array([0.9]), np.array([0])),
        (GT_BOXES[1:2], np.array([0.5]), np.array([0])),
    ]
    assert detection_map50(preds, gt, 1)["ap"][0] == pytest.approx(0.5 * 0.5)


def test_greedy_matching_gives_each_ground_truth_at_most_one_prediction() -> None:
    pred = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [200, 200, 210, 210]], np.float64)
    match = match_detections(pred, np.array([0.5, 0.9, 0.8]), GT_BOXES[:2])
    # The 0.9 box takes GT 0 first; the 0.5 box finds it taken; GT 1 has no overlap.
    assert match.tolist() == [1, -1]
    assert match_detections(np.zeros((0, 4)), np.zeros(0), GT_BOXES).tolist() == [-1, -1, -1]


def test_category_and_exclusive_tag_accuracy() -> None:
    assert (
        category_accuracy(["shirt", "skirt", None, "dress"], ["shirt", "shorts", "coat", "dress"])
        == 0.5
    )
    truth = [
        {"colour": "red", "pattern": "plain", "sleeve": "long"},
        {"colour": "blue", "pattern": "striped"},  # a bottom: sleeve does not apply
    ]
    pred = [
        {"colour": "red", "pattern": "dotted", "sleeve": "long"},
        {"colour": "blue", "pattern": "striped", "sleeve": "short"},
    ]
    acc = exclusive_tag_accuracy(pred, truth, ["colour", "pattern", "sleeve"])
    assert acc["colour"] == 1.0 and acc["pattern"] == 0.5 and acc["sleeve"] == 1.0
    assert acc["overall"] == pytest.approx(4 / 5)


def test_retrieval_accuracy_on_a_toy_gallery() -> None:
    gallery = np.array([[1, 0], [0, 1], [-1, 0]], np.float64)
    gallery_ids = [10, 20, 30]
    query = np.array([[0.9, 0.1], [0.6, 0.8], [0.1, -1.0]])
    # Query 0 ranks 10 first (hit). Query 1 (id 30) ranks 20, 10, 30; query 2 (id 20)
    # ranks 10, 30, 20: both are found only at rank 3.
    result = retrieval_accuracy(query, [10, 30, 20], gallery, gallery_ids, ks=(1, 2, 3))
    assert result["acc@1"] == pytest.approx(1 / 3)
    assert result["acc@2"] == pytest.approx(1 / 3)
    assert result["acc@3"] == pytest.approx(1.0)
    # Scale does not matter: cosine similarity.
    assert retrieval_accuracy(query * 7, [10, 30, 20], gallery, gallery_ids)[
        "acc@1"
    ] == pytest.approx(1 / 3)
