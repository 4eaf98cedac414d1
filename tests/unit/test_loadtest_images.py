"""The load test's phone-photo image set: the sizes, shapes and encodings users send."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionserve.imaging import decode_image
from fashionserve.loadtest.images import (
    PHONE_MEGAPIXELS,
    PhotoFormat,
    phone_photo_formats,
    phone_photos,
    render_photo,
    synthetic_images,
)


def test_sixteen_formats_cover_every_size_aspect_and_way_up() -> None:
    formats = phone_photo_formats(16)
    combos = {
        (
            round(f.megapixels),
            round(max(f.width, f.height) / min(f.width, f.height), 2),
            f.width > f.height,
        )
        for f in formats
    }
    assert combos == {
        (mp, aspect, landscape)
        for mp in PHONE_MEGAPIXELS
        for aspect in (1.33, 1.78)
        for landscape in (True, False)
    }
    jpegs = [f for f in formats if f.codec == "JPEG"]
    assert {f.orientation for f in jpegs} == set(range(1, 9))
    assert all(80 <= f.quality <= 95 for f in jpegs)
    assert 2 <= sum(f.codec == "WEBP" for f in formats) <= 4
    assert phone_photo_formats(16) == formats  # deterministic
    assert {round(f.megapixels) for f in phone_photo_formats(4)} == set(PHONE_MEGAPIXELS)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_photos_show_the_scene_upright_once_their_orientation_is_applied(
    orientation: int,
) -> None:
    (scene,) = synthetic_images(1)
    upright = render_photo(scene, PhotoFormat(400, 300, orientation=1, quality=95))
    stored = render_photo(scene, PhotoFormat(400, 300, orientation=orientation, quality=95))
    with Image.open(io.BytesIO(stored)) as img:
        assert img.size == ((300, 400) if orientation >= 5 else (400, 300))
        assert img.getexif().get(0x0112, 1) == orientation
    a, b = decode_image(upright).astype(int), decode_image(stored).astype(int)
    assert a.shape == b.shape == (300, 400, 3)
    assert np.abs(a - b).mean() < 4  # the same picture, up to JPEG's rounding


def test_phone_photos_are_deterministic_and_kept_on_disk(tmp_path: Path) -> None:
    first = phone_photos(2, seed=3, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert phone_photos(2, seed=3, cache=tmp_path / "elsewhere") == first
    assert phone_photos(2, seed=3, cache=tmp_path) == first
    sizes = [decode_image(data).shape[1::-1] for data in first]
    assert sizes == [(f.width, f.height) for f in phone_photo_formats(2, seed=3)]
    # As heavy as a phone's JPEG: a 2 MP photo of a few hundred kilobytes.
    assert 100_000 < len(first[1]) < 1_000_000
