"""The images a load test sends: files from disk, or a few rendered synthetic scenes."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def load_images(paths: Sequence[Path], limit: int = 32) -> list[bytes]:
    """Encoded images from ``paths`` (files, or directories searched recursively, sorted),
    at most ``limit`` of them. Raises ``FileNotFoundError`` when none is found."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image file or directory: {path}")
        if len(files) >= limit:
            break
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {paths}")
    return [p.read_bytes() for p in files[:limit]]


def synthetic_images(count: int = 16, seed: int = 1234) -> list[bytes]:
    """``count`` street scenes (JPEG) from the seeded synthetic renderer.

    Street scenes hold one or more garments on a cluttered background: the images the
    service is built for, so every pipeline step (crops, tagger, embedder) does real work.
    """
    import fashionserve.data.synth as synth

    render = getattr(synth, "render_sample", None)
    if render is not None:
        return [bytes(render(seed=seed + i)) for i in range(count)]
    # Older renderer without render_sample: render a small data set and take its scenes.
    from fashionserve.taxonomy import load_taxonomy

    with tempfile.TemporaryDirectory(prefix="fashionserve-loadtest-") as tmp:
        synth.synthesize(Path(tmp), images=max(8, count), seed=seed, taxonomy=load_taxonomy())
        dirs = [Path(tmp) / split / "images" for split in ("query", "val", "train")]
        return load_images([d for d in dirs if d.is_dir()], limit=count)
