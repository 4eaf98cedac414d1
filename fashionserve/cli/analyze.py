"""``fashionserve analyze``: send images to the gateway and show what came back.

Prints a readable table by default, JSON with ``--json``, and with ``--draw OUT_DIR`` saves
each image with its boxes and labels drawn on it. Images go in ``BatchAnalyze`` calls of at
most the server's ``max_images_per_batch`` images (and under its message size limit).

Exit status: 0 when every image was analysed; 1 when the call failed (the status code name
and the reason are printed, by :func:`fashionserve.cli.main`) or when any image was refused
(its error is shown in place); 2 for bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from fashionserve.cli.command import add_command
from fashionserve.clients import security
from fashionserve.errors import InvalidInput

if TYPE_CHECKING:  # grpc is imported only when the command runs
    from fashionserve.clients.types import GarmentResult, ImageResult, ItemError, ServingInfo

from fashionserve.clients.security import API_KEY_ENV, GATEWAY_ENV

TOKEN_ENV = "FASHIONSERVE_TOKEN"

# Bytes of a BatchAnalyze message besides the images themselves: field tags, options.
_MESSAGE_SLACK = 64 * 1024


HINTS = {
    "UNAVAILABLE": f"is the gateway running there? (--gateway or {GATEWAY_ENV}; "
    "`fashionserve serve` starts one) Does it serve TLS (--tls, --ca) or need a client "
    "certificate (--cert, --key)?",
    "UNAUTHENTICATED": f"pass a valid key with --api-key or {API_KEY_ENV} (or a token with "
    f"--token or {TOKEN_ENV}) "
    "(`fashionserve serve` prints its development key)",
}
"""What to try when a call to the gateway fails with this status code."""


def add_commands(subparsers: Any) -> None:
    """Add ``analyze`` to the ``fashionserve`` command line."""
    parser = add_command(
        subparsers, "analyze", run, "analyse images through the gateway", error_status=2
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    security.add_gateway_flags(parser)
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        metavar="JWT",
        help=f"bearer token (JWT) instead of an API key (env {TOKEN_ENV})",
    )
    security.add_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--draw", type=Path, metavar="OUT_DIR", help="save each image with its boxes drawn"
    )
    parser.add_argument(
        "--min-score", type=_score, default=0.0, help="drop garments scored below this (0..1)"
    )
    parser.add_argument(
        "--max-garments",
        type=_count,
        default=0,
        help="at most this many per image (0: server cap)",
    )
    parser.add_argument(
        "--embeddings", action="store_true", help="include embeddings (JSON output only)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per call, retries included"
    )


def _score(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


@dataclass
class _Outcome:
    """What happened to one input file."""

    path: Path
    result: ImageResult | None = None
    error: ItemError | None = None


def run(args: argparse.Namespace) -> int:
    """Run ``fashionserve analyze`` with parsed ``args``; returns the exit status."""
    from fashionserve.clients.sync_client import FashionClient
    from fashionserve.clients.types import AnalyzeOptions

    options = AnalyzeOptions(
        min_score=args.min_score,
        max_garments=args.max_garments,
        include_embeddings=args.embeddings,
    )
    data = [_read(path) for path in args.images]
    if args.api_key and args.token:
        raise InvalidInput("pass --api-key or --token, not both")
    outcomes = [_Outcome(path) for path in args.images]
    client = FashionClient(
        args.gateway,
        args.api_key,
        bearer_token=args.token,
        timeout=args.timeout,
        **asdict(security.from_flags(args)),
    )
    with client:
        info = client.get_serving_info()
        for chunk in _chunks(data, info):
            entries = client.batch_analyze([data[i] for i in chunk], options)
            for i, entry in zip(chunk, entries, strict=True):
                outcomes[i].result, outcomes[i].error = entry.result, entry.error

    if args.json:
        json.dump(_as_json(outcomes, info), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(outcomes, sys.stdout)
    if args.draw is not None:
        for path in _draw_all(outcomes, data, args.draw, info):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(o.error is not None for o in outcomes) else 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc


def _chunks(data: Sequence[bytes], info: ServingInfo) -> list[list[int]]:
    """Indices of ``data`` grouped into calls that respect the server's limits."""
    per_call = max(1, info.limits.max_images_per_batch)
    budget = info.limits.max_message_bytes - _MESSAGE_SLACK
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, blob in enumerate(data):
        # An image too large for any message still goes alone: the server names the problem.
        if current and (len(current) >= per_call or size + len(blob) > budget):
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += len(blob)
    if current:
        chunks.append(current)
    return chunks


