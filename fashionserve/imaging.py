"""Image decoding and letterboxing shared by training, the Triton preprocess step and tests.

Every path that turns encoded bytes into model input goes through these functions, so a
model sees the same pixels in training, in export parity checks and in serving.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

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
    return decode_at_least(data, 0, max_pixels).pixels


@dataclass(frozen=True)
class Decoded:
    """An upright RGB image, decoded at full size or reduced, and the original it shows.

    ``pixels`` ``[h, w, 3]`` shows the upright ``width`` x ``height`` original within
    ``region`` (x0, y0, x1, y1), in pixel-edge coordinates of ``pixels``: the whole array
    after a full decode. A JPEG decoded at 1/s has ``ceil(W / s)`` columns, the last of
    which may stand for fewer than ``s`` original ones, so its region is ``W / s`` wide;
    after EXIF transposition that partial column (or row) can be on any side.
    """

    pixels: np.ndarray
    width: int
    height: int
    region: tuple[float, float, float, float]

    @classmethod
    def whole(cls, pixels: np.ndarray) -> Decoded:
        """A full-size image: its region is all of it."""
        height, width = pixels.shape[:2]
        return cls(pixels, width, height, (0.0, 0.0, float(width), float(height)))


# EXIF orientation -> the transposition that makes the stored pixels upright (as
# ImageOps.exif_transpose), and whether the upright x and y axes run against the stored
# axes they come from (for orientations 5-8, upright x comes from stored y).
_ORIENTATIONS: dict[int, tuple[Image.Transpose, bool, bool]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, True, False),
    3: (Image.Transpose.ROTATE_180, True, True),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, False, True),
    5: (Image.Transpose.TRANSPOSE, False, False),
    6: (Image.Transpose.ROTATE_270, True, False),
    7: (Image.Transpose.TRANSVERSE, True, True),
    8: (Image.Transpose.ROTATE_90, False, True),
}
_JPEG_DCT_SCALES = (8, 4, 2)  # what libjpeg's scaled IDCT offers (1/8, 1/4, 1/2)


def decode_at_least(data: bytes, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode like :func:`decode_image`, a JPEG at the smallest scale whose longer side is
    still at least ``min_side`` pixels.

    libjpeg scales in the DCT domain (1/2, 1/4, 1/8: PIL's ``Image.draft``), so a 12 MP
    photo needed at 512 px is decoded at 1/4 for a fraction of the full decode's cost; the
    caller says what it needs (the preprocess step: ``steps.decode_side``). Other formats,
    and ``min_side`` 0, decode at full size. The header is checked against ``max_pixels``
    at the original size. :func:`letterbox` places the result exactly where it would
    place the full decode.
    """
    img, fmt = _open(data, max_pixels)
    stored_w, stored_h = img.size
    region = (0.0, 0.0, float(stored_w), float(stored_h))
    longest = max(stored_w, stored_h)
    try:
        scale = next((s for s in _JPEG_DCT_SCALES if longest >= s * min_side > 0), 1)
        if fmt == "JPEG" and scale > 1:
            # PIL picks the largest scale that keeps both sides >= the size asked for, so
            # asking for size // scale gets `scale`; the region it returns says which.
            drafted = img.draft("RGB", (max(1, stored_w // scale), max(1, stored_h // scale)))
            if drafted is not None:  # None: a JPEG PIL cannot scale (several tiles)
                region = drafted[1]
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        width, height = stored_w, stored_h
        if orientation in _ORIENTATIONS:
            method, flip_x, flip_y = _ORIENTATIONS[orientation]
            reduced_w, reduced_h = img.size
            img = img.transpose(method)
            if orientation >= 5:  # a quarter turn: the axes swap
                width, height = stored_h, stored_w
                region = (region[1], region[0], region[3], region[2])
                reduced_w, reduced_h = reduced_h, reduced_w
            x0, y0, x1, y1 = region
            if flip_x:
                x0, x1 = reduced_w - x1, reduced_w - x0
            if flip_y:
                y0, y1 = reduced_h - y1, reduced_h - y0
            region = (x0, y0, x1, y1)
        return Decoded(to_rgb(img), width, height, region)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(
            "CORRUPT_IMAGE", f"image data is corrupt or truncated: {exc}"
        ) from exc


def _open(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Open ``data`` with its format's PIL plugin alone, header checked, no pixel decoded."""
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
    return img, fmt


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


def letterbox(
    image: np.ndarray | Decoded, size: int, fill: int = 114
) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` (``[H, W, 3]``, or a :class:`Decoded` one) to fit a ``size`` x
    ``size`` canvas keeping its aspect ratio, placed at the top left, the rest filled with
    ``fill``.

    A reduced decode is resized from its region to the size the original would get, so
    the canvas and the returned :class:`Letterbox` are the full decode's: a canvas point
    maps back to the same original pixel either way.
    """
    decoded = image if isinstance(image, Decoded) else Decoded.whole(image)
    width, height = decoded.width, decoded.height
    scale = size / max(height, width)
    new_w = max(1, min(size, round(width * scale)))
    new_h = max(1, min(size, round(height * scale)))
    resized = np.asarray(
        Image.fromarray(decoded.pixels).resize(
            (new_w, new_h), Image.Resampling.BILINEAR, box=decoded.region
        ),
        dtype=np.uint8,
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
