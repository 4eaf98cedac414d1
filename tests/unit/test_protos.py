"""The gRPC contract: generated code up to date, Buf style, no breaking change.

``buf`` comes from the PyPI package ``buf-bin`` (in the dev extras), installed next to the
Python interpreter running the tests.
"""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("protos/fashion/v1/analysis_service.proto")
# Code is generated through the fashionserve/protos link, so that it imports fashionserve.protos.
GENERATE_FROM = "fashionserve" / PROTO
GENERATED = ("analysis_service_pb2.py", "analysis_service_pb2.pyi", "analysis_service_pb2_grpc.py")


def _buf() -> str:
    candidate = Path(sys.executable).parent / "buf"
    found = str(candidate) if candidate.exists() else shutil.which("buf")
    if found is None:
        pytest.fail("buf is not installed: `pip install -e '.[dev]'` installs buf-bin")
    return found


def _run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """Regenerating (`make protos`) must reproduce the committed files byte for byte."""
    result = _run(
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        str(GENERATE_FROM),
    )
    assert result.returncode == 0, result.stderr
    stale = [
        name
        for name in GENERATED
        if not filecmp.cmp(
            tmp_path / GENERATE_FROM.parent / name, ROOT / PROTO.parent / name, shallow=False
        )
    ]
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_buf_lint_passes() -> None:
    result = _run(_buf(), "lint", "protos")
    assert result.returncode == 0, result.stdout + result.stderr


def _previous_protos(tmp_path: Path) -> Path | None:
    """protos/ as of the commit before HEAD, extracted into ``tmp_path``; None if absent."""
    if _run("git", "rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: no previous commit to compare the contract with")
    if _run("git", "rev-parse", "--verify", "--quiet", "HEAD~1^{commit}").returncode != 0:
        return None
    if _run("git", "cat-file", "-e", f"HEAD~1:{PROTO.as_posix()}").returncode != 0:
        return None
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD~1", "protos"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True, timeout=60)
    return tmp_path / "protos"


def test_buf_breaking_against_previous_commit(tmp_path: Path) -> None:
    """The working tree's contract must not break the previous commit's (FILE rules)."""
    against = _previous_protos(tmp_path / "against")
    if against is None:
        pytest.skip(
            "the commit before HEAD has no protos/ (the contract was introduced by HEAD): "
            "nothing to be compatible with yet"
        )
    result = _run(_buf(), "breaking", "protos", "--against", str(against))
    assert result.returncode == 0, "breaking change:\n" + result.stdout + result.stderr


def test_buf_breaking_detects_a_breaking_change(tmp_path: Path) -> None:
    """The check above has teeth: changing a field's type is reported."""
    changed = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", changed, ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    proto = changed / PROTO.relative_to("protos")
    text = proto.read_text()
    assert "float min_score = 1;" in text
    proto.write_text(text.replace("float min_score = 1;", "double min_score = 1;"))
    result = _run(_buf(), "breaking", str(changed), "--against", "protos")
    assert result.returncode != 0
    assert "min_score" in result.stdout + result.stderr
