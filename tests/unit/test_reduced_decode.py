"""Large photos are decoded no larger than the models need, and answer as if decoded in full.

Triton's preprocess step decodes a JPEG at a reduced DCT scale (1/2, 1/4, 1/8) when its
canvases need fewer pixels; the gateway's checks never decode one at full size. Here the
reduced path is held against the full decode: the same canvas geometry, the same picture,
and, through the committed demo detector, the same garments in the same places.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from fashionserve.gateway.validation import ImageLimits, inspect_image
from fashionserve.imaging import (
    ImageDecodeError,
    Letterbox,
    decode_at_least,
    decode_image,
    letterbox,
)
from fashionserve.loadtest.images import PhotoFormat, render_photo, synthetic_images
from fashionserve.metrics import box_iou
from fashionserve.model_repository.python_models import steps
from fashionserve.model_repository.settings import RepositorySettings

# Stored sizes that libjpeg does not divide evenly at 1/8: the last reduced column and row
# stand for 1/8 of a pixel, so a mapping that ignored it would be off by 7/8 of one.
STORED = (1025, 769)
UPRIGHT = {o: STORED if o <= 4 else STORED[::-1] for o in range(1, 9)}
# Where a white 96x64 block sits in each upright image (left, top).
MARK = (600, 150)


def stored_jpeg(upright: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    """``upright`` stored as a camera would with EXIF ``orientation`` (pixels rotated)."""
    out = io.BytesIO()
    undo = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    image = Image.fromarray(upright)
    if orientation in undo:
        image = image.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(out, "JPEG", quality=quality, exif=exif.tobytes())
    return out.getvalue()


def marked(width: int, height: int) -> np.ndarray:
    image = np.full((height, width, 3), 30, np.uint8)
    image[MARK[1] : MARK[1] + 64, MARK[0] : MARK[0] + 96] = 255
    return image


def centroid(canvas: np.ndarray, box: Letterbox) -> tuple[float, float]:
    """Brightness-weighted centre of the white block on a letterbox canvas."""
    shown = canvas[: round(box.height * box.scale), : round(box.width * box.scale), 0]
    weight = np.clip(shown.astype(np.float64) - 30, 0, None)
    ys, xs = np.indices(weight.shape) + 0.5  # pixel centres
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_maps_canvas_points_to_the_same_original_pixels(orientation: int) -> None:
    width, height = UPRIGHT[orientation]
    data = stored_jpeg(marked(width, height), orientation)
    full = decode_image(data)
    reduced = decode_at_least(data, 128)  # 1025 >= 8 x 128: decoded at 1/8

    assert reduced.pixels.shape[:2] == (-(-height // 8), -(-width // 8))
    assert (reduced.width, reduced.height) == (width, height) == full.shape[1::-1]
    for size in (64, 128):
        full_canvas, full_box = letterbox(full, size)
        canvas, box = letterbox(reduced, size)
        # The coordinate mapping is the full decode's, exactly.
        assert box == full_box
        # The white block is where the full decode puts it, and maps back onto the block:
        # within 0.1 of a canvas pixel (the mapping off by the partial 1/8 column is 0.4).
        cx, cy = centroid(canvas, box)
        fx, fy = centroid(full_canvas, full_box)
        assert abs(cx - fx) < 0.1 and abs(cy - fy) < 0.1
        assert cx / box.scale == pytest.approx(MARK[0] + 48, abs=0.1 / box.scale)
        assert cy / box.scale == pytest.approx(MARK[1] + 32, abs=0.1 / box.scale)
        # Same picture: the block's edges differ by a few levels (DCT scaling filters them
        # slightly otherwise); on average the canvases agree within one grey level.
        assert np.abs(canvas.astype(int) - full_canvas.astype(int)).mean() < 1.0


def test_only_jpegs_large_enough_are_decoded_reduced() -> None:
    image = marked(1025, 769)
    jpeg = stored_jpeg(image, 1)
    assert decode_at_least(jpeg, 512).pixels.shape == (385, 513, 3)  # 1/2 keeps >= 512
    assert decode_at_least(jpeg, 513).pixels.shape == (769, 1025, 3)  # 1/2 would be 512.5
    assert decode_at_least(jpeg, 0).pixels.shape == (769, 1025, 3)
    for fmt in ("PNG", "WEBP"):
        out = io.BytesIO()
        Image.fromarray(image).save(out, fmt)
        decoded = decode_at_least(out.getvalue(), 128)
        assert decoded.pixels.shape == (769, 1025, 3)
        assert decoded.region == (0.0, 0.0, 1025.0, 769.0)


def test_reduced_decode_still_refuses_damaged_and_oversized_jpegs() -> None:
    jpeg = stored_jpeg(marked(1025, 769), 6)
    with pytest.raises(ImageDecodeError) as info:
        decode_at_least(jpeg[: len(jpeg) // 2], 128)
    assert info.value.reason == "CORRUPT_IMAGE"
    with pytest.raises(ImageDecodeError) as info:
        decode_at_least(jpeg, 128, max_pixels=1025 * 769 - 1)  # the original size counts
    assert info.value.reason == "TOO_MANY_PIXELS"


def test_preprocess_finds_the_same_garments_as_a_full_decode() -> None:
    """Phone photos of rendered scenes, one per EXIF orientation and at every DCT scale,
    through the preprocess step and the committed demo detector, against the same
    detector on the full decode (the preprocess step before reduced decoding)."""
    torch = pytest.importorskip("torch")
    from fashionserve.checkpoint import load_checkpoint
    from fashionserve.stack import COMMITTED_CHECKPOINTS

    checkpoint = load_checkpoint(COMMITTED_CHECKPOINTS / "detector.pt")
    detector = checkpoint.build_model().eval()
    det_size = checkpoint.input_size[0]
    crop_size = load_checkpoint(COMMITTED_CHECKPOINTS / "tagger.pt").input_size[0]
    settings = RepositorySettings()  # what is served: the 512 px source canvas, the threshold
    side = steps.decode_side(det_size, settings.source_size, crop_size)
    # Long sides just over 2, 4 and 8 times the decoded side: decoded at 1/2, 1/4 and 1/8.
    assert side * 8 < 4100 and side * 4 < 2060 and side * 2 < 1100
    sizes = [(1100, 825), (825, 1100), (2060, 1159), (1159, 2060), (4100, 2306)]
    photos = [
        render_photo(scene, PhotoFormat(*sizes[o % len(sizes)], orientation=o + 1), seed=o)
        for o, scene in enumerate(synthetic_images(8, seed=77))
    ]
    reduced = steps.preprocess_images(photos, det_size, settings.source_size, crop_size=crop_size)
    full = np.stack([letterbox(decode_image(p), det_size)[0] for p in photos])
    full_input = full.transpose(0, 3, 1, 2).astype(np.float32)

    def garments(det_input: np.ndarray) -> steps.Garments:
        with torch.inference_mode():
            boxes, scores, classes = (t.numpy() for t in detector(torch.from_numpy(det_input)))
        return steps.select_detections(
            boxes,
            scores,
            classes,
            reduced.image_sizes,
            det_size,
            settings.min_score,
            settings.max_crops_per_image,
        )

    found, expected = garments(reduced.det_input), garments(full_input)
    assert reduced.image_sizes.tolist() == [list(sizes[o % len(sizes)]) for o in range(8)]
    assert len(expected) >= 8  # the detector does find the garments
    assert found.image_index.tolist() == expected.image_index.tolist()
    assert found.classes.tolist() == expected.classes.tolist()
    # Boxes agree within half a detector-canvas pixel, in original pixels: the detector
    # regresses boxes on its canvas, and the two canvases differ by a few grey levels at
    # edges. A wrong scale, offset or orientation would move every box by many canvas
    # pixels; an ambiguous edge (a partly hidden garment) may move one box's side by a
    # few, so 90% of boxes must agree that closely and every box must still overlap its
    # full-decode twin almost wholly.
    canvas_pixel = reduced.image_sizes.max(axis=1)[found.image_index] / det_size
    close = np.abs(found.boxes - expected.boxes).max(axis=1) < 0.5 * canvas_pixel
    assert close.mean() >= 0.9, close
    iou = np.diag(box_iou(found.boxes, expected.boxes))
    assert (iou >= 0.9).all(), iou
    np.testing.assert_allclose(found.scores, expected.scores, atol=0.02)


LIMITS = ImageLimits(
    max_image_bytes=64 << 20,
    max_image_pixels=50_000_000,
    max_jpeg_scans=100,
    max_png_chunks=10_000,
    max_png_metadata_bytes=1 << 20,
)


def test_large_photos_are_never_decoded_at_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12 MP photo: the gateway reads its header (with data after the end of the JPEG,
    as some cameras append, it decodes at 1/8 to tell that from a cut file), and the
    preprocess step decodes it at 1/8 for 96 px crops, 1/4 for its 512 px source canvas."""
    loaded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        if self.tile:  # pixels still to decode (a later load() returns them as they are)
            loaded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    photo = stored_jpeg(np.zeros((4000, 3000, 3), np.uint8), 6, quality=80)  # portrait
    trailer = photo + b"camera trailer: depth map, motion photo"

    assert inspect_image(photo, LIMITS).width == 4000
    assert loaded == []
    assert inspect_image(trailer, LIMITS).height == 3000
    assert loaded == [(500, 375)]
    loaded.clear()
    out = steps.preprocess_images([trailer], det_size=256, source_size=512, crop_size=96)
    assert out.image_sizes.tolist() == [[3000, 4000]]
    steps.preprocess_images([trailer], det_size=256, source_size=512)
    assert loaded == [(500, 375), (1000, 750)]
