"""The model repository's layout: the one owner of what lies where and what it says.

Triton reads ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/`` where the
version is a positive integer. fashionserve adds two files:

* ``<repo>/<model>/<version>/manifest.json``: what a version is, where it came from and how
  it was proven (:class:`Manifest`, read with :func:`read_manifest`, written with
  :func:`write_manifest`, format :data:`MANIFEST_FORMAT` version :data:`FORMAT_VERSION`);
* ``<repo>/<model>/pinned.json``: the version ``fashionserve repo versions pin`` fixed.

Which version is served: a build serves the pinned version, else the newest
(:func:`version_to_serve`); the ensemble's steps then name it, so what Triton serves now is
the version the ensemble calls (:func:`served_version`), until the next build.

A version appears complete or not at all (:func:`publish_version`): it is written in a
hidden staging directory inside ``<repo>/<model>/`` (same file system, and a name Triton
ignores because it is not a number), then renamed to its number. ``rename(2)`` of a
directory onto a non-empty directory fails, so two publishers racing for the same number
cannot clobber each other: the loser takes the next number.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from fashionserve import thresholds as threshold_sets
from fashionserve.checkpoint import file_sha256
from fashionserve.ensemble import MODEL_KINDS, MODEL_NAME, TAGGER, ModelKind
from fashionserve.errors import FailedPrecondition
from fashionserve.taxonomy import Taxonomy, TaxonomyError

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

CONFIG_FILE = "config.pbtxt"
MANIFEST_FILE = "manifest.json"
PIN_FILE = "pinned.json"
STAGING_PREFIX = ".staging-"
MANIFEST_FORMAT = "fashionserve-model-manifest"
FORMAT_VERSION = 1
"""The manifest format this module writes. A manifest without ``format_version`` (written
before the field existed, or by hand) reads as format 1."""
# Attempts at claiming a version number before giving up (each one lost to a racing
# publisher that took the number first).
MAX_PUBLISH_ATTEMPTS = 100


class RepositoryError(FailedPrecondition):
    """The model repository does not hold what is asked of it (a model, a version, a
    readable file), or cannot be built as asked."""

    reason = "MODEL_REPOSITORY"


class ManifestError(RepositoryError):
    """A ``manifest.json`` is not valid JSON, has the wrong format or a wrong field."""

    reason = "INVALID_MANIFEST"


class PublishError(RepositoryError):
    """A version could not be published."""

    reason = "PUBLISH_FAILED"


# ------------------------------------------------------------------------------ layout
def published_versions(model_dir: Path) -> list[int]:
    """Numbered version directories of ``model_dir``, ascending (staging dirs ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def read_pin(model_dir: Path) -> int | None:
    """The version ``fashionserve repo versions pin`` fixed for this model, if any."""
    path = model_dir / PIN_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"{path} is not a valid pin ({exc})") from exc


