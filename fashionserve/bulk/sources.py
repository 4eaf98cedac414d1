"""The input of a bulk run: what to list, how to shard it, how to read one image.

``SRC`` is a directory (read recursively, in sorted order, hidden files skipped), a CSV
(``.csv``) or Parquet (``.parquet``) file with a ``uri`` column and an optional ``id``
column, or else a manifest with one path or URI per line (blank lines and ``#`` comments
skipped). Relative paths in a manifest, CSV or Parquet file are relative to that file's
directory, so the input reads the same from any working directory or pod.

Everything is streamed: a manifest is read line by line, a Parquet file batch by batch, a
directory one folder at a time, so a 10M-line input is never held in memory.

Local paths and ``file://`` URIs need nothing more; any other URI (``s3://``, ``gs://``...)
goes through fsspec, the optional ``cloud`` extra (``pip install 'fashionserve[cloud]'``,
plus the protocol's own package such as ``s3fs`` or ``gcsfs``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fashionserve.bulk.errors import InputError

READ_BATCH_ROWS = 10_000
"""Rows of a Parquet input read at a time."""


@dataclass(frozen=True)
class InputItem:
    """One image to tag: its ``id`` (the input's ``id`` column, else the URI) and ``uri``."""

    id: str
    uri: str


@dataclass(frozen=True)
class Shard:
    """The ``index``-th of ``count`` deterministic shards of the input (``--shard I/N``)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InputError(f"--shard {self}: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` as on the command line."""
        index, sep, count = text.partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4")
        return cls(int(index), int(count))

    def holds(self, item_id: str) -> bool:
        """Whether ``item_id`` falls in this shard: a stable hash of the id, so the shards
        of one input never overlap and together cover it, on any machine."""
        if self.count == 1:
            return True
        digest = hashlib.sha256(item_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _is_remote(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return len(scheme) > 1 and scheme != "file"  # a one-letter scheme is a Windows drive


def _local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path)
    return uri


def _filesystem(uri: str) -> tuple[Any, str]:
    """fsspec's filesystem for a remote URI and the path inside it."""
    try:
        import fsspec
    except ImportError:
        raise InputError(
            f"{uri}: object storage needs the cloud extra: pip install 'fashionserve[cloud]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise InputError(f"{uri}: {exc}") from None
    return fs, path


def open_binary(uri: str) -> Any:
    """A binary file object for a local path, a ``file://`` URI or an fsspec URI."""
    if _is_remote(uri):
        fs, path = _filesystem(uri)
        return fs.open(path, "rb")
    return open(_local_path(uri), "rb")


def _is_dir(uri: str) -> bool:
    if _is_remote(uri):
        fs, path = _filesystem(uri)
        return bool(fs.isdir(path))
    return os.path.isdir(_local_path(uri))


def _join(base: str, relative: str) -> str:
    if _is_remote(relative) or relative.startswith(("/", "file://")):
        return relative
    return posixpath.join(base, relative) if _is_remote(base) else os.path.join(base, relative)


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if _is_remote(uri) else os.path.dirname(_local_path(uri))


class Source:
    """The input ``SRC`` of a run: :meth:`items` lists it, :meth:`read` reads one image."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        if _is_dir(spec):
            self.kind, self._base = "directory", ""
        else:
            suffix = Path(urlparse(spec).path if _is_remote(spec) else spec).suffix.lower()
            self.kind = {".csv": "csv", ".parquet": "parquet"}.get(suffix, "manifest")
            self._base = _parent(spec)
            try:
                open_binary(spec).close()
            except OSError as exc:
                raise InputError(f"cannot read {spec}: {exc.strerror or exc}") from None

    def items(self) -> Iterator[InputItem]:
        """Every input image, in a deterministic order, streamed."""
        if self.kind == "directory":
            yield from self._directory()
        elif self.kind == "manifest":
            yield from self._manifest()
        elif self.kind == "csv":
            yield from self._csv()
        else:
            yield from self._parquet()

    def read(self, uri: str) -> bytes:
        """The encoded bytes of the image at ``uri`` (as the input spells it)."""
        with open_binary(_join(self._base, uri) if self._base else uri) as f:
            data: bytes = f.read()
        return data

    # ------------------------------------------------------------------------ listing
    def _directory(self) -> Iterator[InputItem]:
        if _is_remote(self.spec):
            fs, root = _filesystem(self.spec)
            protocol = self.spec.split("://", 1)[0]
            for folder, dirs, files in fs.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(f for f in files if not f.startswith(".")):
                    uri = f"{protocol}://{posixpath.join(folder, name)}"
                    yield InputItem(uri, uri)
            return
        root = self.spec
        for folder, dirs, files in os.walk(_local_path(root)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                relative = os.path.relpath(os.path.join(folder, name), _local_path(root))
                uri = _join(root, relative)
                yield InputItem(uri, uri)

    def _text_lines(self) -> Iterator[str]:
        with open_binary(self.spec) as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
            yield from text

    def _manifest(self) -> Iterator[InputItem]:
        for line in self._text_lines():
            uri = line.strip()
            if uri and not uri.startswith("#"):
                yield InputItem(uri, uri)

    def _csv(self) -> Iterator[InputItem]:
        reader = csv.DictReader(self._text_lines())
        columns = reader.fieldnames or []
        if "uri" not in columns:
            raise InputError(f"{self.spec}: no 'uri' column (columns: {', '.join(columns)})")
        for number, row in enumerate(reader, start=2):
            uri = (row.get("uri") or "").strip()
            if not uri:
                raise InputError(f"{self.spec}:{number}: empty uri")
            item_id = (row.get("id") or "").strip()  # no id column, or an empty cell: the uri
            yield InputItem(item_id or uri, uri)

    def _parquet(self) -> Iterator[InputItem]:
        import pyarrow.parquet as pq

        with open_binary(self.spec) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if "uri" not in names:
                raise InputError(f"{self.spec}: no 'uri' column (columns: {', '.join(names)})")
            columns = ["uri", "id"] if "id" in names else ["uri"]
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                uris = batch.column("uri").to_pylist()
                ids = batch.column("id").to_pylist() if "id" in columns else uris
                for item_id, uri in zip(ids, uris, strict=True):
                    if not uri:
                        raise InputError(f"{self.spec}: a row has no uri")
                    yield InputItem(str(item_id) if item_id is not None else uri, uri)
