"""The check that a peer of the benchmark does fashionserve's work: same garments, same
top category (``fashionserve.loadtest.peers.pipeline.same_answers``). Needs no Ray."""

from __future__ import annotations

from fashionserve.loadtest.peers.pipeline import same_answers
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb


def garment(top: str, x: float = 10.0, cls: str = "top", score: float = 0.9) -> pb.Garment:
    return pb.Garment(
        box=pb.Box(x_min=x, y_min=20.0, x_max=x + 50.0, y_max=90.0),
        detector_score=score,
        detector_class=cls,
        category_path=[pb.ScoredLabel(name=top, probability=0.8)],
    )


def image(*garments: pb.Garment) -> pb.ImageResult:
    return pb.ImageResult(width=640, height=480, garments=list(garments))


def test_the_same_garments_agree_whatever_the_last_digits_of_scores_and_boxes():
    ours = image(garment("top"), garment("bottom", x=200.0, cls="bottom"))
    theirs = image(garment("top", x=10.4, score=0.8999), garment("bottom", x=200.0, cls="bottom"))
    assert same_answers(ours, theirs) is None


def test_each_difference_is_named():
    ours = image(garment("top"))
    assert "1 garments != 0" in (same_answers(ours, image()) or "")
    assert "top != top/full-body" in (same_answers(ours, image(garment("full-body"))) or "")
    assert "box" in (same_answers(ours, image(garment("top", x=14.0))) or "")  # 640 px: 3.2
    resized = pb.ImageResult(width=480, height=640, garments=ours.garments)
    assert "image size" in (same_answers(ours, resized) or "")


def test_boxes_of_a_large_photo_may_move_by_a_fraction_of_a_detector_pixel():
    def photo(x: float) -> pb.ImageResult:
        return pb.ImageResult(width=3000, height=4000, garments=[garment("top", x=x)])

    assert same_answers(photo(10.0), photo(11.7)) is None  # 0.5% of 4000 px: 20 px
    assert "box" in (same_answers(photo(10.0), photo(31.0)) or "")
