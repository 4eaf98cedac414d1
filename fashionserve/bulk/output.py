"""The bulk output format, read and written here only (format version 1).

An output directory ``DIR`` holds::

    DIR/data/part-<n>.parquet   the rows, one per input image (a Parquet dataset)
    DIR/_journal.sqlite         what is committed (:mod:`fashionserve.bulk.journal`)
    DIR/summary.json            counts, throughput, versions, start and end (when complete)
    DIR/_SUCCESS                written last, when every input has a row

The rows of ``data/`` (:data:`COLUMNS`): ``id``, ``uri``, ``status`` (``ok`` or the error
reason, such as ``CORRUPT_IMAGE``), ``message`` (why, when not ok), ``sha256`` of the bytes
read, ``width`` and ``height`` (after EXIF orientation), ``garments`` (a list of structs:
box in pixels, detector score and class, category path and tags with probabilities, and
``embedding`` only in a run with ``--include-embeddings``), and the served ``models``
(name, version: the tagger's version names its calibrated threshold set), ``taxonomy_version``
and ``taxonomy_hash``
that produced the row. Each part file carries the format version in its schema metadata.
A part file is written under a hidden name and renamed in, so readers (``pyarrow``,
``pandas.read_parquet(DIR/data)``) never see half a file; read once ``_SUCCESS`` exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fashionserve.bulk.errors import OutputFormatError
from fashionserve.clients.types import ImageResult, ServingInfo
from fashionserve.parquet import read_versioned

FORMAT_VERSION = 1
VERSION_KEY = b"fashionserve.bulk.format_version"
DATA_DIR = "data"
SUCCESS_FILE = "_SUCCESS"
SUMMARY_FILE = "summary.json"
OK = "ok"
"""The ``status`` of an image analysed without error (any other status is a reason)."""

_LABEL = pa.struct([("name", pa.string()), ("probability", pa.float32())])
_TAG = pa.struct([("group", pa.string()), ("label", pa.string()), ("probability", pa.float32())])
_BOX = pa.struct([(side, pa.float32()) for side in ("x_min", "y_min", "x_max", "y_max")])
_MODEL = pa.struct([("name", pa.string()), ("version", pa.string())])


def garment_type(include_embeddings: bool) -> pa.StructType:
    """The struct of one garment."""
    fields = [
        ("box", _BOX),
        ("detector_score", pa.float32()),
        ("detector_class", pa.string()),
        ("category_path", pa.list_(_LABEL)),
        ("tags", pa.list_(_TAG)),
    ]
    if include_embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    return pa.struct(fields)


def schema(include_embeddings: bool) -> pa.Schema:
    """The schema of every part file of a run."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("uri", pa.string()),
            ("status", pa.string()),
            ("message", pa.string()),
            ("sha256", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("garments", pa.list_(garment_type(include_embeddings))),
            ("models", pa.list_(_MODEL)),
            ("taxonomy_version", pa.string()),
            ("taxonomy_hash", pa.string()),
        ],
        metadata={VERSION_KEY: str(FORMAT_VERSION).encode()},
    )


COLUMNS = tuple(schema(False).names)


@dataclass(frozen=True)
class Served:
    """What served a run: the model versions and the taxonomy identity (from the gateway)."""

    models: tuple[tuple[str, str], ...]
    taxonomy_version: str
    taxonomy_hash: str

    @classmethod
    def from_info(cls, info: ServingInfo) -> Served:
        return cls(
            tuple((m.name, m.version) for m in info.models),
            info.taxonomy_version,
            info.taxonomy_hash,
        )


def ok_row(
    item_id: str, uri: str, sha256: str, result: ImageResult, served: Served, embeddings: bool
) -> dict[str, Any]:
    """The row of an analysed image."""
    garments = []
    for g in result.garments:
        garment: dict[str, Any] = {
            "box": {"x_min": g.box.x_min, "y_min": g.box.y_min, "x_max": g.box.x_max,
                    "y_max": g.box.y_max},
            "detector_score": g.detector_score,
            "detector_class": g.detector_class,
            "category_path": [{"name": s.name, "probability": s.probability}
                              for s in g.category_path],
            "tags": [{"group": t.group, "label": s.name, "probability": s.probability}
                     for t in g.tag_groups for s in t.labels],
        }  # fmt: skip
        if embeddings:
            garment["embedding"] = list(g.embedding or ())
        garments.append(garment)
    return _row(item_id, uri, OK, None, sha256, result.width, result.height, garments, served)


