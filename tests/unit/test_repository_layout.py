"""The repository layout contract: the typed manifest, pins, served versions, publication."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fashionserve.errors import ErrorKind
from fashionserve.repository import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    Artifact,
    Engine,
    InputSpec,
    Manifest,
    ManifestError,
    ModelRef,
    SourceCheckpoint,
    TaxonomyRef,
    publish_version,
    read_manifest,
    read_pin,
    served_version,
    version_to_serve,
    write_manifest,
    write_pin,
)
from fashionserve.taxonomy import load_taxonomy


def entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def full_manifest() -> Manifest:
    taxonomy = load_taxonomy()
    return Manifest(
        model=ModelRef("tagger", "tagger", 3, "resnet", {"stem": 8}),
        created="2026-12-03T00:00:00Z",
        source_checkpoint=SourceCheckpoint(sha256="ab" * 32, path="/ckpt/tagger.pt"),
        artifacts={"model.onnx": Artifact("cd" * 32, 1234), "model.py": Artifact("ef" * 32, 9)},
        input=InputSpec(96, 96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "square_crop"),
        taxonomy=TaxonomyRef(
            taxonomy.version, taxonomy.hash, taxonomy.num_logits, document=taxonomy
        ),
        engines=(Engine("8.9", "model.sm89.plan", {"precision": "fp16"}),),
        parity={"passed": True, "batch_sizes": [1, 8]},
        exporter={"python": "3.11"},
        onnx={"opset": 17},
        training={"note": "unit test"},
    )


def test_a_manifest_round_trips_through_its_writer_and_reader(tmp_path: Path) -> None:
    written = full_manifest()
    path = write_manifest(tmp_path, written)

    doc = json.loads(path.read_text())
    assert (doc["format"], doc["format_version"]) == (MANIFEST_FORMAT, FORMAT_VERSION)
    read = read_manifest(tmp_path)
    assert read is not None
    assert read.to_dict() == written.to_dict() == doc
    assert read.model == written.model
    assert read.artifacts == written.artifacts
    assert read.input == written.input
    assert read.engines == written.engines
    assert read.parity_passed is True
    assert read.taxonomy is not None and read.taxonomy.document is not None
    assert read.taxonomy.document.hash == load_taxonomy().hash
    assert not (tmp_path / "manifest.json.tmp").exists()


def test_a_manifest_without_a_format_version_reads_as_format_1(tmp_path: Path) -> None:
    """Versions published by hand, or before the field existed, keep working."""
    taxonomy = load_taxonomy()
    old = {
        "model": {"name": "detector", "kind": "detector", "version": 1},
        "artifacts": {"model.onnx": {"sha256": "ab" * 32}},
        "taxonomy": {
            "version": taxonomy.version,
            "hash": taxonomy.hash,
            "classes": list(taxonomy.roots),
        },
        "oracle": True,  # unknown keys are ignored
    }
    (tmp_path / "manifest.json").write_text(json.dumps(old))

    manifest = read_manifest(tmp_path)

    assert manifest is not None
    assert manifest.model == ModelRef("detector", "detector", 1)
    assert manifest.artifacts == {"model.onnx": Artifact("ab" * 32)}
    assert manifest.taxonomy is not None and manifest.taxonomy.classes == tuple(taxonomy.roots)
    assert manifest.parity_passed is None and manifest.engines == () and manifest.input is None
    assert read_manifest(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [
        (lambda d: d["model"].update(version="3"), "model.version", "must be an integer"),
        (lambda d: d["model"].update(kind="classifier"), "model.kind", "must be one of"),
        (lambda d: d["model"].pop("name"), "model.name", "is missing"),
        (
            lambda d: d["artifacts"]["model.onnx"].update(bytes=True),
            "artifacts.model.onnx.bytes",
            "integer",
        ),
        (lambda d: d["input"].update(mean=[0.5, 0.5]), "input.mean", "must be 3 numbers"),
        (lambda d: d["taxonomy"].update(hash="f00d"), "taxonomy.document", "does not match"),
        (lambda d: d["tensorrt"]["engines"][0].pop("file"), "tensorrt.engines[0].file", "missing"),
        (lambda d: d.update(parity=[1]), "parity", "must be a JSON object"),
    ],
)
def test_a_wrong_field_is_named_with_the_file(
    tmp_path: Path, edit: Any, field: str, problem: str
) -> None:
    doc = full_manifest().to_dict()
    edit(doc)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))

    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)

    message = str(info.value)
    assert str(tmp_path / "manifest.json") in message
    assert field in message and problem in message
    assert info.value.kind is ErrorKind.FAILED_PRECONDITION
    assert info.value.reason == "INVALID_MANIFEST"


def test_another_format_a_newer_one_or_broken_json_is_refused(tmp_path: Path) -> None:
    doc = full_manifest().to_dict()
    doc["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="newer than this fashionserve reads"):
        read_manifest(tmp_path)
    doc = {**full_manifest().to_dict(), "format": "fashionserve-checkpoint"}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="field 'format' is 'fashionserve-checkpoint'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_a_build_serves_the_pin_else_the_newest(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "tagger"
    assert version_to_serve(model_dir) is None
    for version in (1, 2, 3):
        (model_dir / str(version)).mkdir(parents=True)
    (model_dir / ".staging-x").mkdir()  # not a version

    assert version_to_serve(model_dir) == 3
    write_pin(model_dir, 2)
    assert (read_pin(model_dir), version_to_serve(model_dir)) == (2, 2)
    # Before the first build, what is served is what the build will serve.
    assert served_version(model_dir) == 2
    write_pin(model_dir, None)
    assert (read_pin(model_dir), version_to_serve(model_dir)) == (None, 3)


def _manifest_for(version: int, artifacts: Mapping[str, Artifact]) -> Manifest:
    return Manifest(model=ModelRef("m", "tagger", version), artifacts=artifacts)


def test_concurrent_publications_get_distinct_versions(tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"onnx bytes")
    model_dir = tmp_path / "repo" / "m"
    publishers = 8
    barrier = threading.Barrier(publishers)
    results: list[Path] = []
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            barrier.wait()
            results.append(publish_version(model_dir, {"model.onnx": artifact}, _manifest_for))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(publishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert not errors
    assert sorted(int(p.name) for p in results) == list(range(1, publishers + 1))
    assert entries(model_dir) == sorted(str(v) for v in range(1, publishers + 1))
    for version in results:
        manifest = read_manifest(version)
        assert manifest is not None and manifest.model is not None
        assert manifest.model.version == int(version.name)  # the manifest names its own number
        assert manifest.artifacts["model.onnx"].size == len(b"onnx bytes")
        assert (version / "model.onnx").read_bytes() == b"onnx bytes"
        # Readable by a Triton running as another user (staging dirs start owner-only).
        assert version.stat().st_mode & 0o777 == 0o755


def test_a_version_claimed_during_publication_is_not_clobbered(tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"ours")
    model_dir = tmp_path / "repo" / "m"

    def manifest(version: int, artifacts: Mapping[str, Artifact]) -> Manifest:
        if version == 1:
            # Another exporter lands version 1 between our numbering and our rename.
            (model_dir / "1").mkdir()
            (model_dir / "1" / "model.onnx").write_bytes(b"theirs")
        return _manifest_for(version, artifacts)

    published = publish_version(model_dir, {"model.onnx": artifact}, manifest)

    assert published == model_dir / "2"
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"theirs"
    written = read_manifest(published)
    assert written is not None and written.model == ModelRef("m", "tagger", 2)
    assert entries(model_dir) == ["1", "2"]
