"""Export a checkpoint to a new model version: ONNX, checks, parity, atomic publication.

The steps of :func:`export_checkpoint`, in order; any failure stops before the repository
is touched:

1. load the checkpoint, check its taxonomy against the served version's
   (:mod:`fashionserve.taxonomy_compat`: removing or renaming a label callers may depend on is refused
   unless ``force``), build the PyTorch model (weights loaded, eval mode);
2. export ONNX (TorchScript exporter, opset 17, dynamic batch dimension, the contract's
   I/O names), then ``onnx.checker`` (full check) and strict shape inference, and check
   names, dtypes, the dynamic batch axis and the static dims export relies on;
3. parity: PyTorch and ONNX Runtime on the same real inputs (rendered garment images,
   preprocessed as serving does) at batch sizes 1 and 8, per-output tolerances
   (:func:`fashionserve.export.parity.default_checks`); a divergence raises :class:`ParityError`;
4. with ``target="tensorrt"``: build an engine with the TensorRT Python API
   (:mod:`fashionserve.export.tensorrt`: FP16 or FP32, one optimisation profile over the batch range of
   the model's Triton config, a timing cache) and prove its parity against ONNX Runtime on
   the same inputs (:func:`fashionserve.export.parity.engine_checks`); a divergence raises
   :class:`ParityError`. :func:`trtexec_for_version` gives the equivalent ``trtexec``
   command instead, for a build job in the TensorRT image;
5. publish ``model.onnx``, ``model.py`` (the python-ort ONNX Runtime runner), the engine
   if built and ``manifest.json`` as the next numbered version
   (:func:`fashionserve.repository.publish_version`).
   Publishing does not change what Triton serves: ``fashionserve repo versions rollout``
   does (:mod:`fashionserve.model_repository.versions`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fashionserve.checkpoint import Checkpoint, file_sha256, load_checkpoint
from fashionserve.ensemble import DETECTOR, MODEL_IO, TAGGER, ModelKind
from fashionserve.errors import InvalidInput
from fashionserve.export.parity import (
    DEFAULT_BATCH_SIZES,
    OnnxRuntimeRunner,
    ParityError,
    ParityReport,
    TensorRTRunner,
    TorchRunner,
    check_parity,
    default_checks,
    engine_checks,
    parity_inputs,
)
from fashionserve.export.tensorrt import (
    EngineInfo,
    Precision,
    build_engine,
    default_profile,
    engine_filename,
    gpu_identity,
    import_tensorrt,
    trtexec_command,
)
from fashionserve.model_repository.python_models import ORT_RUNNER
from fashionserve.model_repository.settings import RepositorySettings
from fashionserve.repository import (
    Artifact,
    Engine,
    InputSpec,
    Manifest,
    ManifestError,
    ModelRef,
    SourceCheckpoint,
    TaxonomyRef,
    publish_version,
    read_config,
    read_manifest,
    recorded_taxonomy,
    served_version,
)
from fashionserve.taxonomy_compat import check_compatible

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "ExportError",
    "ParityError",
    "export_checkpoint",
    "export_onnx",
    "inspect_onnx",
    "trtexec_for_version",
]

log = logging.getLogger(__name__)

OPSET = 17
BATCH_AXIS = "batch"
# Per-kind preprocessing the inputs were made with; serving must do the same.
PREPROCESS: dict[ModelKind, str] = {
    "detector": "letterbox",
    "tagger": "square_crop",
    "embedder": "square_crop",
}
_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 11: "float64", 9: "bool"}
_EXPECTED_DTYPES = {"classes": "int32"}  # every other input and output is float32
Target = Literal["onnx", "tensorrt"]
# The engine file a trtexec build job writes when no compute capability is given: what the
# tensorrt flavour's config loads by default (default_model_filename).
DEFAULT_ENGINE_FILE = "model.plan"


class ExportError(InvalidInput):
    """The checkpoint could not be turned into a valid ONNX model (before parity)."""

    reason = "EXPORT_FAILED"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int | str]  # symbolic dims by name ("batch")
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class OnnxInfo:
    opset: int
    ir_version: int
    op_types: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def export_checkpoint(
    checkpoint: Path,
    repository: Path,
    model_name: str | None = None,
    *,
    data: Path | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    echo: Callable[[str], None] | None = print,
    target: Target = "onnx",
    precision: Precision = "fp16",
    timing_cache: Path | None = None,
    max_batch: int | None = None,
    force: bool = False,
) -> Path:
    """Export ``checkpoint`` as the next version of ``<repository>/<model_name>``.

    ``model_name`` defaults to the checkpoint kind. Parity inputs are rendered with the
    synthetic generator (fixed seed) unless ``data`` names a data set directory. The
    parity table goes to ``echo`` (stdout by default).

    ``target="tensorrt"`` also builds an engine at ``precision`` for the local GPU, with
    an optimisation profile over batch 1..``max_batch`` (default: the ``max_batch_size``
    of the model's config in the repository, else the repository defaults) and the
    ``timing_cache`` file (:func:`trtexec_for_version` gives the equivalent ``trtexec``
    command for a version exported without it). ``force`` publishes even when the
    taxonomy breaks callers of the served version. Returns the published version directory.

    Raises :class:`ParityError` (nothing published) when a runtime diverges,
    :class:`ExportError` when the ONNX graph is invalid,
    :class:`fashionserve.taxonomy_compat.IncompatibleTaxonomy` when the taxonomy breaks callers,
    :class:`fashionserve.export.tensorrt.TensorRTError` when the engine cannot be built.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    ckpt_sha = file_sha256(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    name = model_name or ckpt.kind
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"invalid model name {name!r}")
    height, width = ckpt.input_size
    if height != width:
        raise ExportError(f"{checkpoint}: input size {height}x{width} is not square")
    input_names, output_names = MODEL_IO[ckpt.kind]
    model_dir = Path(repository) / name
    # Before any heavy work: refused here, nothing was spent.
    served = served_version(model_dir)
    changes = check_compatible(
        name,
        served,
        recorded_taxonomy(model_dir, served),
        taxonomy_section(ckpt),
        force=force,
    )
    if changes is not None and echo is not None and (changes.breaking or changes.added):
        echo(f"taxonomy against the served version:\n{changes.summary()}")
    if target == "tensorrt":
        import_tensorrt()  # fail before minutes of work, not after
        gpu_identity()
    model = ckpt.build_model()
    runner_py = runner_source()
    profile = default_profile(
        input_names[0],
        (3, height, width),
        max_batch or config_max_batch(Path(repository), name, ckpt.kind),
    )

    timings: dict[str, float] = {}
    t = time.perf_counter()
    inputs = parity_inputs(ckpt.kind, height, max(batch_sizes), data=data)
    timings["inputs_s"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="fashionserve-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        export_onnx(model, ckpt.kind, inputs.samples[:2], onnx_path)
        info = inspect_onnx(onnx_path, ckpt)
        timings["export_s"] = time.perf_counter() - t

        t = time.perf_counter()
        report = check_parity(
            TorchRunner(model, input_names, output_names),
            OnnxRuntimeRunner(onnx_path),
            inputs.batches(input_names[0], batch_sizes),
            default_checks(ckpt.kind),
        )
        timings["parity_s"] = time.perf_counter() - t
        if echo is not None:
            echo(f"{name} ({ckpt.kind}, {checkpoint})\n{report.table()}")
        report.raise_for_failure()

        files: dict[str, Path] = {"model.onnx": onnx_path, "model.py": runner_py}
        engines: tuple[Engine, ...] = ()
        if target == "tensorrt":
            t = time.perf_counter()
            info_trt, trt_report = _engine(
                onnx_path,
                ckpt.kind,
                profile,
                precision,
                timing_cache,
                inputs.batches(
                    input_names[0], [b for b in batch_sizes if b <= profile.max_batch] or [1]
                ),
            )
            timings["tensorrt_s"] = time.perf_counter() - t
            if echo is not None:
                echo(trt_report.table())
            trt_report.raise_for_failure()
            files[info_trt.file] = onnx_path.parent / info_trt.file
            record = {**info_trt.to_dict(), "parity": trt_report.to_dict()}
            engines = (Engine(info_trt.compute_capability, info_trt.file, record),)

        t = time.perf_counter()
        if file_sha256(checkpoint) != ckpt_sha:
            # The manifest must name the bytes that were exported, nothing else.
            raise ExportError(f"{checkpoint} changed while it was being exported")

        def manifest(version: int, artifacts: Mapping[str, Artifact]) -> Manifest:
            timings["total_s"] = time.perf_counter() - started
            return build_manifest(
                ckpt,
                name=name,
                version=version,
                checkpoint=checkpoint,
                checkpoint_sha256=ckpt_sha,
                artifacts=artifacts,
                info=info,
                report=report,
                batch_sizes=batch_sizes,
                inputs_source=inputs.source,
                timings={k: round(v, 3) for k, v in timings.items()},
                engines=engines,
            )

        version_dir = publish_version(model_dir, files, manifest)
    log.info(
        "published %s in %.1fs (inputs %.1fs, export %.1fs, parity %.1fs, publish %.1fs)",
        version_dir,
        time.perf_counter() - started,
        timings["inputs_s"],
        timings["export_s"],
        timings["parity_s"],
        time.perf_counter() - t,
    )
    if echo is not None:
        echo(f"published {version_dir}")
    return version_dir


def trtexec_for_version(
    version_dir: Path,
    precision: Precision = "fp16",
    *,
    compute_capability: str | None = None,
    max_batch: int | None = None,
    timing_cache: Path | None = None,
) -> list[str]:
    """The ``trtexec`` command that builds the engine of a published version, the same
    engine as ``export --target tensorrt`` (profile from the model's config, precision,
    timing cache). The engine is named for ``compute_capability`` when given (one version
    can hold engines for several GPU types), else ``model.plan``. Needs no TensorRT."""
    manifest = read_manifest(version_dir)
    if manifest is None or manifest.model is None or manifest.input is None:
        raise ManifestError(
            f"{version_dir}: no manifest.json naming the model and its input: "
            "was this version published by `fashionserve export`?"
        )
    model, size = manifest.model, manifest.input
    profile = default_profile(
        MODEL_IO[model.kind][0][0],
        (3, size.height, size.width),
        max_batch or config_max_batch(version_dir.parent.parent, model.name, model.kind),
    )
    engine = engine_filename(compute_capability) if compute_capability else DEFAULT_ENGINE_FILE
    return trtexec_command(
        version_dir / "model.onnx", version_dir / engine, profile, precision, timing_cache
    )


def _engine(
    onnx_path: Path,
    kind: str,
    profile: Any,
    precision: Precision,
    timing_cache: Path | None,
    batches: Sequence[dict[str, np.ndarray]],
) -> tuple[EngineInfo, ParityReport]:
    """Build the engine next to ``onnx_path`` and compare it with ONNX Runtime."""
    compute_capability, _ = gpu_identity()
    plan = onnx_path.parent / engine_filename(compute_capability)
    info = build_engine(onnx_path, plan, profile, precision, timing_cache)
    report = check_parity(
        OnnxRuntimeRunner(onnx_path),
        TensorRTRunner(plan, name=f"tensorrt-{info.tensorrt_version}-{precision}"),
        batches,
        engine_checks(kind, precision),
    )
    return info, report


def config_max_batch(repository: Path, name: str, kind: str) -> int:
    """The ``max_batch_size`` the engine's profile must cover: the model's Triton config
    if it has one (Triton refuses a plan whose profile does not cover it), else what
    ``repo build`` would write by default."""
    config = read_config(repository / name)
    if config is not None and config.max_batch_size > 0:
        return int(config.max_batch_size)
    defaults = RepositorySettings()
    if kind == DETECTOR:
        return defaults.max_images_per_request
    return defaults.max_crops_per_request


# ----------------------------------------------------------------------------- ONNX
def export_onnx(model: torch.nn.Module, kind: ModelKind, sample: np.ndarray, path: Path) -> Path:
    """Trace ``model`` to ONNX at ``path`` with the contract's names and a dynamic batch.

    ``sample`` is a real input batch used for tracing; batch 2 rather than 1, so no
    batch-size-1 special case (squeeze, broadcast) can be baked into the graph.
    """
    import torch

    input_names, output_names = MODEL_IO[kind]
    example = torch.from_numpy(np.ascontiguousarray(sample[:2]))
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    dynamic_axes = {n: {0: BATCH_AXIS} for n in (*input_names, *output_names)}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) warns that it is deprecated; it is the
        # one that handles these models with a dynamic batch today.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def inspect_onnx(path: Path, ckpt: Checkpoint) -> OnnxInfo:
    """Validate the exported graph and describe it for the manifest.

    Runs ``onnx.checker.check_model(full_check=True)`` and strict shape inference, then
    checks what serving relies on: the contract's I/O names, dtypes, a symbolic batch
    dimension on every input and output, and the static dims (input size, ``K``, the
    taxonomy's logit count).
    """
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{ckpt.kind}: exported ONNX is invalid: {exc}") from exc

    graph = inferred.graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in initialisers]
    outputs = [_spec(v) for v in graph.output]
    expected_in, expected_out = MODEL_IO[ckpt.kind]
    problems: list[str] = []
    if [s.name for s in inputs] != list(expected_in):
        problems.append(f"inputs {[s.name for s in inputs]}, expected {list(expected_in)}")
    if [s.name for s in outputs] != list(expected_out):
        problems.append(f"outputs {[s.name for s in outputs]}, expected {list(expected_out)}")
    for spec in (*inputs, *outputs):
        want = _EXPECTED_DTYPES.get(spec.name, "float32")
        if spec.dtype != want:
            problems.append(f"{spec.name}: dtype {spec.dtype}, expected {want}")
        if not spec.shape or not isinstance(spec.shape[0], str):
            problems.append(f"{spec.name}: batch dimension is not dynamic (shape {spec.shape})")
    problems += _static_dim_problems(ckpt, {s.name: s.shape for s in (*inputs, *outputs)})
    if problems:
        raise ExportError(f"{ckpt.kind}: exported ONNX breaks the contract: " + "; ".join(problems))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxInfo(
        opset=int(opset),
        ir_version=int(model.ir_version),
        op_types=sorted({n.op_type for n in _all_nodes(graph)}),
        inputs=inputs,
        outputs=outputs,
    )