def failed_row(
    item_id: str, uri: str, reason: str, message: str, sha256: str | None, served: Served
) -> dict[str, Any]:
    """The row of an image that could not be analysed: its ``reason`` is the status."""
    return _row(item_id, uri, reason, message, sha256, None, None, [], served)


def _row(
    item_id: str,
    uri: str,
    status: str,
    message: str | None,
    sha256: str | None,
    width: int | None,
    height: int | None,
    garments: list[dict[str, Any]],
    served: Served,
) -> dict[str, Any]:
    return {
        "id": item_id,
        "uri": uri,
        "status": status,
        "message": message,
        "sha256": sha256,
        "width": width,
        "height": height,
        "garments": garments,
        "models": [{"name": name, "version": version} for name, version in served.models],
        "taxonomy_version": served.taxonomy_version,
        "taxonomy_hash": served.taxonomy_hash,
    }


def data_dir(output: Path) -> Path:
    return output / DATA_DIR


def write_part(
    output: Path, name: str, rows: Sequence[dict[str, Any]], include_embeddings: bool
) -> Path:
    """Write ``rows`` as ``data/<name>`` atomically: a hidden file, synced, renamed in.

    The caller records the part in the journal after this returns; a part on disk that the
    journal does not name is removed by the next run.
    """
    folder = data_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    hidden = folder / f".{name}.tmp"
    table = pa.Table.from_pylist(list(rows), schema=schema(include_embeddings))
    pq.write_table(table, hidden, compression="zstd")
    with open(hidden, "rb") as f:
        os.fsync(f.fileno())
    os.replace(hidden, final)
    _fsync_dir(folder)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_files(output: Path) -> list[Path]:
    """The part files present in ``output/data`` (committed or not), sorted by name."""
    folder = data_dir(output)
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def read_part(path: Path) -> pa.Table:
    """One part file, checked to be of this format version."""
    table = read_versioned(path, VERSION_KEY, FORMAT_VERSION, "bulk output", OutputFormatError)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise OutputFormatError(f"{path}: missing columns {', '.join(missing)}")
    return table


def read_output(output: Path, parts: Iterable[str] | None = None) -> pa.Table:
    """The rows of a run: the part files named (the journal's), else every part present."""
    paths = part_files(output) if parts is None else [data_dir(output) / n for n in parts]
    tables = [read_part(p) for p in paths]
    if not tables:
        return schema(False).empty_table()
    return pa.concat_tables(tables, promote_options="none")


@dataclass(frozen=True)
class Summary:
    """``summary.json``: what a complete run produced."""

    format_version: int
    input: str
    shard: str
    images: int
    ok: int
    failed: dict[str, int]
    """Images per failure reason."""
    started_at: str
    finished_at: str
    seconds: float
    images_per_second: float
    """Of the last run (the one that completed the output), over the images it tagged."""
    models: dict[str, str] = field(default_factory=dict)
    taxonomy_version: str = ""
    taxonomy_hash: str = ""

    def write(self, output: Path) -> None:
        """Write ``summary.json`` then ``_SUCCESS``, each atomically."""
        for name, text in (
            (SUMMARY_FILE, json.dumps(asdict(self), indent=2) + "\n"),
            (SUCCESS_FILE, ""),
        ):
            hidden = output / f".{name}.tmp"
            hidden.write_text(text)
            os.replace(hidden, output / name)

    @classmethod
    def read(cls, output: Path) -> Summary:
        """Read and check ``summary.json``."""
        try:
            data = json.loads((output / SUMMARY_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise OutputFormatError(f"{output / SUMMARY_FILE}: {exc}") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise OutputFormatError(
                f"{output / SUMMARY_FILE}: format {data.get('format_version')!r}, "
                f"this version reads {FORMAT_VERSION}"
            )
        return cls(**data)


def clear_success(output: Path) -> None:
    """Remove ``_SUCCESS`` (first) and ``summary.json``: the output is about to change."""
    for name in (SUCCESS_FILE, SUMMARY_FILE):
        (output / name).unlink(missing_ok=True)
