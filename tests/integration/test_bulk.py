"""``fashionserve batch run|status`` against a real gateway and real Triton servers.

Each run is the real command in its own process, killed with SIGKILL where a test says
so, as a node failure or an OOM kill would. The input is a directory of small oracle
scenes (and a few bad files), so that a run takes seconds on two cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    REPO_ROOT,
    Gateway,
    Oracle,
    corrupt_png_that_passes_the_header_checks,
    start_gateway,
    start_triton,
)
from grpc_health.v1 import health_pb2

from fashionserve.bulk.errors import OutputFormatError
from fashionserve.bulk.journal import Journal
from fashionserve.bulk.output import Summary, part_files, read_output
from fashionserve.bulk.status import read_status
from fashionserve.triton import TritonServer

SCENES = 60
BAD_FILES = {
    "bad/corrupt.png": "CORRUPT_IMAGE",
    "bad/truncated.jpg": "CORRUPT_IMAGE",
    "bad/anim.gif": "UNSUPPORTED_FORMAT",
    "bad/notes.txt": "NOT_AN_IMAGE",
}


@pytest.fixture(scope="module")
def day(oracle: Oracle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A day of images: small scenes of one or two garments, and files the gateway refuses."""
    root = tmp_path_factory.mktemp("day") / "images"
    rng = np.random.default_rng(12)
    for i in range(SCENES):
        rects = []
        for colour in rng.choice(len(oracle.colours), size=int(rng.integers(1, 3)), replace=False):
            x, y = int(rng.integers(0, 80)), int(rng.integers(0, 50))
            rects.append(
                ((x, y, x + int(rng.integers(20, 40)), y + int(rng.integers(20, 40))), int(colour))
            )
        path = root / f"shop-{i % 3}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(oracle.scene(128, 96, rects))
    (root / "bad").mkdir()
    (root / "bad/corrupt.png").write_bytes(corrupt_png_that_passes_the_header_checks())
    jpeg = oracle.scene(128, 96, [((10, 10, 50, 50), 0)])
    (root / "bad/truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (root / "bad/anim.gif").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    (root / "bad/notes.txt").write_text("not an image\n")
    return root


def _ids(day: Path) -> list[str]:
    return sorted(str(p) for p in day.rglob("*") if p.is_file())


def batch(gateway: Gateway, *args: str) -> subprocess.Popen[bytes]:
    """``fashionserve batch ...`` as its own process (the gateway and key from the env)."""
    env = {
        **os.environ,
        "FASHIONSERVE_GATEWAY": gateway.address,
        "FASHIONSERVE_API_KEY": gateway.key,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fashionserve.cli", "batch", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run(gateway: Gateway, *args: str, timeout: float = 60) -> tuple[int, str]:
    process = batch(gateway, *args)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode() + err.decode()


def done(output: Path) -> int:
    """Rows the journal of ``output`` holds, 0 before there is one."""
    try:
        return read_status(output).done
    except OutputFormatError:
        return 0


def rows(output: Path) -> list[dict[str, Any]]:
    return sorted(read_output(output).to_pylist(), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def reference(gw: Gateway, day: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run over the whole day."""
    output = tmp_path_factory.mktemp("reference") / "out"
    code, log = run(gw, "run", "--input", str(day), "--output", str(output))
    assert code == 0, log
    return output


def test_a_day_is_tagged_once_with_the_reason_of_each_bad_file(reference: Path, day: Path) -> None:
    tagged = rows(reference)
    assert [r["id"] for r in tagged] == _ids(day)
    status = {Path(r["uri"]).relative_to(day).as_posix(): r["status"] for r in tagged}
    assert {k: v for k, v in status.items() if v != "ok"} == BAD_FILES
    ok = [r for r in tagged if r["status"] == "ok"]
    assert all(r["garments"] and (r["width"], r["height"]) == (128, 96) for r in ok)
    assert {g["detector_class"] for r in ok for g in r["garments"]} <= {
        "top",
        "bottom",
        "full-body",
    }
    assert {m["name"] for m in ok[0]["models"]} >= {"detector", "tagger", "embedder"}
    summary = Summary.read(reference)
    assert (summary.images, summary.ok) == (SCENES + len(BAD_FILES), SCENES)
    assert summary.taxonomy_hash == ok[0]["taxonomy_hash"] != ""


def test_killed_at_random_points_and_resumed_the_output_equals_an_uninterrupted_run(
    gw: Gateway, day: Path, reference: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    args = (
        "run",
        "--input",
        str(day),
        "--output",
        str(output),
        "--part-rows",
        "4",
        "--concurrency",
        "4",
    )
    rng = random.Random(7)
    total = SCENES + len(BAD_FILES)
    kills = 0
    for target in sorted(rng.sample(range(0, total - 8), 3)):
        process = batch(gw, *args)
        # Kill once the journal holds at least `target` rows (0: while listing or starting).
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            if done(output) >= target:
                break
            time.sleep(0.01)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.communicate(timeout=10)
        status = json.loads(run(gw, "status", "--output", str(output), "--json")[1])
        assert status["done"] <= status["total"] == total and not status["complete"]
    assert kills >= 2, "the runs were killed before they finished"
    code, log = run(gw, *args)
    assert code == 0, log
    resumed = rows(output)
    assert [r["id"] for r in resumed] == _ids(day), "every input id exactly once"
    assert resumed == rows(reference), "the rows of an uninterrupted run"
    assert len(part_files(output)) == read_status(output).parts, "no uncommitted part left"
    # A finished run is a no-op.
    before = {p.name: p.stat().st_mtime_ns for p in part_files(output)}
    assert run(gw, *args)[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in part_files(output)} == before


def test_ctrl_c_stops_after_committing_what_is_in_flight(
    gw: Gateway, day: Path, tmp_path: Path
) -> None:
    # The day eight times over, one image at a time: a run long enough (a few seconds) to
    # be interrupted in flight; 512 rows still make one part, committed only at the end.
    copies = 8
    big = tmp_path / "big"
    for k in range(copies):
        shutil.copytree(day, big / f"copy-{k}")
    output = tmp_path / "out"
    args = ("run", "--input", str(big), "--output", str(output), "--concurrency", "1")
    process = batch(gw, *args)
    deadline = time.monotonic() + 30
    while not tagging(output):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.01)
    # The journal marks the run started just before the runner takes over Ctrl-C; a signal
    # in between stops it "before tagging began" (nothing lost either). Half a second in,
    # images are in flight.
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err.decode()
    assert "run the same command to resume" in err.decode()
    code, shown = run(gw, "status", "--output", str(output), "--json")
    assert code == 0 and json.loads(shown)["total"] == copies * (SCENES + len(BAD_FILES))
    status = read_status(output)
    assert 0 < status.done < status.total and status.parts == len(part_files(output)) == 1
    assert run(gw, *args)[0] == 0
    uninterrupted = tmp_path / "uninterrupted"
    assert run(gw, "run", "--input", str(big), "--output", str(uninterrupted))[0] == 0
    assert rows(output) == rows(uninterrupted)


def tagging(output: Path) -> bool:
    """Whether the run writing ``output`` has started tagging."""
    try:
        journal = Journal.open_read_only(output)
    except OutputFormatError:
        return False
    try:
        return journal.progress("ok").run_started_at is not None
    finally:
        journal.close()


def test_sharded_runs_together_give_exactly_the_unsharded_output(
    gw: Gateway, day: Path, reference: Path, tmp_path: Path
) -> None:
    shards = [
        batch(
            gw, "run", "--input", str(day), "--output", str(tmp_path / f"s{i}"), "--shard", f"{i}/3"
        )
        for i in range(3)
    ]
    for process in shards:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
    together = sorted(
        (r for i in range(3) for r in rows(tmp_path / f"s{i}")), key=lambda r: r["id"]
    )
    assert together == rows(reference)


def test_duplicate_ids_are_refused_up_front_with_the_duplicates_named(
    gw: Gateway, day: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "input.csv"
    scenes = sorted(day.rglob("*.jpg"))
    manifest.write_text(
        "id,uri\n" + "".join(f"sku-{i % 20},{p}\n" for i, p in enumerate(scenes[:23]))
    )
    code, log = run(gw, "run", "--input", str(manifest), "--output", str(tmp_path / "out"))
    assert code == 1
    assert "'sku-0' (2x), 'sku-1' (2x), 'sku-2' (2x)" in log and "sku-3'" not in log
    assert read_status(tmp_path / "out").done == 0


@pytest.fixture
def spare_triton(own_repo: Path, tmp_path: Path) -> Iterator[TritonServer]:
    server = start_triton(own_repo, tmp_path / "spare")
    try:
        yield server
    finally:
        server.stop()


def test_one_triton_of_two_killed_during_a_run_loses_nothing(
    own_triton: TritonServer, spare_triton: TritonServer, day: Path, reference: Path, tmp_path: Path
) -> None:
    gateway = start_gateway([spare_triton.grpc_url, own_triton.grpc_url], tmp_path / "gw")
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        output = tmp_path / "out"
        process = batch(
            gateway,
            "run",
            "--input",
            str(day),
            "--output",
            str(output),
            "--part-rows",
            "4",
            "--concurrency",
            "4",
        )
        deadline = time.monotonic() + 30
        while done(output) < 12:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended early"
            time.sleep(0.01)
        assert spare_triton.pid is not None
        os.killpg(spare_triton.pid, signal.SIGKILL)  # Triton and its python-backend stubs
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
        assert rows(output) == rows(reference)
        assert "taken out" in gateway.log.read_text(), "the gateway saw the Triton go"
    finally:
        gateway.stop()
