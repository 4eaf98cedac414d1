"""The input of ``batch run`` (listing, sharding, reading) and the output format, alone."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fashionserve.bulk.errors import InputError, OutputFormatError
from fashionserve.bulk.output import (
    COLUMNS,
    Served,
    Summary,
    failed_row,
    read_output,
    read_part,
    schema,
    write_part,
)
from fashionserve.bulk.sources import InputItem, Shard, Source


def test_a_directory_is_listed_recursively_in_sorted_order_without_hidden_files(
    tmp_path: Path,
) -> None:
    for name in ("b/2.jpg", "b/1.jpg", "a/z.png", "c.webp", ".hidden/x.jpg", "a/.DS_Store"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    source = Source(str(tmp_path))
    uris = [item.uri for item in source.items()]
    assert uris == [str(tmp_path / n) for n in ("c.webp", "a/z.png", "b/1.jpg", "b/2.jpg")]
    assert source.read(uris[0]) == b"c.webp"


def test_a_manifest_reads_paths_relative_to_itself_and_file_uris(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"A")
    (tmp_path / "abs.jpg").write_bytes(b"B")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# today\nimg/a.jpg\n\n  file://{tmp_path}/abs.jpg  \n")
    source = Source(str(manifest))
    items = list(source.items())
    assert items == [
        InputItem("img/a.jpg", "img/a.jpg"),
        InputItem(*[f"file://{tmp_path}/abs.jpg"] * 2),
    ]
    assert [source.read(i.uri) for i in items] == [b"A", b"B"]


def test_csv_and_parquet_inputs_take_the_id_column_when_there_is_one(tmp_path: Path) -> None:
    (tmp_path / "input.csv").write_text("uri,id\na.jpg,sku-1\nb.jpg,\n")
    assert list(Source(str(tmp_path / "input.csv")).items()) == [
        InputItem("sku-1", "a.jpg"),
        InputItem("b.jpg", "b.jpg"),
    ]
    pq.write_table(
        pa.table(
            {"uri": [f"{i}.jpg" for i in range(25_000)], "id": [f"p{i}" for i in range(25_000)]}
        ),
        tmp_path / "input.parquet",
        row_group_size=5_000,
    )
    items = list(Source(str(tmp_path / "input.parquet")).items())
    assert len(items) == 25_000 and items[-1] == InputItem("p24999", "24999.jpg")
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="no 'uri' column"):
        list(Source(str(tmp_path / "bad.parquet")).items())


def test_object_storage_goes_through_fsspec() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe({"/bulk-test/day/a.jpg": b"A", "/bulk-test/day/sub/b.jpg": b"B"})
    source = Source("memory://bulk-test/day")
    items = list(source.items())
    assert [i.uri for i in items] == [
        "memory:///bulk-test/day/a.jpg",
        "memory:///bulk-test/day/sub/b.jpg",
    ]
    assert [source.read(i.uri) for i in items] == [b"A", b"B"]


def test_a_missing_input_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        Source(str(tmp_path / "nothing.txt"))


def test_shards_are_stable_disjoint_and_cover_the_input() -> None:
    ids = [f"image-{i}" for i in range(3000)]
    shards = [Shard(i, 3) for i in range(3)]
    held = [[i for i in ids if s.holds(i)] for s in shards]
    assert sorted(i for h in held for i in h) == sorted(ids)
    assert all(900 < len(h) < 1100 for h in held)
    # The hash is part of the contract: pods of one Job, and reruns, must agree forever.
    assert [s.index for s in shards if s.holds("sku-42")] == [1]
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("4/4", "1", "-1/2", "a/b"):
        with pytest.raises(InputError):
            Shard.parse(bad)


SERVED = Served((("detector", "1"),), "2026.11.0", "hash")


def test_the_output_format_is_versioned_and_checked(tmp_path: Path) -> None:
    rows = [failed_row("x", "x.jpg", "CORRUPT_IMAGE", "bad", None, SERVED)]
    path = write_part(tmp_path, "part-000000.parquet", rows, include_embeddings=False)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["part-000000.parquet"]
    table = read_part(path)
    assert tuple(table.column_names) == COLUMNS
    assert table.to_pylist()[0]["status"] == "CORRUPT_IMAGE"
    assert read_output(tmp_path).num_rows == 1

    foreign = tmp_path / "data" / "part-000001.parquet"
    pq.write_table(pa.table({"id": ["y"]}), foreign)
    with pytest.raises(OutputFormatError, match="format None"):
        read_output(tmp_path)
    wrong = schema(False).with_metadata({b"fashionserve.bulk.format_version": b"99"})
    pq.write_table(wrong.empty_table(), foreign)
    with pytest.raises(OutputFormatError, match="format b'99'"):
        read_part(foreign)


def test_the_summary_round_trips_and_is_checked(tmp_path: Path) -> None:
    summary = Summary(
        1, "in", "0/1", 3, 2, {"CORRUPT_IMAGE": 1}, "a", "b", 1.5, 2.0, {"detector": "1"}
    )
    summary.write(tmp_path)
    assert Summary.read(tmp_path) == summary
    assert (tmp_path / "_SUCCESS").exists()
    (tmp_path / "summary.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(OutputFormatError):
        Summary.read(tmp_path)
