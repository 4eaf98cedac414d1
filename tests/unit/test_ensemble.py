"""The ensemble contract on the client side, and the logic of the preprocess and crop steps.

The steps' logic runs here as plain functions (no Triton): boxes found on the detector's
letterboxed canvas must come back in original-image pixels whatever the aspect ratio, crops
must be cut where the garment is, the cap must hold, and no garment must still give the
tagger a tensor it accepts.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fashionserve import ensemble
from fashionserve.imaging import letterbox, square_crop
from fashionserve.model_repository.python_models import steps

S = 128  # detector input side in these tests
K = 6  # detections per image


def encode(image: np.ndarray, fmt: str = "PNG", exif_orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if exif_orientation is None:
        pil.save(buf, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        pil.save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


def detector_output(
    sizes: list[tuple[int, int]], boxes: list[list[tuple[float, float, float, float]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a perfect detector returns: original boxes scaled onto the S canvas, K rows per
    image, scores descending (0.9, 0.8, ...), zero rows after the real ones."""
    n = len(sizes)
    out_boxes = np.zeros((n, K, 4), np.float32)
    out_scores = np.zeros((n, K), np.float32)
    out_classes = np.zeros((n, K), np.int32)
    for i, ((w, h), image_boxes) in enumerate(zip(sizes, boxes, strict=True)):
        scale = S / max(w, h)
        for k, box in enumerate(image_boxes):
            out_boxes[i, k] = np.asarray(box) * scale
            out_scores[i, k] = 0.9 - 0.1 * k
            out_classes[i, k] = k % 3
    return out_boxes, out_scores, out_classes


# ------------------------------------------------------------------ client contract
def test_build_inputs_is_one_dimensional_even_for_equal_lengths() -> None:
    packed = ensemble.build_inputs([b"abcd", b"efgh", b"ijkl"])
    assert packed.shape == (3,)
    assert packed.dtype == object
    assert packed[1] == b"efgh"


def _outputs(index: list[int], logits_width: int = 5, dim: int = 4) -> dict[str, np.ndarray]:
    m = len(index)
    return {
        ensemble.GARMENT_IMAGE_INDEX: np.asarray(index, np.int32),
        ensemble.GARMENT_BOXES: np.arange(m * 4, dtype=np.float32).reshape(m, 4),
        ensemble.GARMENT_SCORES: np.linspace(0.9, 0.5, m).astype(np.float32),
        ensemble.GARMENT_CLASSES: np.arange(m, dtype=np.int32),
        ensemble.TAG_LOGITS: np.arange(m * logits_width, dtype=np.float32).reshape(m, -1),
        ensemble.EMBEDDINGS: np.ones((m, dim), np.float32),
    }


def test_parse_outputs_splits_rows_per_image_in_order() -> None:
    garments = ensemble.parse_outputs(_outputs([0, 0, 2]), n_images=3)
    assert [len(g) for g in garments] == [2, 0, 1]
    first, second = garments[0]
    assert first.box == (0.0, 1.0, 2.0, 3.0)
    assert first.score > second.score
    assert garments[2][0].detector_class == 2
    assert garments[2][0].logits.tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]


def test_parse_outputs_drops_the_dummy_row() -> None:
    garments = ensemble.parse_outputs(_outputs([ensemble.DUMMY_INDEX]), n_images=2)
    assert garments == [[], []]


def test_parse_outputs_rejects_inconsistent_outputs() -> None:
    bad = _outputs([0, 1])
    bad[ensemble.EMBEDDINGS] = bad[ensemble.EMBEDDINGS][:1]
    with pytest.raises(ValueError, match="EMBEDDINGS has 1 rows"):
        ensemble.parse_outputs(bad, n_images=2)
    with pytest.raises(ValueError, match="names image 1"):
        ensemble.parse_outputs(_outputs([0, 1]), n_images=1)


def test_rejections_round_trip_through_tritons_wrapping() -> None:
    text = ensemble.format_rejection("CORRUPT_IMAGE", "truncated", index=3)
    wrapped = f"[StatusCode.INVALID_ARGUMENT] in ensemble 'fashion_pipeline', {text}"
    rejection = ensemble.parse_rejection(wrapped)
    assert rejection == ensemble.Rejection("CORRUPT_IMAGE", "truncated", 3)
    whole = ensemble.parse_rejection(ensemble.format_rejection("TOO_MANY_IMAGES", "20 > 16"))
    assert whole == ensemble.Rejection("TOO_MANY_IMAGES", "20 > 16", None)
    assert ensemble.parse_rejection("connection refused") is None


