"""Atomic publication of a model version into a Triton model repository.

Triton reads ``<repo>/<model>/<version>/`` where the version is a positive integer, and
(in poll mode, or at the next start) loads whatever such a directory holds. A version must
therefore appear complete or not at all: it is built in a hidden staging directory inside
``<repo>/<model>/`` (same file system, and a name Triton ignores because it is not a
number), then renamed to its number. ``rename(2)`` of a directory onto a non-empty
directory fails, so two exporters racing for the same number cannot clobber each other:
the loser takes the next number.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fashionserve.checkpoint import file_sha256

STAGING_PREFIX = ".staging-"
MANIFEST = "manifest.json"
# Attempts at claiming a version number before giving up (each one lost to a racing
# publisher that took the number first).
MAX_ATTEMPTS = 100

ManifestFactory = Callable[[int, dict[str, dict[str, Any]]], dict[str, Any]]


class PublishError(RuntimeError):
    """A version could not be published."""


def existing_versions(model_dir: Path) -> list[int]:
    """Numeric version entries of ``model_dir``, ascending (hidden staging dirs ignored)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def publish_version(model_dir: Path, files: Mapping[str, Path], manifest: ManifestFactory) -> Path:
    """Publish ``files`` (name in the version dir -> source path) plus ``manifest.json`` as
    version ``1 + highest existing`` of ``model_dir``; return the version directory.

    ``manifest(version, artifacts)`` builds the manifest; ``artifacts`` maps each file
    name to its ``sha256`` and ``bytes`` as staged (it is called again with the next
    number if a concurrent publisher claimed the first). On any failure the staging
    directory is removed and nothing is published.
    """
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    try:
        # mkdtemp makes it owner-only (0700); Triton often runs as another user.
        staging.chmod(0o755)
        artifacts: dict[str, dict[str, Any]] = {}
        for name, src in files.items():
            if name == MANIFEST or "/" in name or name.startswith("."):
                raise PublishError(f"invalid artifact name {name!r}")
            dst = staging / name
            shutil.copyfile(src, dst)
            _fsync(dst)
            artifacts[name] = {"sha256": file_sha256(dst), "bytes": dst.stat().st_size}

        for _ in range(MAX_ATTEMPTS):
            version = max(existing_versions(model_dir), default=0) + 1
            doc = manifest(version, artifacts)
            path = staging / MANIFEST
            path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            _fsync(path)
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
        raise PublishError(f"{model_dir}: no free version number after {MAX_ATTEMPTS} attempts")
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
