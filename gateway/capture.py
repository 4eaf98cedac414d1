"""Capture: a sample of served results kept for active learning, and its file format.

With ``capture.directory`` set, the gateway keeps a share of each tenant's served images
(``capture.sample_rate``, per tenant ``capture.tenant_sample_rates``) as Parquet records:
request id, tenant, time, image sha256, the served model versions and taxonomy, and per
garment its box, detector score and class, every probability table of the tagger, the
uncertainty of its category (:func:`category_uncertainty`) and its embedding; the image
bytes only with ``capture.include_images``. ``fashionserve active select`` reads them.

Capture never slows or fails a request. The request path only decides whether to sample
and appends a reference to what it already holds (the image bytes and the ensemble's
output) to a bounded queue (:meth:`Capture.offer`); a full queue drops the record and
counts it (``fashionserve_capture_records_total{outcome="dropped"}``). A background thread
does the rest: hashing, probability tables, uncertainty, Parquet encoding and the write.
A file is written when its records reach ``capture.max_file_bytes`` or its first record is
``capture.max_file_seconds`` old, and at shutdown. A failed write loses that file's
records (counted as ``failed``), never the gateway.

The format (version 1, :data:`SCHEMA`), read and written here only: one Parquet file per
rotation, ``capture-<UTC time>-<random>.parquet``, written under a hidden name and renamed
in on a local disk (an object store's write of one object is atomic already), so a reader
(:func:`read_capture`) never sees half a file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import Counter

from fashionserve.errors import FailedPrecondition
from fashionserve.gateway.results import ImageOutput, clip_box
from fashionserve.gateway.served_state import ServedModel
from fashionserve.gateway.settings import CaptureSettings
from fashionserve.parquet import read_versioned
from fashionserve.taxonomy import Taxonomy

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
VERSION_KEY = b"fashionserve.capture.format_version"
FILE_PREFIX = "capture-"
FILE_SUFFIX = ".parquet"

_BOX = pa.struct([(side, pa.float32()) for side in ("x_min", "y_min", "x_max", "y_max")])
_PROBABILITY = pa.struct(
    [("table", pa.string()), ("label", pa.string()), ("probability", pa.float32())]
)
_GARMENT = pa.struct(
    [
        ("box", _BOX),
        ("detector_score", pa.float32()),
        ("detector_class", pa.string()),
        ("category", pa.string()),  # the most probable leaf category
        ("category_probability", pa.float32()),
        ("margin", pa.float32()),
        ("entropy", pa.float32()),
        ("probabilities", pa.list_(_PROBABILITY)),
        ("embedding", pa.list_(pa.float32())),
    ]
)
_MODEL = pa.struct([("name", pa.string()), ("version", pa.string())])
SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("time", pa.timestamp("ms", tz="UTC")),
        ("image_sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("models", pa.list_(_MODEL)),
        ("taxonomy_version", pa.string()),
        ("taxonomy_hash", pa.string()),
        ("garments", pa.list_(_GARMENT)),
        ("image", pa.binary()),  # null unless capture.include_images
    ],
    metadata={VERSION_KEY: str(FORMAT_VERSION).encode()},
)


class CaptureFormatError(FailedPrecondition):
    """A file is not a capture file of this format version."""

    reason = "CAPTURE_FORMAT"


# ------------------------------------------------------------------------ uncertainty
@dataclass(frozen=True)
class Uncertainty:
    """How sure the tagger is of a garment's leaf category.

    ``probability`` of the most probable leaf, ``margin`` between it and the second
    (0: a coin toss between two leaves), ``entropy`` of the leaf distribution divided by
    its maximum, log(number of leaves) (0: certain, 1: uniform).
    """

    category: str
    probability: float
    margin: float
    entropy: float


def category_uncertainty(
    taxonomy: Taxonomy, tables: Mapping[str, Mapping[str, float]]
) -> Uncertainty:
    """The uncertainty over leaf categories, each leaf's probability being the product of
    the conditional probabilities along its path (the taxonomy's one softmax per parent).
    Over leaves rather than per level: a confident "top" with a torn "shirt or blazer" is
    as worth labelling as a torn "top or full-body"."""
    leaves = taxonomy.leaves
    p = np.ones(len(leaves))
    for i, leaf in enumerate(leaves):
        owner = ""
        for name in taxonomy.path(leaf):
            p[i] *= tables[f"category:{owner}"][name]
            owner = name
    order = np.argsort(-p, kind="stable")
    second = float(p[order[1]]) if len(p) > 1 else 0.0
    q = p / max(float(p.sum()), 1e-12)
    entropy = float(-(q * np.log(np.clip(q, 1e-12, 1.0))).sum())
    return Uncertainty(
        leaves[int(order[0])],
        float(p[order[0]]),
        float(p[order[0]]) - second,
        entropy / math.log(len(leaves)) if len(leaves) > 1 else 0.0,
    )


# ------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Pending:
    """What the request path hands over: references to data it already holds."""

    request_id: str
    tenant: str
    time_ms: int
    image: bytes
    output: ImageOutput
    taxonomy: Taxonomy
    models: tuple[ServedModel, ...]

    @property
    def size(self) -> int:
        """Bytes this record holds beyond what the request held anyway (an estimate)."""
        return len(self.image) + sum(
            g.logits.nbytes + g.embedding.nbytes + 64 for g in self.output.garments
        )


def to_row(item: Pending, include_image: bool) -> dict[str, Any]:
    """One record (a row of :data:`SCHEMA`)."""
    output, taxonomy = item.output, item.taxonomy
    garments = []
    for g in output.garments:
        tables = taxonomy.probabilities(g.logits)
        unsure = category_uncertainty(taxonomy, tables)
        box, _ = clip_box(g.box, output.width, output.height)
        cls = g.detector_class
        garments.append(
            {
                "box": {"x_min": box.x_min, "y_min": box.y_min, "x_max": box.x_max,
                        "y_max": box.y_max},
                "detector_score": float(g.score),
                "detector_class": taxonomy.roots[cls] if 0 <= cls < len(taxonomy.roots)
                else f"class-{cls}",
                "category": unsure.category,
                "category_probability": unsure.probability,
                "margin": unsure.margin,
                "entropy": unsure.entropy,
                "probabilities": [
                    {"table": name, "label": label, "probability": p}
                    for name, table in tables.items()
                    for label, p in table.items()
                ],
                "embedding": np.asarray(g.embedding, np.float32).reshape(-1).tolist(),
            }
        )  # fmt: skip
    return {
        "request_id": item.request_id,
        "tenant": item.tenant,
        "time": item.time_ms,
        "image_sha256": hashlib.sha256(item.image).hexdigest(),
        "width": output.width,
        "height": output.height,
        "models": [{"name": m.name, "version": m.version} for m in item.models],
        "taxonomy_version": taxonomy.version,
        "taxonomy_hash": taxonomy.hash,
        "garments": garments,
        "image": item.image if include_image else None,
    }


# --------------------------------------------------------------------------- sinks
class Sink(Protocol):
    """Where capture files go."""

    def write(self, name: str, table: pa.Table) -> str:
        """Write ``table`` as the file ``name``, whole or not at all; returns where."""
        ...


class DirectorySink:
    """A local directory, or object storage through fsspec (``s3://bucket/prefix``...,
    the ``cloud`` extra and the protocol's own package)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.remote = "://" in url and not url.startswith("file://")
        if self.remote:
            try:
                import fsspec
            except ImportError:
                raise FailedPrecondition(
                    f"capture.directory {url}: object storage needs the cloud extra: "
                    "pip install 'fashionserve[cloud]'"
                ) from None
            self.fs, self.root = fsspec.core.url_to_fs(url)
        else:
            self.root = url.removeprefix("file://")
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def write(self, name: str, table: pa.Table) -> str:
        if self.remote:
            path = f"{self.root.rstrip('/')}/{name}"
            with self.fs.open(path, "wb") as f:
                pq.write_table(table, f, compression="zstd")
            return path
        final = Path(self.root) / name
        hidden = final.with_name(f".{name}.tmp")
        pq.write_table(table, hidden, compression="zstd")
        os.replace(hidden, final)
        return str(final)


# ------------------------------------------------------------------------- capture
class Capture:
    """The sampler on the request path and the writer thread behind it."""

    def __init__(self, settings: CaptureSettings, records: Counter, sink: Sink) -> None:
        self.settings = settings
        self.records = records
        self.sink = sink
        self._queue: deque[Pending] = deque()
        self._queued_bytes = 0
        self._lock = threading.Condition()
        self._closing = False
        self._random = random.Random()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)

    @classmethod
    def from_settings(cls, settings: CaptureSettings, records: Counter) -> Capture | None:
        """The capture ``settings`` describe, or None when capture is off."""
        if settings.directory is None:
            return None
        return cls(settings, records, DirectorySink(settings.directory))

    def start(self) -> None:
        self._thread.start()

    def sampled(self, tenant: str) -> bool:
        """Whether to capture this image of ``tenant``."""
        rate = self.settings.tenant_sample_rates.get(tenant, self.settings.sample_rate)
        return rate > 0 and self._random.random() < rate

    def offer(self, item: Pending) -> bool:
        """Queue ``item`` for the writer, or drop it when the queue is full (counted);
        never waits for the writer."""
        size = item.size
        with self._lock:
            full = (
                len(self._queue) >= self.settings.max_queued_records
                or self._queued_bytes + size > self.settings.max_queued_bytes
            )
            if not full and not self._closing:
                self._queue.append(item)
                self._queued_bytes += size
                self._lock.notify()
                return True
        self.records.labels("dropped").inc()
        return False

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop the writer."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self, wait: float | None) -> list[Pending]:
        with self._lock:
            if not self._queue and not self._closing:
                self._lock.wait(wait)
            taken = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            return taken

    def _run(self) -> None:
        rows: list[dict[str, Any]] = []
        size = 0
        opened = 0.0  # monotonic time of the first record of the file being filled
        while True:
            wait = (
                None
                if not rows
                else max(0.0, opened + self.settings.max_file_seconds - time.monotonic())
            )
            taken = self._take(wait)
            for item in taken:
                try:
                    rows.append(to_row(item, self.settings.include_images))
                except Exception:  # a record the writer cannot shape is lost, not the writer
                    log.exception("capture: cannot record request %s", item.request_id)
                    self.records.labels("failed").inc()
                    continue
                if len(rows) == 1:
                    opened = time.monotonic()
                size += item.size + (len(item.image) if self.settings.include_images else 0)
                if size >= self.settings.max_file_bytes:
                    self._write(rows)
                    rows, size = [], 0
            closing = self._closing and not self._queue
            due = rows and time.monotonic() - opened >= self.settings.max_file_seconds
            if rows and (due or closing):
                self._write(rows)
                rows, size = [], 0
            if closing:
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")  # sorts oldest first
        name = f"{FILE_PREFIX}{stamp}-{secrets.token_hex(4)}{FILE_SUFFIX}"
        try:
            where = self.sink.write(name, pa.Table.from_pylist(rows, schema=SCHEMA))
        except Exception:
            log.exception("capture: writing %d records failed; they are lost", len(rows))
            self.records.labels("failed").inc(len(rows))
            return
        self.records.labels("written").inc(len(rows))
        log.debug("capture: %d records written to %s", len(rows), where)


# -------------------------------------------------------------------------- reading
def capture_files(directory: Path) -> list[Path]:
    """The capture files in ``directory``, oldest first."""
    return sorted(Path(directory).glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))


def read_capture_file(path: Path) -> pa.Table:
    """One capture file, checked to be of this format version."""
    return read_versioned(path, VERSION_KEY, FORMAT_VERSION, "capture", CaptureFormatError)


def read_capture(directory: Path) -> list[dict[str, Any]]:
    """Every record of the capture files in ``directory``, as rows of :data:`SCHEMA`."""
    rows: list[dict[str, Any]] = []
    for path in capture_files(directory):
        rows.extend(read_capture_file(path).to_pylist())
    return rows
