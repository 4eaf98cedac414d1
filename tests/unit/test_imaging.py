"""Decoding of the image variants users send, and the geometry the models rely on."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fashionserve.imaging import ImageDecodeError, decode_image, letterbox, square_crop


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def red_left_half(width: int = 80, height: int = 40) -> Image.Image:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    out = decode_image(encode(red_left_half(), fmt))
    assert out.shape == (40, 80, 3) and out.dtype == np.uint8
    assert out[20, 10, 0] > 200 and out[20, 70, 0] < 60


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display upright
    out = decode_image(encode(red_left_half(), "JPEG", exif=exif.tobytes()))
    assert out.shape == (80, 40, 3)  # portrait after rotation
    assert out[10, 20, 0] > 200 and out[70, 20, 0] < 60  # red half now on top


def test_cmyk_greyscale_and_palette_become_rgb() -> None:
    base = red_left_half()
    for img in (base.convert("CMYK"), base.convert("L"), base.convert("P")):
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        assert decode_image(encode(img, fmt)).shape == (40, 80, 3)


def test_sixteen_bit_png_keeps_its_range() -> None:
    arr = np.full((10, 10), 65535, np.uint16)
    arr[:, :5] = 0
    out = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out[0, 9].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"))[4, 4].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "EMPTY_IMAGE"),
        (b"this is not an image at all", "NOT_AN_IMAGE"),
        (encode(red_left_half(), "GIF"), "UNSUPPORTED_FORMAT"),
        (encode(red_left_half(), "BMP"), "UNSUPPORTED_FORMAT"),
        (encode(red_left_half(), "TIFF"), "UNSUPPORTED_FORMAT"),
        # Formats PIL would open but the pipeline does not name: no parser sees them.
        (encode(red_left_half(), "PPM"), "NOT_AN_IMAGE"),
        (encode(red_left_half(), "TGA"), "NOT_AN_IMAGE"),
        (encode(red_left_half(400, 400), "JPEG")[:300], "CORRUPT_IMAGE"),
        (encode(red_left_half(400, 400), "JPEG")[:-400], "CORRUPT_IMAGE"),
    ],
)
def test_bad_input_is_named(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_bytes_go_to_their_formats_parser_alone(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding (in Triton's preprocess step too) opens an image with the PIL plugin its
    magic number names, and no other."""
    opened: list[object] = []
    open_image = Image.open

    def spy(fp: object, mode: str = "r", formats: object = None) -> Image.Image:
        opened.append(formats)
        return open_image(fp, mode, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    decode_image(encode(red_left_half(), fmt))
    assert opened == [[fmt]]


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(encode(red_left_half(100, 100), "PNG"), max_pixels=9_999)
    assert info.value.reason == "TOO_MANY_PIXELS"


def test_letterbox_keeps_aspect_ratio_at_the_top_left() -> None:
    canvas, box = letterbox(np.asarray(red_left_half(200, 100)), 64)
    assert canvas.shape == (64, 64, 3)
    assert box.scale == pytest.approx(64 / 200)
    assert canvas[40, 10].tolist() == [114, 114, 114]  # padding below the image
    assert canvas[10, 10, 0] > 200 and canvas[10, 50, 0] < 60


def test_square_crop_never_stretches() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[40:60, 20:180] = 255  # a wide white bar
    crop = square_crop(img, (20, 40, 180, 60), 32, margin=0.0)
    rows = np.where(crop[:, :, 0].mean(axis=1) > 128)[0]
    # The bar is 8 times wider than tall, and stays so: about 4 of 32 rows.
    assert 2 <= len(rows) <= 6