def write_pin(model_dir: Path, version: int | None) -> None:
    """Pin ``version`` (``None`` removes the pin), replacing the file atomically."""
    path = model_dir / PIN_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    doc = {"version": version, "pinned_at": datetime.now(UTC).isoformat(timespec="seconds")}
    tmp = path.with_name(PIN_FILE + ".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(path)


def read_config(model_dir: Path) -> ModelConfig | None:
    """The model's ``config.pbtxt`` parsed with Triton's own ``ModelConfig``, or ``None``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path} does not parse as a Triton model config: {exc}") from exc


def ensemble_versions(repo: Path) -> dict[str, int]:
    """Model name -> the version the ensemble calls (what Triton serves)."""
    config = read_config(Path(repo) / MODEL_NAME)
    if config is None:
        return {}
    return {
        step.model_name: int(step.model_version)
        for step in config.ensemble_scheduling.step
        if step.model_version > 0
    }


def version_to_serve(model_dir: Path) -> int | None:
    """The version a build of the repository serves: the pinned one, else the newest
    published (``None`` when nothing is published)."""
    pinned = read_pin(model_dir)
    if pinned is not None:
        return pinned
    return max(published_versions(model_dir), default=None)


def served_version(model_dir: Path) -> int | None:
    """The version Triton serves now: the one the ensemble calls, or before the first
    build, the one the build will serve."""
    called = ensemble_versions(model_dir.parent).get(model_dir.name)
    return called if called is not None else version_to_serve(model_dir)


# ---------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ModelRef:
    """Which model a version belongs to and how its network is built."""

    name: str
    kind: ModelKind
    version: int
    arch: str = ""
    arch_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceCheckpoint:
    """The checkpoint file the version was exported from."""

    sha256: str
    path: str = ""


@dataclass(frozen=True)
class Artifact:
    """A file of the version as published: its sha256 and size in bytes."""

    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: RGB float32 NCHW in 0-255, normalised in the graph with
    ``mean``/``std`` (0-1 units), made by ``preprocess`` (``letterbox`` or ``square_crop``)."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: str


@dataclass(frozen=True)
class TaxonomyRef:
    """The labels callers see from this version: the taxonomy's version and hash, plus the
    whole taxonomy (tagger: it lays out the logits) or the detector's class list."""

    version: str
    hash: str
    num_logits: int | None = None
    document: Taxonomy | None = None
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ThresholdsRef:
    """The calibrated threshold set a tagger version decides with: its name, content hash
    (what the ensemble and GetTaxonomy report), the version whose files it was published
    with, and the whole set."""

    name: str
    hash: str
    document: threshold_sets.ThresholdSet
    base_version: int | None = None


@dataclass(frozen=True)
class Engine:
    """A TensorRT engine of the version, built for one GPU type; ``details`` holds the
    rest of the build record (TensorRT version, GPU, precision, profile, parity)."""

    compute_capability: str
    file: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """The ``manifest.json`` of one model version.

    Every section is optional on reading, so a version published by hand (or before a
    section existed) still reads; :mod:`fashionserve.export` writes them all. ``parity``,
    ``exporter``, ``onnx`` and ``training`` are records for people (the parity table,
    tool versions and timings, the graph's opset and I/O, the training summary): kept as
    written, read by nobody but :attr:`parity_passed`.
    """

    model: ModelRef | None = None
    created: str = ""
    source_checkpoint: SourceCheckpoint | None = None
    artifacts: Mapping[str, Artifact] = field(default_factory=dict)
    input: InputSpec | None = None
    taxonomy: TaxonomyRef | None = None
    thresholds: ThresholdsRef | None = None
    engines: tuple[Engine, ...] = ()
    parity: Mapping[str, Any] = field(default_factory=dict)
    exporter: Mapping[str, Any] = field(default_factory=dict)
    onnx: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)

    @property
    def parity_passed(self) -> bool | None:
        """Whether parity passed (``None`` when the manifest records no parity)."""
        passed = self.parity.get("passed")
        return passed if isinstance(passed, bool) else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :func:`write_manifest` writes."""
        doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION}
        if self.model is not None:
            doc["model"] = {
                "name": self.model.name,
                "kind": self.model.kind,
                "version": self.model.version,
                "arch": self.model.arch,
                "arch_params": dict(self.model.arch_params),
            }
        if self.created:
            doc["created"] = self.created
        if self.exporter:
            doc["exporter"] = dict(self.exporter)
        if self.source_checkpoint is not None:
            doc["source_checkpoint"] = {
                "path": self.source_checkpoint.path,
                "sha256": self.source_checkpoint.sha256,
            }
        doc["artifacts"] = {
            name: {"sha256": a.sha256, **({"bytes": a.size} if a.size is not None else {})}
            for name, a in self.artifacts.items()
        }
        if self.onnx:
            doc["onnx"] = dict(self.onnx)
        if self.input is not None:
            doc["input"] = {
                "height": self.input.height,
                "width": self.input.width,
                "channels": "RGB",
                "layout": "NCHW",
                "dtype": "float32",
                "value_range": [0, 255],
                "mean": list(self.input.mean),
                "std": list(self.input.std),
                "normalised_in_graph": True,
                "preprocess": self.input.preprocess,
            }
        if self.taxonomy is not None:
            tax: dict[str, Any] = {"version": self.taxonomy.version, "hash": self.taxonomy.hash}
            if self.taxonomy.num_logits is not None:
                tax["num_logits"] = self.taxonomy.num_logits
            if self.taxonomy.document is not None:
                tax["document"] = self.taxonomy.document.to_dict()
            if self.taxonomy.classes is not None:
                tax["classes"] = list(self.taxonomy.classes)
            doc["taxonomy"] = tax
        if self.thresholds is not None:
            doc["thresholds"] = {
                "name": self.thresholds.name,
                "hash": self.thresholds.hash,
                "base_version": self.thresholds.base_version,
                "document": self.thresholds.document.model_dump(mode="json"),
            }
        if self.parity:
            doc["parity"] = dict(self.parity)
        if self.training:
            doc["training"] = dict(self.training)
        if self.engines:
            doc["tensorrt"] = {
                "engines": [
                    {**e.details, "compute_capability": e.compute_capability, "file": e.file}
                    for e in self.engines
                ]
            }
        return doc


def read_manifest(version_dir: Path) -> Manifest | None:
    """The manifest of a version directory (``None`` when it has none). Raises
    :class:`ManifestError` naming the file and the field when it is not valid."""
    path = version_dir / MANIFEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return manifest_from_dict(doc, str(path))


def recorded_taxonomy(model_dir: Path, version: int | None) -> TaxonomyRef | None:
    """The taxonomy that ``version`` of a model records in its manifest (``None`` for no
    version yet, or a version published without one)."""
    if version is None:
        return None
    manifest = read_manifest(model_dir / str(version))
    return manifest.taxonomy if manifest is not None else None


class ManifestDocument(Protocol):
    """What a version's ``manifest.json`` is written from: a model version's
    :class:`Manifest`, or another artifact's own (the search index's,
    :mod:`fashionserve.search_index`)."""

    def to_dict(self) -> dict[str, Any]: ...


def write_manifest(directory: Path, manifest: ManifestDocument) -> Path:
    """Write ``manifest.json`` into ``directory`` (replaced atomically); return its path."""
    path = directory / MANIFEST_FILE
    tmp = path.with_name(MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def manifest_from_dict(doc: object, source: str = "manifest") -> Manifest:
    """Validate a manifest document; ``source`` names it in errors."""
    top = _Fields(doc, source, "")
    written_format = top.get("format", str)
    if written_format not in (None, MANIFEST_FORMAT):
        raise ManifestError(
            f"{source}: field 'format' is {written_format!r}, not {MANIFEST_FORMAT!r}"
        )
    # No format_version: written before the field existed, or by hand; read as format 1.
    format_version = top.get("format_version", int) or 1
    if format_version > FORMAT_VERSION:
        raise ManifestError(
            f"{source}: format_version {format_version} is newer than this fashionserve "
            f"reads ({FORMAT_VERSION}): upgrade fashionserve"
        )
    return Manifest(
        model=_model(top.section("model")),
        created=top.get("created", str) or "",
        source_checkpoint=_source(top.section("source_checkpoint")),
        artifacts=_artifacts(top.section("artifacts")),
        input=_input(top.section("input")),
        taxonomy=_taxonomy(top.section("taxonomy")),
        thresholds=_thresholds(top.section("thresholds")),
        engines=_engines(top.section("tensorrt")),
        parity=top.mapping("parity"),
        exporter=top.mapping("exporter"),
        onnx=top.mapping("onnx"),
        training=top.mapping("training"),
    )


class _Fields:
    """Typed access to one JSON object of a manifest; errors name the file and the field."""

    def __init__(self, doc: object, source: str, where: str) -> None:
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: {where or 'the document'} must be a JSON object")
        self.doc, self.source, self.where = doc, source, where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, *, required: bool = False) -> Any:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise ManifestError(f"{self.source}: field {self.name(key)!r} is missing")
            return None
        # bool is an int in Python, but never a valid size or version.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ManifestError(
                f"{self.source}: field {self.name(key)!r} must be {_KIND_NAMES[kind]}, "
                f"got {value!r}"
            )
        return value

    def section(self, key: str) -> _Fields | None:
        value = self.doc.get(key)
        return None if value is None else _Fields(value, self.source, self.name(key))

    def mapping(self, key: str) -> dict[str, Any]:
        section = self.section(key)
        return dict(section.doc) if section is not None else {}

    def triple(self, key: str) -> tuple[float, float, float]:
        value = self.get(key, list, required=True)
        if len(value) != 3 or not all(isinstance(v, int | float) for v in value):
            raise ManifestError(
                f"{self.source}: field {self.name(key)!r} must be 3 numbers, got {value!r}"
            )
        return float(value[0]), float(value[1]), float(value[2])


_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _model(f: _Fields | None) -> ModelRef | None:
    if f is None:
        return None
    kind = f.get("kind", str, required=True)
    if kind not in MODEL_KINDS:
        raise ManifestError(
            f"{f.source}: field {f.name('kind')!r} must be one of {', '.join(MODEL_KINDS)}, "
            f"got {kind!r}"
        )
    return ModelRef(
        name=f.get("name", str, required=True),
        kind=cast(ModelKind, kind),
        version=f.get("version", int, required=True),
        arch=f.get("arch", str) or "",
        arch_params=f.mapping("arch_params"),
    )


def _source(f: _Fields | None) -> SourceCheckpoint | None:
    if f is None:
        return None
    return SourceCheckpoint(
        sha256=f.get("sha256", str, required=True), path=f.get("path", str) or ""
    )


def _artifacts(f: _Fields | None) -> dict[str, Artifact]:
    if f is None:
        return {}
    artifacts = {}
    for name in f.doc:
        entry = f.section(name) or _Fields({}, f.source, f.name(name))
        artifacts[name] = Artifact(
            sha256=entry.get("sha256", str, required=True), size=entry.get("bytes", int)
        )
    return artifacts


def _input(f: _Fields | None) -> InputSpec | None:
    if f is None:
        return None
    return InputSpec(
        height=f.get("height", int, required=True),
        width=f.get("width", int, required=True),
        mean=f.triple("mean"),
        std=f.triple("std"),
        preprocess=f.get("preprocess", str, required=True),
    )


def _taxonomy(f: _Fields | None) -> TaxonomyRef | None:
    if f is None:
        return None
    digest = f.get("hash", str, required=True)
    document = None
    if f.section("document") is not None:
        try:
            document = Taxonomy.from_dict(f.doc["document"], source=f"{f.source}:taxonomy.document")
        except TaxonomyError as exc:
            raise ManifestError(str(exc)) from exc
        if document.hash != digest:
            raise ManifestError(
                f"{f.source}: field {f.name('document')!r} does not match "
                f"{f.name('hash')!r} {digest}"
            )
    classes = f.get("classes", list)
    if classes is not None and not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{f.source}: field {f.name('classes')!r} must list strings")
    return TaxonomyRef(
        version=f.get("version", str, required=True),
        hash=digest,
        num_logits=f.get("num_logits", int),
        document=document,
        classes=tuple(classes) if classes is not None else None,
    )


def _thresholds(f: _Fields | None) -> ThresholdsRef | None:
    if f is None:
        return None
    digest = f.get("hash", str, required=True)
    try:
        document = threshold_sets.from_dict(
            f.get("document", dict, required=True), f"{f.source}:{f.name('document')}"
        )
    except threshold_sets.ThresholdsError as exc:
        raise ManifestError(str(exc)) from exc
    if document.hash != digest:
        raise ManifestError(
            f"{f.source}: field {f.name('document')!r} does not match {f.name('hash')!r} {digest}"
        )
    return ThresholdsRef(
        name=f.get("name", str, required=True),
        hash=digest,
        document=document,
        base_version=f.get("base_version", int),
    )


def _engines(f: _Fields | None) -> tuple[Engine, ...]:
    if f is None:
        return ()
    engines = []
    for i, entry in enumerate(f.get("engines", list) or []):
        e = _Fields(entry, f.source, f.name(f"engines[{i}]"))
        details = {k: v for k, v in e.doc.items() if k not in ("compute_capability", "file")}
        engines.append(
            Engine(
                compute_capability=e.get("compute_capability", str, required=True),
                file=e.get("file", str, required=True),
                details=details,
            )
        )
    return tuple(engines)


# -------------------------------------------------------------------------- publishing
ManifestFactory = Callable[[int, Mapping[str, Artifact]], ManifestDocument]


def publish_version(model_dir: Path, files: Mapping[str, Path], manifest: ManifestFactory) -> Path:
    """Publish ``files`` (name in the version dir -> source path) plus ``manifest.json`` as
    version ``1 + highest existing`` of ``model_dir``; return the version directory.

    ``manifest(version, artifacts)`` makes the manifest; ``artifacts`` describes each file
    as staged (it is called again with the next number if a concurrent publisher claimed
    the first). On any failure the staging directory is removed and nothing is published.
    """
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    try:
        # mkdtemp makes it owner-only (0700); Triton often runs as another user.
        staging.chmod(0o755)
        artifacts: dict[str, Artifact] = {}
        for name, src in files.items():
            if name == MANIFEST_FILE or "/" in name or name.startswith("."):
                raise PublishError(f"invalid artifact name {name!r}")
            dst = staging / name
            shutil.copyfile(src, dst)
            _fsync(dst)
            artifacts[name] = Artifact(sha256=file_sha256(dst), size=dst.stat().st_size)

        for _ in range(MAX_PUBLISH_ATTEMPTS):
            version = max(published_versions(model_dir), default=0) + 1
            _fsync(write_manifest(staging, manifest(version, artifacts)))
            _fsync(staging)
            target = model_dir / str(version)
            try:
                # Atomic; fails with ENOTEMPTY/EEXIST when a racing publisher got there
                # first (a version dir is never empty), ENOTDIR if a file has the name.
                os.rename(staging, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    continue
                raise
            _fsync(model_dir)
            return target
        raise PublishError(
            f"{model_dir}: no free version number after {MAX_PUBLISH_ATTEMPTS} attempts"
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                model_dir.rmdir()  # only if still empty: leave no stray model dir behind
        raise


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a published version survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_thresholds(
    repo: Path,
    thresholds: threshold_sets.ThresholdSet,
    *,
    model: str = TAGGER,
    base_version: int | None = None,
    force: bool = False,
) -> Path:
    """Publish ``thresholds`` as a new version of the tagger ``model``: the files of
    ``base_version`` (default: the served one) with a manifest that records the set, its
    name and hash (atomically, as :func:`publish_version`). Nothing served changes until
    the version is rolled out; rolling back to an earlier version serves that version's
    set (or none).

    Refused when the set is for another taxonomy than the base version's, or was calibrated
    on another tagger artifact than the base version's (``force`` allows the latter: a set
    from a tagger with other weights may miss its targets).
    """
    model_dir = Path(repo) / model
    base = base_version if base_version is not None else served_version(model_dir)
    if base is None or base not in published_versions(model_dir):
        raise RepositoryError(f"{model_dir} has no version {base} to publish thresholds with")
    base_dir = model_dir / str(base)
    manifest = read_manifest(base_dir)
    if manifest is None or manifest.model is None or manifest.taxonomy is None:
        raise RepositoryError(f"{base_dir} has no manifest naming its model and taxonomy")
    if manifest.taxonomy.document is None:
        raise RepositoryError(f"{base_dir}: its manifest does not carry its taxonomy")
    try:
        threshold_sets.check_for(thresholds, manifest.taxonomy.document)
    except threshold_sets.ThresholdsError as exc:
        raise PublishError(f"{model} version {base}: {exc}") from exc
    shas = {a.sha256 for a in manifest.artifacts.values()}
    if thresholds.tagger_sha256 and thresholds.tagger_sha256 not in shas and not force:
        raise PublishError(
            f"threshold set {thresholds.name!r} was calibrated on tagger artifact "
            f"{thresholds.tagger_sha256[:12]}, which {model} version {base} does not hold: "
            "calibrate against that version, choose the version it was calibrated on "
            "(--from-version), or --force"
        )
    files = {
        p.name: p
        for p in sorted(base_dir.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    ref = ThresholdsRef(thresholds.name, thresholds.hash, thresholds, base)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    base_model = manifest.model

    def factory(version: int, artifacts: Mapping[str, Artifact]) -> Manifest:
        return replace(
            manifest,
            model=replace(base_model, version=version),
            created=created,
            artifacts=artifacts,
            thresholds=ref,
        )

    return publish_version(model_dir, files, factory)