def _static_dim_problems(ckpt: Checkpoint, shapes: dict[str, list[int | str]]) -> list[str]:
    size = ckpt.input_size[0]
    expected: dict[str, list[int | None]] = {}
    if ckpt.kind == "detector":
        k = shapes.get("scores", [None, None])[1]
        expected = {
            "images": [None, 3, size, size],
            "boxes": [None, k if isinstance(k, int) else None, 4],
            "scores": [None, None],
            "classes": [None, None],
        }
        if not isinstance(k, int):
            return [f"scores: number of detections is not static (shape {shapes.get('scores')})"]
    elif ckpt.kind == "tagger":
        expected = {"crops": [None, 3, size, size], "logits": [None, ckpt.taxonomy.num_logits]}
    else:
        expected = {"crops": [None, 3, size, size], "embedding": [None, None]}
    problems = []
    for name, want in expected.items():
        got = shapes.get(name, [])
        if len(got) != len(want) or any(
            w is not None and g != w for g, w in zip(got, want, strict=False)
        ):
            shown = ["batch" if w is None else w for w in want]
            problems.append(f"{name}: shape {got}, expected {shown}")
    return problems


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape: list[int | str] = [
        d.dim_param if d.dim_param else int(d.dim_value) if d.HasField("dim_value") else "?"
        for d in tensor.shape.dim
    ]
    return TensorSpec(value.name, shape, _ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)))


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, including those of subgraphs (If/Loop bodies)."""
    nodes = list(graph.node)
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                nodes += _all_nodes(attr.g)
            for sub in attr.graphs:
                nodes += _all_nodes(sub)
    return nodes


# ------------------------------------------------------------------------- artifacts
def runner_source() -> Path:
    """The python-ort ONNX Runtime runner that becomes ``<version>/model.py``."""
    if not ORT_RUNNER.is_file():
        raise ExportError(f"the ONNX Runtime runner {ORT_RUNNER} is missing (needed as model.py)")
    return ORT_RUNNER


def tool_versions() -> dict[str, str]:
    """Versions of everything that shaped the artifact."""
    versions = {"python": platform.python_version()}
    for dist in ("fashionserve", "torch", "onnx", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            module = sys.modules.get(dist)
            versions[dist] = str(getattr(module, "__version__", "unknown"))
    return versions


def taxonomy_section(ckpt: Checkpoint) -> TaxonomyRef:
    """The manifest's ``taxonomy``: what callers see of this model's labels."""
    if ckpt.kind == TAGGER:
        # The gateway decodes logits with this exact taxonomy and checks it by hash.
        return TaxonomyRef(
            version=ckpt.taxonomy.version,
            hash=ckpt.taxonomy.hash,
            num_logits=ckpt.taxonomy.num_logits,
            document=ckpt.taxonomy,
        )
    if ckpt.kind == DETECTOR:
        return TaxonomyRef(
            version=ckpt.taxonomy.version,
            hash=ckpt.taxonomy.hash,
            classes=tuple(ckpt.taxonomy.roots),  # `classes` indexes this list
        )
    return TaxonomyRef(version=ckpt.taxonomy.version, hash=ckpt.taxonomy.hash)


def build_manifest(
    ckpt: Checkpoint,
    *,
    name: str,
    version: int,
    checkpoint: Path,
    checkpoint_sha256: str,
    artifacts: Mapping[str, Artifact],
    info: OnnxInfo,
    report: ParityReport,
    batch_sizes: Sequence[int],
    inputs_source: dict[str, Any],
    timings: dict[str, float],
    engines: tuple[Engine, ...] = (),
) -> Manifest:
    """The manifest of a version: what it is, where it came from, how it was proven."""
    parity = report.to_dict()
    parity["batch_sizes"] = list(batch_sizes)
    parity["inputs"] = inputs_source
    return Manifest(
        model=ModelRef(name, ckpt.kind, version, ckpt.arch, ckpt.arch_params),
        created=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        source_checkpoint=SourceCheckpoint(
            sha256=checkpoint_sha256, path=str(checkpoint.resolve())
        ),
        artifacts=artifacts,
        input=InputSpec(
            height=ckpt.input_size[0],
            width=ckpt.input_size[1],
            mean=ckpt.mean,
            std=ckpt.std,
            preprocess=PREPROCESS[ckpt.kind],
        ),
        taxonomy=taxonomy_section(ckpt),
        engines=engines,
        parity=parity,
        exporter={**tool_versions(), "timings": timings},
        onnx={
            "file": "model.onnx",
            "opset": info.opset,
            "ir_version": info.ir_version,
            "op_types": info.op_types,
            "inputs": [s.to_dict() for s in info.inputs],
            "outputs": [s.to_dict() for s in info.outputs],
        },
        training=ckpt.training,
    )
