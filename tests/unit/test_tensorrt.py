"""TensorRT engines: the trtexec command (anywhere), the engine build and its parity (GPU hosts).

Tests marked ``tensorrt`` need the ``tensorrt`` Python package and an NVIDIA GPU; they
are skipped, saying so, elsewhere. README "TensorRT engines" says how to run them.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
from test_export import make_checkpoint

from fashionserve.cli import main
from fashionserve.export.exporter import export_checkpoint, trtexec_for_version
from fashionserve.export.tensorrt import (
    BatchProfile,
    default_profile,
    engine_filename,
    trtexec_command,
)
from fashionserve.model_repository.build import build_repository
from fashionserve.model_repository.settings import RepositorySettings
from fashionserve.taxonomy import Taxonomy, load_taxonomy


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt on a GPU host; see README)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (TensorRT engines are built and run on the GPU)"
    return None


needs_tensorrt = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


# ------------------------------------------------------------------ no TensorRT needed
def test_the_trtexec_command_builds_what_the_python_api_builds(tmp_path: Path) -> None:
    profile = default_profile("crops", (3, 96, 96), max_batch=256)
    cmd = trtexec_command(
        tmp_path / "model.onnx",
        tmp_path / "model.sm86.plan",
        profile,
        "fp16",
        timing_cache=tmp_path / "cache.bin",
    )
    assert cmd == [
        "trtexec",
        f"--onnx={tmp_path / 'model.onnx'}",
        f"--saveEngine={tmp_path / 'model.sm86.plan'}",
        "--minShapes=crops:1x3x96x96",
        "--optShapes=crops:128x3x96x96",
        "--maxShapes=crops:256x3x96x96",
        "--memPoolSize=workspace:1024M",
        "--fp16",
        f"--timingCacheFile={tmp_path / 'cache.bin'}",
        "--skipInference",
    ]
    fp32 = trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", profile, "fp32")
    assert "--fp16" not in fp32 and not any(a.startswith("--timingCache") for a in fp32)


def test_engine_names_and_profiles_are_checked() -> None:
    assert engine_filename("8.6") == "model.sm86.plan"
    assert engine_filename("10.0") == "model.sm100.plan"
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR"):
        engine_filename("sm86")
    with pytest.raises(ValueError, match="min"):
        BatchProfile("images", (3, 64, 64), max_batch=4, opt_batch=8)


def test_export_prints_the_trtexec_command_for_the_published_version(
    tmp_path: Path, taxonomy: Taxonomy, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = make_checkpoint("tagger", tmp_path / "tagger.pt", taxonomy)
    repo = tmp_path / "repo"
    args = ["export", "--checkpoint", str(ckpt), "--repository", str(repo), "--target", "tensorrt"]
    assert main([*args, "--trtexec-command", "--compute-capability", "8.9"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # the command alone on stdout, for a build job to run
    cmd = shlex.split(out[0])
    version = repo / "tagger" / "1"
    assert cmd[:3] == [
        "trtexec",
        f"--onnx={version / 'model.onnx'}",
        f"--saveEngine={version / 'model.sm89.plan'}",
    ]
    assert (version / "model.onnx").is_file()
    # No config yet: the profile covers what `repo build` will configure by default.
    default_max = RepositorySettings().max_crops_per_request
    assert f"--maxShapes=crops:{default_max}x3x48x48" in cmd and "--fp16" in cmd

    # Once the repository is built, the profile follows the model's max_batch_size.
    export_checkpoint(make_checkpoint("detector", tmp_path / "d.pt", taxonomy), repo, echo=None)
    export_checkpoint(make_checkpoint("embedder", tmp_path / "e.pt", taxonomy), repo, echo=None)
    build_repository(repo, RepositorySettings(max_images_per_request=2, max_crops_per_image=3))
    again = trtexec_for_version(version, "fp32")
    assert "--maxShapes=crops:6x3x48x48" in again and "--optShapes=crops:3x3x48x48" in again
    assert f"--saveEngine={version / 'model.plan'}" in again and "--fp16" not in again


def test_trtexec_command_goes_with_the_tensorrt_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["export", "--checkpoint", "x.pt", "--repository", str(tmp_path), "--trtexec-command"]
    assert main(args) == 2
    assert "--trtexec-command goes with --target tensorrt" in capsys.readouterr().err


def test_without_tensorrt_an_engine_build_says_how_to_get_one(
    tmp_path: Path, taxonomy: Taxonomy, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    ckpt = make_checkpoint("tagger", tmp_path / "tagger.pt", taxonomy)
    args = ["export", "--checkpoint", str(ckpt), "--repository", str(tmp_path / "r")]
    assert main([*args, "--target", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "--trtexec-command" in err
    assert not (tmp_path / "r" / "tagger").exists()  # refused before any work


# ----------------------------------------------------------------- TensorRT and a GPU
@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["detector", "tagger", "embedder"])
def test_engine_build_records_itself_and_matches_onnx_runtime(
    tmp_path: Path, taxonomy: Taxonomy, kind: str, precision: str
) -> None:
    import tensorrt as trt
    import torch

    ckpt = make_checkpoint(kind, tmp_path / f"{kind}.pt", taxonomy)
    cache = tmp_path / "timing.cache"
    version = export_checkpoint(
        ckpt,
        tmp_path / "repo",
        target="tensorrt",
        precision=precision,  # type: ignore[arg-type]
        timing_cache=cache,
        max_batch=8,
        echo=None,
    )
    major, minor = torch.cuda.get_device_capability(0)
    plan = version / f"model.sm{major}{minor}.plan"
    assert plan.is_file() and cache.stat().st_size > 0
    manifest = json.loads((version / "manifest.json").read_text())
    (engine,) = manifest["tensorrt"]["engines"]
    assert engine["tensorrt_version"] == trt.__version__
    assert engine["compute_capability"] == f"{major}.{minor}"
    assert engine["precision"] == precision
    assert engine["profile"]["max"][0] == 8 and engine["profile"]["min"][0] == 1
    assert engine["parity"]["passed"] is True
    assert manifest["artifacts"][plan.name]["bytes"] == plan.stat().st_size

    # The tensorrt flavour loads it for this GPU type through cc_model_filenames.
    from fashionserve.model_repository.configs import engine_files, render_cc_model_filenames
    from fashionserve.model_repository.exported import model_version

    mv = model_version(tmp_path / "repo", kind, int(version.name), "tensorrt")
    files = engine_files(mv, RepositorySettings(flavour="tensorrt"))
    assert files == {f"{major}.{minor}": plan.name}
    assert plan.name in render_cc_model_filenames(files)
