"""TensorRT engines from exported ONNX: the Python-API builder and the equivalent ``trtexec``.

An engine runs only on the GPU architecture (compute capability) and with the TensorRT
version that built it, so it is built where it will run: on a GPU host with the TensorRT of
the Triton image it will be served by, or in a build job in the TensorRT image next to
Triton (``trtexec``, see :func:`trtexec_command`). Both paths build the same thing:

* one optimisation profile over the batch dimension, ``1 .. max_batch`` with the optimum at
  ``opt_batch`` (the model's ``max_batch_size`` in its Triton config: Triton refuses to load
  a plan whose profile does not cover it);
* FP16 (weights and activations in half precision where TensorRT finds it faster, FP32
  elsewhere) or FP32 from one flag;
* a timing cache file, reused and extended by every build, so a rebuild after a retrain
  skips most kernel timing (it is specific to the GPU and the TensorRT version, like the
  engine).

The engine file is named after the compute capability (``model.sm86.plan``), so one version
directory can hold the engines of several GPU types; the tensorrt flavour's
``cc_model_filenames`` maps each capability to its file.

Nothing here imports TensorRT at module level: ``trtexec_command`` and the naming work on a
machine without it.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fashionserve.errors import FailedPrecondition

Precision = Literal["fp16", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "fp32")
# Builder workspace (scratch memory for tactics): enough for these models, and what
# trtexec is told too, so both paths time the same tactics.
DEFAULT_WORKSPACE_MIB = 1024
_CC = re.compile(r"^(\d+)\.(\d+)$")


class TensorRTError(FailedPrecondition):
    """TensorRT is missing, or could not parse or build the model."""

    reason = "TENSORRT_FAILED"


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile: the batch range of one input of shape ``[B, *dims]``."""

    input_name: str
    dims: tuple[int, ...]
    max_batch: int
    opt_batch: int
    min_batch: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch profile {self.input_name}: need 1 <= min ({self.min_batch}) <= opt "
                f"({self.opt_batch}) <= max ({self.max_batch})"
            )
        if not self.dims or any(d <= 0 for d in self.dims):
            raise ValueError(
                f"batch profile {self.input_name}: static dims needed, got {self.dims}"
            )

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.dims)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input_name,
            "min": list(self.shape(self.min_batch)),
            "opt": list(self.shape(self.opt_batch)),
            "max": list(self.shape(self.max_batch)),
        }


def engine_filename(compute_capability: str) -> str:
    """``model.sm86.plan`` for compute capability ``8.6``."""
    match = _CC.match(compute_capability)
    if match is None:
        raise ValueError(f"compute capability {compute_capability!r} is not MAJOR.MINOR")
    return f"model.sm{match.group(1)}{match.group(2)}.plan"


def default_profile(input_name: str, dims: Sequence[int], max_batch: int) -> BatchProfile:
    """Batch 1..``max_batch``, optimised for half of it (the dynamic batcher's middle
    preferred size: see ``fashionserve.model_repository.configs.preferred_batch_sizes``)."""
    return BatchProfile(input_name, tuple(dims), max_batch, max(1, max_batch // 2))


def trtexec_command(
    onnx_path: Path,
    engine_path: Path,
    profile: BatchProfile,
    precision: Precision,
    timing_cache: Path | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    trtexec: str = "trtexec",
) -> list[str]:
    """The ``trtexec`` invocation that builds the same engine as :func:`build_engine`."""

    def shape(batch: int) -> str:
        return f"{profile.input_name}:{'x'.join(str(d) for d in profile.shape(batch))}"

    cmd = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={shape(profile.min_batch)}",
        f"--optShapes={shape(profile.opt_batch)}",
        f"--maxShapes={shape(profile.max_batch)}",
        f"--memPoolSize=workspace:{workspace_mib}M",
    ]
    if precision == "fp16":
        cmd.append("--fp16")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    # Building is the job; running the engine (trtexec's default benchmark) is not.
    cmd.append("--skipInference")
    return cmd


def format_command(cmd: Sequence[str]) -> str:
    """A command line a shell reads back as ``cmd``."""
    return " ".join(shlex.quote(c) for c in cmd)


# --------------------------------------------------------------------------- building
@dataclass
class EngineInfo:
    """What was built, for the manifest."""

    file: str
    tensorrt_version: str
    compute_capability: str
    gpu: str
    precision: Precision
    profile: BatchProfile
    build_seconds: float
    timing_cache: str | None
    trtexec: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "tensorrt_version": self.tensorrt_version,
            "compute_capability": self.compute_capability,
            "gpu": self.gpu,
            "precision": self.precision,
            "profile": self.profile.to_dict(),
            "build_seconds": round(self.build_seconds, 3),
            "timing_cache": self.timing_cache,
            "trtexec_equivalent": format_command(self.trtexec),
        }


def import_tensorrt() -> Any:
    """``import tensorrt``, or :class:`TensorRTError` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTError(
            "TensorRT is not installed: build engines on a GPU host with the TensorRT of the "
            "Triton image that will serve them (pip install tensorrt==<that version>), or run "
            "the command `fashionserve export --target tensorrt --trtexec-command` prints "
            f"in the TensorRT image ({exc})"
        ) from exc
    return trt


def gpu_identity() -> tuple[str, str]:
    """``(compute capability "8.6", GPU name)`` of CUDA device 0."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("no CUDA GPU is visible: TensorRT engines are built on the GPU")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}", torch.cuda.get_device_name(0)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: BatchProfile,
    precision: Precision,
    timing_cache: Path | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
) -> EngineInfo:
    """Build a serialized engine from ``onnx_path`` into ``engine_path`` (TensorRT 10 API).

    ``timing_cache`` is read if it exists and written back extended after the build.
    Raises :class:`TensorRTError` with the parser's or builder's messages.
    """
    trt = import_tensorrt()
    compute_capability, gpu = gpu_identity()
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: every network is explicit-batch; flags 0 is the standard network.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16":
        fp16 = getattr(trt.BuilderFlag, "FP16", None)
        if fp16 is None:
            # TensorRT 11 builds strongly typed networks only: the precision comes from
            # the ONNX graph's own types, not from a builder flag.
            raise TensorRTError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed "
                "networks only): export an FP16 ONNX graph, or build with --precision fp32"
            )
        config.set_flag(fp16)

    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(
        profile.input_name,
        profile.shape(profile.min_batch),
        profile.shape(profile.opt_batch),
        profile.shape(profile.max_batch),
    )
    config.add_optimization_profile(trt_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another GPU or TensorRT is refused, not misused.
    config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT could not build an engine (see its log)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = timing_cache.with_name(timing_cache.name + ".tmp")
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        tmp.replace(timing_cache)
    return EngineInfo(
        file=engine_path.name,
        tensorrt_version=str(trt.__version__),
        compute_capability=compute_capability,
        gpu=gpu,
        precision=precision,
        profile=profile,
        build_seconds=time.perf_counter() - started,
        timing_cache=str(timing_cache) if timing_cache is not None else None,
        trtexec=trtexec_command(
            onnx_path, engine_path, profile, precision, timing_cache, workspace_mib
        ),
    )
