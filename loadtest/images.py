"""The images a load test sends: files from disk, or a few rendered synthetic scenes."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

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