# ------------------------------------------------------------------------------ output


def _path_text(g: GarmentResult) -> str:
    return " > ".join(f"{s.name} {s.probability:.2f}" for s in g.category_path) or (
        f"{g.detector_class} (detector)"
    )


def _tags_text(g: GarmentResult) -> str:
    parts = []
    for group in g.tag_groups:
        if group.labels:
            labels = ", ".join(f"{s.name} {s.probability:.2f}" for s in group.labels)
            parts.append(f"{group.group}: {labels}")
    return "; ".join(parts) or "-"


def _print_table(outcomes: Sequence[_Outcome], out: TextIO) -> None:
    header = ("image", "#", "box (x1,y1,x2,y2)", "score", "category", "tags")
    rows: list[tuple[str, ...]] = []
    notes: list[tuple[str, str]] = []
    for o in outcomes:
        name = str(o.path)
        if o.error is not None:
            notes.append((name, f"error: {o.error}"))
            continue
        assert o.result is not None
        if not o.result.garments:
            notes.append((name, f"no garments found ({o.result.width}x{o.result.height})"))
            continue
        for n, g in enumerate(o.result.garments, 1):
            box = ",".join(f"{v:.0f}" for v in g.box.as_tuple())
            rows.append(
                (name, str(n), box, f"{g.detector_score:.2f}", _path_text(g), _tags_text(g))
            )
    widths = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(header[:-1])]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], widths, strict=True)]
        return "  ".join([*padded, cells[-1]]).rstrip()

    if rows:
        out.write(line(header) + "\n")
        for r in rows:
            out.write(line(r) + "\n")
    for name, note in notes:
        out.write(f"{name}: {note}\n")


def _as_json(outcomes: Sequence[_Outcome], info: ServingInfo) -> dict[str, Any]:
    from fashionserve.clients.types import to_jsonable

    images: list[dict[str, Any]] = []
    for o in outcomes:
        item: dict[str, Any] = {"image": str(o.path)}
        if o.error is not None:
            item["error"] = to_jsonable(o.error)
        elif o.result is not None:
            item.update(to_jsonable(o.result))
        images.append(item)
    return {
        "taxonomy_version": info.taxonomy_version,
        "models": {m.name: m.version for m in info.models},
        "images": images,
    }


# -------------------------------------------------------------------------------- draw

# One colour per top-level category, in taxonomy order; cycled beyond.
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def _draw_all(
    outcomes: Sequence[_Outcome], data: Sequence[bytes], out_dir: Path, info: ServingInfo
) -> list[Path]:
    """Save each analysed image with its boxes and labels; returns the files written."""
    from PIL import Image, ImageDraw, ImageFont

    from fashionserve.imaging import decode_image

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used: set[str] = set()
    classes: dict[str, int] = {}
    for o, blob in zip(outcomes, data, strict=True):
        if o.result is None:
            continue
        # The server's decoder, so EXIF orientation (and thus box coordinates) agree.
        image = Image.fromarray(decode_image(blob, max_pixels=info.limits.max_image_pixels))
        draw = ImageDraw.Draw(image)
        size = max(12, round(min(image.size) / 40))
        font = ImageFont.load_default(size=size)
        width = max(2, round(min(image.size) / 200))
        for n, g in enumerate(o.result.garments, 1):
            # Coloured by top-level category, the first word a reader checks.
            root = g.category_path[0].name if g.category_path else g.detector_class
            colour = _PALETTE[classes.setdefault(root, len(classes)) % len(_PALETTE)]
            x1, y1, x2, y2 = g.box.as_tuple()
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            label = f"{n} {g.category} {g.detector_score:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            ty = y1 - (bottom - top) - 4 if y1 >= (bottom - top) + 4 else y1
            draw.rectangle((x1, ty, x1 + right - left + 4, ty + bottom - top + 4), fill=colour)
            draw.text((x1 + 2 - left, ty + 2 - top), label, fill=(255, 255, 255), font=font)
        stem = o.path.stem
        name, k = f"{stem}.png", 1
        while name in used:  # two inputs with the same file name
            k += 1
            name = f"{stem}-{k}.png"
        used.add(name)
        target = out_dir / name
        image.save(target)
        written.append(target)
    return written
