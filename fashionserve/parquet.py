"""Parquet files that carry their format version in their schema metadata (bulk output
parts, capture files): the one reader that checks it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fashionserve.errors import Error


def read_versioned(path: Path, key: bytes, version: int, what: str, error: type[Error]) -> pa.Table:
    """The table in ``path``; raises ``error`` (naming the path) when it is no Parquet file
    or its schema metadata ``key`` is not ``version``."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise error(f"{path}: not a Parquet file ({exc})", metadata={"path": str(path)}) from None
    found = metadata.get(key)
    if found != str(version).encode():
        raise error(
            f"{path}: {what} format {found!r}, this version reads {version}",
            metadata={"path": str(path)},
        )
    return pq.read_table(path)
