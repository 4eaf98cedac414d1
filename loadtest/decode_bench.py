"""Benchmark of the preprocess step's decoding (issue 16): full decode against DCT-scaled.

In one command, with nothing running::

    python -m fashionserve.loadtest.decode_bench

For phone photos of 1, 2, 5 and 12 MP (rendered scenes, 4:3, JPEG quality 90, as
:func:`fashionserve.loadtest.images.render_photo` delivers them) it prints the CPU time of
the preprocess step's work on one image (decode, the detector's and the source canvas's
letterboxes, the detector tensor), in this process on one thread:

* ``full``: the image decoded at full size (the step before reduced decoding, and what
  still happens to a PNG or WebP);
* ``reduced``: :func:`fashionserve.model_repository.python_models.steps.preprocess_images`
  as Triton runs it, which decodes a JPEG at the smallest DCT scale that serves the
  detector's canvas and the crops (:func:`~fashionserve.model_repository.python_models.steps.decode_side`);

and their ratio, measured in the same run. Target: 12 MP in <= 40 ms. WebP rows (the
phone-photo set's other format, at the sizes social networks deliver) show what a format
without DCT scaling costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from fashionserve.gateway.validation import ImageLimits, inspect_image
from fashionserve.imaging import decode_at_least, decode_image, letterbox
from fashionserve.loadtest.images import (
    PHONE_MEGAPIXELS,
    PhotoFormat,
    render_photo,
    synthetic_images,
)
from fashionserve.model_repository.python_models import steps
from fashionserve.model_repository.settings import RepositorySettings

TARGET_12MP_MS = 40.0
DEMO_DETECTOR_SIZE = 256  # the committed demo detector's input side
DEMO_CROP_SIZE = 96  # the committed demo tagger's and embedder's
# The gateway's defaults (gateway.settings), for its own check of each photo.
GATEWAY_LIMITS = ImageLimits(
    max_image_bytes=20 << 20,
    max_image_pixels=50_000_000,
    max_jpeg_scans=100,
    max_png_chunks=10_000,
    max_png_metadata_bytes=1 << 20,
)


def cpu_ms(work: Callable[[], object], repeat: int) -> float:
    """Median CPU milliseconds of ``work`` over ``repeat`` runs (after one warm-up run)."""
    work()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1000


def full_preprocess(data: bytes, det_size: int, source_size: int) -> np.ndarray:
    """The preprocess step's work with the image decoded at full size."""
    image = decode_image(data)
    det, _ = letterbox(image, det_size)
    letterbox(image, source_size)
    return np.ascontiguousarray(det.transpose(2, 0, 1)[None].astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fashionserve.loadtest.decode_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--det-size", type=int, default=DEMO_DETECTOR_SIZE, help="detector input side (px)"
    )
    parser.add_argument(
        "--source-size",
        type=int,
        default=RepositorySettings().source_size,
        help="side of the canvas crops are cut from (px)",
    )
    parser.add_argument(
        "--crop-size", type=int, default=DEMO_CROP_SIZE, help="tagger/embedder input side (px)"
    )
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per image (median)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = parser.parse_args(argv)

    (scene,) = synthetic_images(1)
    min_side = steps.decode_side(args.det_size, args.source_size, args.crop_size)
    print(
        f"preprocess CPU ms per image (decode + {args.det_size} px and {args.source_size} px "
        f"letterboxes; JPEGs decoded to >= {min_side} px for {args.crop_size} px crops), "
        f"median of {args.repeat}, one thread"
    )
    print(
        f"{'photo':<22}{'MB':>6}{'decoded at':>12}{'full':>9}{'reduced':>9}{'ratio':>8}"
        f"{'gateway':>9}"
    )
    reduced_12mp = 0.0
    rows = [(mp, "JPEG") for mp in PHONE_MEGAPIXELS] + [(mp, "WEBP") for mp in (1, 2)]
    for megapixels, codec in rows:
        height = round((megapixels * 1e6 * 3 / 4) ** 0.5)
        fmt = PhotoFormat(round(height * 4 / 3), height, codec=codec, quality=args.quality)
        data = render_photo(scene, fmt)
        decoded = decode_at_least(data, min_side).pixels.shape
        full = cpu_ms(partial(full_preprocess, data, args.det_size, args.source_size), args.repeat)
        reduced = cpu_ms(
            partial(
                steps.preprocess_images,
                [data],
                args.det_size,
                args.source_size,
                crop_size=args.crop_size,
            ),
            args.repeat,
        )
        check = cpu_ms(partial(inspect_image, data, GATEWAY_LIMITS), args.repeat)
        if codec == "JPEG" and megapixels == max(PHONE_MEGAPIXELS):
            reduced_12mp = reduced
        name = f"{megapixels} MP {codec} {fmt.width}x{fmt.height}"
        print(
            f"{name:<22}{len(data) / 1e6:>6.2f}{f'{decoded[1]}x{decoded[0]}':>12}"
            f"{full:>9.1f}{reduced:>9.1f}{full / reduced:>7.1f}x{check:>9.2f}"
        )
    verdict = "meets" if reduced_12mp <= TARGET_12MP_MS else "misses"
    print(
        f"12 MP JPEG preprocess: {reduced_12mp:.1f} ms ({verdict} the target of "
        f"<= {TARGET_12MP_MS:.0f} ms); gateway: its own check of each photo, header only"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
