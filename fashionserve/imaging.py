"""Image decoding and letterboxing shared by training, the Triton preprocess step and tests.

Every path that turns encoded bytes into model input goes through these functions, so a
model sees the same pixels in training, in export parity checks and in serving.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from fashionserve.errors import InvalidInput

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
DEFAULT_MAX_PIXELS = 50_000_000

# Magic numbers of formats we can name when refusing them. Only the accepted formats are
# ever handed to PIL, and only to their own plugin (Image.open's `formats`): other parsers
# are attack surface.
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\xff\x0a", "JPEGXL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEGXL"),
    (b"%PDF", "PDF"),
    (b"qoif", "QOI"),
)
_FTYP_BRANDS: dict[bytes, str] = {
    b"heic": "HEIF",
    b"heix": "HEIF",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}


class ImageDecodeError(InvalidInput):
    """The bytes are not an image we accept. ``reason`` is an UPPER_SNAKE code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode JPEG, PNG or WebP bytes to an upright RGB ``uint8`` array ``[H, W, 3]``.

    EXIF orientation is applied; greyscale, palette, CMYK and 16-bit images are converted
    to 8-bit RGB; transparent pixels are composited on white. The format is told by its
    magic number and the bytes go to that format's PIL plugin alone, so a format the
    gateway refuses is not decoded here either (Triton's preprocess step may be reached
    by other paths than the gateway). The header is checked against ``max_pixels`` before
    any pixel is decoded (decompression bombs).
    """
    if not data:
        raise ImageDecodeError("EMPTY_IMAGE", "image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError("NOT_AN_IMAGE", "bytes are not a recognised image")
    if fmt not in ALLOWED_FORMATS:
        raise ImageDecodeError(
            "UNSUPPORTED_FORMAT",
            f"image format {fmt} is not accepted (allowed: {sorted(ALLOWED_FORMATS)})",
        )
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("TOO_MANY_PIXELS", f"image is a decompression bomb: {exc}") from exc
    except Exception as exc:
        raise ImageDecodeError(
            "CORRUPT_IMAGE", f"{fmt} header is corrupt or truncated: {exc}"
        ) from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "TOO_MANY_PIXELS", f"image is {width}x{height} pixels, over the limit of {max_pixels}"
        )
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animated WebP/PNG: analyse the first frame
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            "CORRUPT_IMAGE", f"image data is corrupt or truncated: {exc}"
        ) from exc


def sniff_format(data: bytes) -> str | None:
    """The container format named by the magic number, accepted or not; None if unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], "ISOBMFF")
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in head:
        return "SVG"
    return None


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode to 8-bit RGB; alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        # 16-bit stored in mode "I" still spans 0..65535.
        arr8 = (arr >> 8).astype(np.uint8) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
        return np.repeat(arr8[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed on a square canvas: scaled by ``scale``, at the top left.

    A point ``(x, y)`` on the canvas maps back to ``(x / scale, y / scale)`` in the
    original image.
    """

    scale: float
    width: int  # original image
    height: int


def letterbox(image: np.ndarray, size: int, fill: int = 114) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` ``[H, W, 3]`` to fit a ``size`` x ``size`` canvas keeping its aspect
    ratio, placed at the top left, the rest filled with ``fill``."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w = max(1, min(size, round(width * scale)))
    new_h = max(1, min(size, round(height * scale)))
    resized = np.asarray(
        Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8
    )
    canvas = np.full((size, size, 3), fill, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, Letterbox(scale, width, height)


def square_crop(
    image: np.ndarray, box: tuple[float, float, float, float], size: int, margin: float = 0.1
) -> np.ndarray:
    """Cut ``box`` (x1, y1, x2, y2 in ``image`` pixels) out of ``image``, padded to a square
    around its centre (never stretched), resized to ``size`` x ``size``.

    ``margin`` enlarges the square by that fraction of its side for context. Areas outside
    the image are filled with grey.
    """
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    side_i = max(1, round(side))
    height, width = image.shape[:2]
    patch = np.full((side_i, side_i, 3), 114, dtype=np.uint8)
    sx1, sy1 = max(0, left), max(0, top)
    sx2, sy2 = min(width, left + side_i), min(height, top + side_i)
    if sx2 > sx1 and sy2 > sy1:
        patch[sy1 - top : sy2 - top, sx1 - left : sx2 - left] = image[sy1:sy2, sx1:sx2]
    return np.asarray(
        Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8
    )
