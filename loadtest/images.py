"""The images a load test sends: files from disk, a few rendered synthetic scenes (the
small-image set), or those scenes delivered as phone photos (1-12 MP, EXIF orientation,
JPEG and WebP: the phone-photo set)."""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import ExifTags, Image

from fashionserve.errors import InvalidInput

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def load_images(paths: Sequence[Path], limit: int = 32) -> list[bytes]:
    """Encoded images from ``paths`` (files, or directories searched recursively, sorted),
    at most ``limit`` of them. Raises :class:`InvalidInput` when none is found."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidInput(f"no such image file or directory: {path}")
        if len(files) >= limit:
            break
    if not files:
        raise InvalidInput(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {paths}")
    return [p.read_bytes() for p in files[:limit]]


def synthetic_images(count: int = 16, seed: int = 1234) -> list[bytes]:
    """``count`` JPEG scenes from the seeded synthetic renderer: street scenes first, then
    val and train scenes.

    Street scenes hold one or more garments on a cluttered background: the images the
    service is built for, so every pipeline step (crops, tagger, embedder) does real work.
    """
    from fashionserve.data.dataset import render_samples

    samples = render_samples(max(8, count), seed, splits=("query", "val", "train"))
    return [sample.image for sample in itertools.islice(samples, count)]


# ------------------------------------------------------------------ phone photos
PHONE_MEGAPIXELS = (1, 2, 5, 12)
"""The sizes cameras and social networks deliver (12 MP: a phone's main camera)."""

_ASPECTS = ((4, 3), (16, 9))
# Orientation tags as phones write them: upright (1), rotated for a portrait or upside-down
# shot (6, 8, 3), and mirrored (front cameras, edited files: 2, 4, 5, 7).
_ORIENTATIONS = (1, 6, 1, 8, 3, 1, 6, 2, 1, 5, 4, 7)
# What to do to the upright pixels so that applying the EXIF tag gives them back.
_STORE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
# Grain, grey levels (standard deviation): with it a 4000x3000 JPEG at quality 90 weighs
# 2.6 MB, as a phone's does; without it an upscaled scene compresses to a third of that.
_SENSOR_NOISE = 6.0


@dataclass(frozen=True)
class PhotoFormat:
    """How one phone photo is delivered: its upright size, how its pixels are stored (EXIF
    ``orientation``, 1 = as shown), and its encoding."""

    width: int
    height: int
    orientation: int = 1
    codec: str = "JPEG"  # or "WEBP"
    quality: int = 90

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def phone_photo_formats(count: int, seed: int = 1234) -> list[PhotoFormat]:
    """``count`` delivery formats cycling over 1, 2, 5 and 12 MP, 4:3 and 16:9, landscape and
    portrait, the EXIF orientations phones write, JPEG quality 80-95; a quarter are WebP at
    1 and 2 MP, as social networks re-encode photos (quality 75-90, no EXIF orientation)."""
    rng = np.random.default_rng([seed, 1])
    formats: list[PhotoFormat] = []
    for i in range(count):
        long_to_short = _ASPECTS[(i // len(PHONE_MEGAPIXELS)) % 2]
        pixels = PHONE_MEGAPIXELS[i % len(PHONE_MEGAPIXELS)] * 1e6
        short = round(math.sqrt(pixels * long_to_short[1] / long_to_short[0]))
        long = round(short * long_to_short[0] / long_to_short[1])
        # Every 16 photos hold each size, aspect and way up once; any 4 hold both ways up.
        portrait = (i + i // 4 + i // 8) % 2 == 1
        width, height = (short, long) if portrait else (long, short)
        if i % 8 in (4, 5):
            formats.append(PhotoFormat(width, height, 1, "WEBP", int(rng.integers(75, 91))))
        else:
            jpegs = sum(f.codec == "JPEG" for f in formats)
            orientation = _ORIENTATIONS[jpegs % len(_ORIENTATIONS)]
            quality = int(rng.integers(80, 96))
            formats.append(PhotoFormat(width, height, orientation, "JPEG", quality))
    return formats


def render_photo(scene: bytes, fmt: PhotoFormat, seed: int = 0) -> bytes:
    """``scene`` (any image) as a phone delivers it in ``fmt``: scaled to cover the upright
    size and centre-cropped (never stretched), sensor grain added, the pixels stored rotated
    or mirrored as the EXIF orientation tag says, encoded with 4:2:0 chroma like a camera."""
    with Image.open(io.BytesIO(scene)) as src:
        image = src.convert("RGB")
    cover = max(fmt.width / image.width, fmt.height / image.height)
    scaled_w, scaled_h = math.ceil(image.width * cover), math.ceil(image.height * cover)
    left, top = (scaled_w - fmt.width) // 2, (scaled_h - fmt.height) // 2
    image = image.resize(
        (fmt.width, fmt.height),
        Image.Resampling.BICUBIC,
        box=(left / cover, top / cover, (left + fmt.width) / cover, (top + fmt.height) / cover),
    )
    rng = np.random.default_rng([seed, fmt.width, fmt.height])
    grain = rng.standard_normal((fmt.height, fmt.width, 3), dtype=np.float32) * _SENSOR_NOISE
    grain += np.asarray(image, dtype=np.float32)
    image = Image.fromarray(np.clip(grain, 0, 255, out=grain).astype(np.uint8))
    if fmt.orientation in _STORE:
        image = image.transpose(_STORE[fmt.orientation])
    out = io.BytesIO()
    if fmt.codec == "WEBP":
        image.save(out, "WEBP", quality=fmt.quality, method=4)
    else:
        exif = Image.Exif()
        if fmt.orientation != 1:
            exif[ExifTags.Base.Orientation] = fmt.orientation
        image.save(out, "JPEG", quality=fmt.quality, subsampling="4:2:0", exif=exif.tobytes())
    return out.getvalue()


def phone_photos(count: int = 16, seed: int = 1234, cache: Path | None = None) -> list[bytes]:
    """``count`` phone photos: the scenes of :func:`synthetic_images` delivered in the formats
    of :func:`phone_photo_formats`, the same bytes for the same arguments.

    Making a 12 MP photo takes about a second, so each is kept in ``cache`` (default:
    :func:`default_cache`), under a name made from everything its bytes depend on: the
    scene, the format, the seed, this module's source and Pillow's version.
    """
    cache = cache or default_cache()
    recipe = hashlib.sha256(Path(__file__).read_bytes() + PIL.__version__.encode()).digest()
    photos = []
    for scene, fmt in zip(
        synthetic_images(count, seed), phone_photo_formats(count, seed), strict=True
    ):
        key = hashlib.sha256(recipe + scene + repr((fmt, seed)).encode()).hexdigest()[:32]
        path = cache / f"{key}.{fmt.codec.lower()}"
        if path.is_file():
            photos.append(path.read_bytes())
            continue
        data = render_photo(scene, fmt, seed)
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(data)
        partial.replace(path)  # whole or absent, whoever else is making the same photo
        photos.append(data)
    return photos


def default_cache() -> Path:
    """Where phone photos are kept: ``$XDG_CACHE_HOME/fashionserve/phone-photos`` (else
    ``~/.cache/...``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fashionserve" / "phone-photos"