# ------------------------------------------------------------------- preprocess step
def test_preprocess_letterboxes_and_reports_upright_sizes() -> None:
    wide = np.zeros((60, 200, 3), np.uint8)
    rotated = np.zeros((50, 100, 3), np.uint8)  # stored 100x50, EXIF: rotate 90 degrees
    out = steps.preprocess_images(
        [encode(wide, "JPEG"), encode(rotated, "JPEG", exif_orientation=6)],
        det_size=S,
        source_size=256,
        threads=2,
    )
    assert out.det_input.shape == (2, 3, S, S)
    assert out.det_input.dtype == np.float32
    assert out.source.shape == (2, 256, 256, 3)
    assert out.source.dtype == np.uint8
    assert out.image_sizes.tolist() == [[200, 60], [50, 100]]
    # The image sits at the top left; the rest is the letterbox fill.
    assert out.det_input[0, :, 0, 0].max() < 20
    assert out.det_input[0, :, S - 1, 0].tolist() == [114.0, 114.0, 114.0]


def test_preprocess_names_the_image_that_does_not_decode() -> None:
    good = encode(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(steps.StepError) as info:
        steps.preprocess_images([good, good, b"not an image"], det_size=S)
    assert info.value.index == 2
    assert info.value.reason == "NOT_AN_IMAGE"
    assert ensemble.parse_rejection(str(info.value)) == ensemble.Rejection(
        "NOT_AN_IMAGE", info.value.detail, 2
    )
    with pytest.raises(steps.StepError, match="EMPTY_IMAGE"):
        steps.preprocess_images([b""], det_size=S)


def test_preprocess_refuses_more_images_than_the_cap() -> None:
    good = encode(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(steps.StepError, match=r"TOO_MANY_IMAGES.*5 images.*at most 4"):
        steps.preprocess_images([good] * 5, det_size=S, max_images=4)


# ------------------------------------------------------------------------- crop step
SIZES = [(640, 480), (300, 900), (1000, 1000), (64, 256), (4000, 100)]
BOXES: list[list[tuple[float, float, float, float]]] = [
    [(100, 50, 300, 400), (400, 100, 600, 300)],
    [(10, 500, 290, 880)],
    [(0, 0, 1000, 1000), (250, 250, 750, 750), (10, 10, 60, 90)],
    [(8, 100, 56, 250)],
    [(1000, 10, 3000, 90)],
]


def test_boxes_come_back_in_original_pixels_for_every_aspect_ratio() -> None:
    boxes, scores, classes = detector_output(SIZES, BOXES)
    garments = steps.select_detections(
        boxes, scores, classes, np.asarray(SIZES), S, min_score=0.3, max_per_image=10
    )
    assert garments.image_index.tolist() == [0, 0, 1, 2, 2, 2, 3, 4]
    expected = np.asarray([b for image_boxes in BOXES for b in image_boxes], np.float32)
    np.testing.assert_allclose(garments.boxes, expected, rtol=1e-5, atol=1e-3)
    assert garments.classes.tolist() == [0, 1, 0, 0, 1, 2, 0, 0]
    assert garments.scores.dtype == np.float32


def test_threshold_and_cap_keep_the_best_boxes_per_image() -> None:
    sizes = [(400, 300)] * 2
    many = [(10.0 * k, 10.0, 10.0 * k + 50, 60.0) for k in range(5)]  # scores .9 .8 .7 .6 .5
    boxes, scores, classes = detector_output(sizes, [many, many[:1]])
    garments = steps.select_detections(
        boxes, scores, classes, np.asarray(sizes), S, min_score=0.55, max_per_image=3
    )
    assert garments.image_index.tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(garments.scores, [0.9, 0.8, 0.7, 0.9], rtol=1e-6)
    capped = steps.select_detections(
        boxes, scores, classes, np.asarray(sizes), S, min_score=0.0, max_per_image=2
    )
    # Zero-score rows are kept at min_score 0 only if they are real boxes: empty ones go.
    assert capped.image_index.tolist() == [0, 0, 1]


def test_unsorted_detector_rows_are_ranked_before_the_cap() -> None:
    boxes, scores, classes = detector_output([(100, 100)], [[(0, 0, 10, 10), (20, 20, 40, 40)]])
    scores[0, :2] = [0.4, 0.8]
    garments = steps.select_detections(boxes, scores, classes, np.asarray([(100, 100)]), S, 0.3, 1)
    np.testing.assert_allclose(garments.boxes[0], [20, 20, 40, 40], atol=1e-4)


def test_boxes_are_clipped_and_padding_detections_dropped() -> None:
    sizes = [(200, 100)]  # on the canvas the image covers rows 0..S/2; below is padding
    boxes = np.zeros((1, K, 4), np.float32)
    scores = np.zeros((1, K), np.float32)
    boxes[0, 0] = [-10, -5, 70, 40]  # sticks out at the top left
    boxes[0, 1] = [10, S / 2 + 5, 40, S - 5]  # entirely in the letterbox padding
    scores[0, :2] = [0.9, 0.8]
    garments = steps.select_detections(
        boxes, scores, np.zeros((1, K), np.int32), np.asarray(sizes), S, 0.3, 10
    )
    assert len(garments) == 1
    scale = S / 200
    np.testing.assert_allclose(garments.boxes[0], [0, 0, 70 / scale, 40 / scale], atol=1e-3)


def test_no_detection_gives_one_dummy_row() -> None:
    sizes = np.asarray([(300, 200), (50, 50)])
    boxes, scores, classes = detector_output([(300, 200), (50, 50)], [[], []])
    source = np.zeros((2, 256, 256, 3), np.uint8)
    out = steps.crop_step(
        boxes,
        scores,
        classes,
        source,
        sizes,
        det_size=S,
        crop_size=32,
        min_score=0.3,
        max_per_image=4,
    )
    assert out[ensemble.GARMENT_IMAGE_INDEX].tolist() == [ensemble.DUMMY_INDEX]
    assert out[steps.CROPS].shape == (1, 3, 32, 32)
    assert {name: arr.shape[0] for name, arr in out.items()} == dict.fromkeys(out, 1)


def test_crops_are_cut_where_the_garment_is() -> None:
    """A red and a blue rectangle: each crop's centre has its garment's colour, and the crop
    matches square_crop on the original image."""
    sizes = [(640, 480), (300, 900)]
    boxes_orig: list[list[tuple[float, float, float, float]]] = [
        [(100, 50, 300, 400), (400, 100, 600, 300)],
        [(10, 500, 290, 880)],
    ]
    colours = [[(220, 40, 40), (40, 60, 220)], [(40, 180, 60)]]
    originals, sources = [], []
    for (w, h), image_boxes, image_colours in zip(sizes, boxes_orig, colours, strict=True):
        image = np.full((h, w, 3), 255, np.uint8)
        for (x1, y1, x2, y2), colour in zip(image_boxes, image_colours, strict=True):
            image[int(y1) : int(y2), int(x1) : int(x2)] = colour
        originals.append(image)
        sources.append(letterbox(image, 512)[0])
    boxes, scores, classes = detector_output(sizes, boxes_orig)
    out = steps.crop_step(
        boxes,
        scores,
        classes,
        np.stack(sources),
        np.asarray(sizes),
        det_size=S,
        crop_size=64,
        min_score=0.3,
        max_per_image=4,
    )
    crops = out[steps.CROPS]
    assert crops.shape == (3, 3, 64, 64)
    flat_colours = [c for image_colours in colours for c in image_colours]
    flat_boxes = [(i, b) for i, image_boxes in enumerate(boxes_orig) for b in image_boxes]
    for crop, colour, (i, box) in zip(crops, flat_colours, flat_boxes, strict=True):
        centre = crop[:, 24:40, 24:40].mean(axis=(1, 2))
        np.testing.assert_allclose(centre, colour, atol=3)
        reference = square_crop(originals[i], box, 64).transpose(2, 0, 1).astype(np.float32)
        # Same crop up to the resampling of the source canvas.
        assert np.abs(crop - reference).mean() < 6
