"""``batch run`` and ``batch status`` against a stand-in gateway on a real gRPC port.

The stand-in answers ``Analyze`` from the image itself (its size, one garment), refuses
what PIL cannot open as CORRUPT_IMAGE and GIFs as UNSUPPORTED_FORMAT, and fails on
purpose when a test asks (UNAVAILABLE, RESOURCE_EXHAUSTED with a RetryInfo, INTERNAL), so
that resuming, retries and exactly-once can be checked in seconds. The integration test
(tests/integration/test_bulk.py) does the same against a real gateway and Triton.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from fashionserve.bulk import runner
from fashionserve.bulk.cli import add_commands
from fashionserve.bulk.errors import (
    CallRefused,
    DuplicateIds,
    GatewayUnavailable,
    InputError,
    OutputFormatError,
    OutputMismatch,
)
from fashionserve.bulk.journal import Journal
from fashionserve.bulk.output import SUCCESS_FILE, Summary, part_files, read_output
from fashionserve.bulk.runner import RunOptions, run_batch
from fashionserve.bulk.sources import Shard
from fashionserve.bulk.status import read_status
from fashionserve.clients import RetryPolicy
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

KEY = "dev.s3cret"


class Killed(Exception):
    """A crash at a chosen point of a run."""


def _status(code: int, reason: str, retry_delay: float | None = None) -> grpc.Status:
    status = status_pb2.Status(code=code, message=f"{reason.lower()} on purpose")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="fashionserve"))
    if retry_delay is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_delay * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


class StandIn(pb_grpc.FashionAnalysisServiceServicer):
    """Answers like the gateway; ``fail`` holds (code, reason, retry_delay) for the next calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.fail: list[tuple[int, str, float | None]] = []
        self.fail_always: tuple[int, str] | None = None
        self.fail_sizes: dict[tuple[int, int], tuple[int, str]] = {}

    def Analyze(self, request: pb.AnalyzeRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.calls += 1
            failure = self.fail.pop(0) if self.fail else None
        if dict(context.invocation_metadata()).get("x-api-key") != KEY:
            context.abort_with_status(_status(code_pb2.UNAUTHENTICATED, "API_KEY_INVALID"))
        if failure is not None:
            context.abort_with_status(_status(*failure))
        if self.fail_always is not None:
            context.abort_with_status(_status(*self.fail_always))
        data = request.image.data
        if data.startswith(b"GIF8"):
            context.abort_with_status(_status(code_pb2.INVALID_ARGUMENT, "UNSUPPORTED_FORMAT"))
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except OSError:
            context.abort_with_status(_status(code_pb2.INVALID_ARGUMENT, "CORRUPT_IMAGE"))
        if image.size in self.fail_sizes:
            context.abort_with_status(_status(*self.fail_sizes[image.size]))
        w, h = image.size
        garment = pb.Garment(
            box=pb.Box(x_min=1, y_min=2, x_max=w - 1, y_max=h - 2),
            detector_score=0.9,
            detector_class="top",
            category_path=[pb.ScoredLabel(name="top", probability=0.95)],
            tag_groups=[
                pb.TagGroupResult(
                    group="colour", labels=[pb.ScoredLabel(name="red", probability=0.8)]
                )
            ],
            embedding=[0.6, 0.8] if request.options.include_embeddings else [],
        )
        return pb.AnalyzeResponse(result=pb.ImageResult(width=w, height=h, garments=[garment]))

    def GetServingInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.GetServingInfoResponse(
            models=[
                pb.ServedModel(name="detector", version="3"),
                pb.ServedModel(name="tagger", version="7"),
            ],
            taxonomy_version="2026.11.0",
            taxonomy_hash="abc123",
        )


@pytest.fixture
def gateway() -> Iterator[tuple[StandIn, str]]:
    servicer = StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FashionAnalysisServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast retries."""
    monkeypatch.setattr(
        runner,
        "RETRY_POLICY",
        RetryPolicy(
            max_attempts=3, initial_backoff=0.01, max_backoff=0.05, retryable=runner.TRANSIENT
        ),
    )


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """12 images in two folders (each its own size), one corrupt, one GIF, one hidden file."""
    root = tmp_path / "images"
    for i in range(10):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(_png(20 + i, 30 + i))
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    (root / "b" / "anim.gif").write_bytes(b"GIF89a" + b"\x00" * 40)
    (root / ".DS_Store").write_bytes(b"not an image")
    return root


def _options(src: Path | str, out: Path, address: str, **kw: Any) -> RunOptions:
    kw.setdefault("concurrency", 4)
    kw.setdefault("part_rows", 3)
    kw.setdefault("api_key", KEY)
    return RunOptions(input=str(src), output=out, gateway=address, **kw)


def _rows(out: Path) -> list[dict[str, Any]]:
    return sorted(read_output(out).to_pylist(), key=lambda r: r["id"])


def test_a_directory_is_tagged_once_with_reasons_for_bad_files(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    servicer, address = gateway
    out = tmp_path / "out"
    result = run_batch(_options(images, out, address))
    assert result.complete and result.tagged == 12
    rows = _rows(out)
    assert [r["id"] for r in rows] == sorted(
        str(p) for p in images.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    by_name = {Path(r["uri"]).name: r for r in rows}
    assert by_name["corrupt.jpg"]["status"] == "CORRUPT_IMAGE"
    assert by_name["anim.gif"]["status"] == "UNSUPPORTED_FORMAT"
    ok = by_name["03.png"]
    assert ok["status"] == "ok" and (ok["width"], ok["height"]) == (23, 33)
    assert ok["garments"][0]["category_path"] == [
        {"name": "top", "probability": pytest.approx(0.95)}
    ]
    assert ok["garments"][0]["tags"] == [
        {"group": "colour", "label": "red", "probability": pytest.approx(0.8)}
    ]
    assert "embedding" not in ok["garments"][0]
    assert ok["models"] == [
        {"name": "detector", "version": "3"},
        {"name": "tagger", "version": "7"},
    ]
    assert ok["taxonomy_hash"] == "abc123"
    assert len(ok["sha256"]) == 64
    assert len(part_files(out)) > 1, "parts of about 3 rows"

    summary = Summary.read(out)
    assert (summary.images, summary.ok) == (12, 10)
    assert summary.failed == {"CORRUPT_IMAGE": 1, "UNSUPPORTED_FORMAT": 1}
    assert summary.models == {"detector": "3", "tagger": "7"}
    assert (out / SUCCESS_FILE).exists()

    calls = servicer.calls
    again = run_batch(_options(images, out, address))
    assert again.complete and again.tagged == 0 and servicer.calls == calls, "a no-op"


def test_a_run_that_dies_between_rename_and_commit_resumes_exactly_once(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = gateway
    reference = tmp_path / "reference"
    run_batch(_options(images, reference, address))

    out = tmp_path / "out"
    commit = Journal.commit_part
    commits = 0

    def dies_on_the_third(self: Journal, name: str, rows: Any) -> None:
        nonlocal commits
        commits += 1
        if commits == 3:
            raise Killed  # the part file is renamed in, not committed
        commit(self, name, rows)

    monkeypatch.setattr(Journal, "commit_part", dies_on_the_third)
    with pytest.raises(Killed):
        run_batch(_options(images, out, address))
    status = read_status(out)
    # The third part is renamed in, never committed; workers busy at the crash may have
    # written or committed one more, as a real kill can leave them.
    assert status.parts >= 2 and len(part_files(out)) > status.parts, "an uncommitted part"
    assert 6 <= status.done < 12 and status.total == 12 and not status.complete

    monkeypatch.setattr(Journal, "commit_part", commit)
    result = run_batch(_options(images, out, address))
    assert result.complete and result.tagged == 12 - status.done
    rows = _rows(out)
    assert [r["id"] for r in rows] == sorted({r["id"] for r in rows}), "each id once"
    assert rows == _rows(reference), "the rows of an uninterrupted run"


def test_duplicate_ids_are_refused_up_front_and_named(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    servicer, address = gateway
    manifest = tmp_path / "input.csv"
    manifest.write_text(
        "id,uri\n"
        + "".join(f"sku-{i % 4},{images}/a/{i:02d}.png\n" for i in (1, 3, 5, 7, 9))
        + f"sku-2,{images}/b/00.png\n"
    )
    with pytest.raises(DuplicateIds) as refused:
        run_batch(_options(manifest, tmp_path / "out", address))
    assert "'sku-1' (3x)" in refused.value.message and "'sku-3' (2x)" in refused.value.message
    assert "sku-2" not in refused.value.message
    assert servicer.calls == 0


def test_shards_together_give_exactly_the_unsharded_output(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = gateway
    # The ids (the image paths) and so the shards must not depend on the temporary
    # directory's random name: with 12 ids, about one run in 40 left a shard empty.
    monkeypatch.chdir(images.parent)
    run_batch(_options(images.name, tmp_path / "all", address))
    shard_rows: list[dict[str, Any]] = []
    for i in range(3):
        out = tmp_path / f"shard-{i}"
        assert run_batch(_options(images.name, out, address, shard=Shard(i, 3))).complete
        rows = _rows(out)
        assert 0 < len(rows) < 12
        shard_rows += rows
    assert sorted(shard_rows, key=lambda r: r["id"]) == _rows(tmp_path / "all")


def test_transient_errors_are_retried_honouring_retry_info(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    servicer, address = gateway
    servicer.fail = [
        (code_pb2.RESOURCE_EXHAUSTED, "OVERLOADED", 0.05),
        (code_pb2.UNAVAILABLE, "TRITON_UNAVAILABLE", None),
    ]
    out = tmp_path / "out"
    assert run_batch(_options(images, out, address)).complete
    assert servicer.calls == 12 + 2
    assert {r["status"] for r in _rows(out)} == {"ok", "CORRUPT_IMAGE", "UNSUPPORTED_FORMAT"}


def test_a_gateway_down_stops_the_run_keeping_what_was_committed(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    servicer, address = gateway
    servicer.fail = [(code_pb2.UNAVAILABLE, "TRITON_UNAVAILABLE", None)] * 3
    out = tmp_path / "out"
    with pytest.raises(GatewayUnavailable):
        run_batch(_options(images, out, address, concurrency=1))
    assert read_status(out).done == 0
    assert run_batch(_options(images, out, address)).complete
    assert len(_rows(out)) == 12


def test_a_refused_key_stops_the_run(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    _, address = gateway
    options = _options(images, tmp_path / "out", address, api_key="bad")
    with pytest.raises(CallRefused, match="API_KEY_INVALID"):
        run_batch(options)


def test_retry_failed_reruns_only_the_failed_images(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    servicer, address = gateway
    servicer.fail_sizes[(24, 34)] = (code_pb2.INTERNAL, "INTERNAL")
    out = tmp_path / "out"
    assert run_batch(_options(images, out, address)).complete
    failed = {Path(r["uri"]).name: r["status"] for r in _rows(out) if r["status"] != "ok"}
    assert failed == {
        "04.png": "INTERNAL",
        "corrupt.jpg": "CORRUPT_IMAGE",
        "anim.gif": "UNSUPPORTED_FORMAT",
    }

    servicer.fail_sizes.clear()
    calls = servicer.calls
    result = run_batch(_options(images, out, address, retry_failed=True))
    assert result.complete and result.tagged == 3 and servicer.calls == calls + 3
    rows = _rows(out)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    assert {Path(r["uri"]).name for r in rows if r["status"] != "ok"} == {"corrupt.jpg", "anim.gif"}
    assert Summary.read(out).ok == 10


def test_an_output_directory_of_another_run_is_refused(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    _, address = gateway
    out = tmp_path / "out"
    run_batch(_options(images, out, address))
    with pytest.raises(OutputMismatch, match="shard"):
        run_batch(_options(images, out, address, shard=Shard(1, 2)))
    with pytest.raises(OutputMismatch, match="include_embeddings"):
        run_batch(_options(images, out, address, include_embeddings=True))


def test_a_mistyped_input_leaves_the_output_free(
    gateway: tuple[StandIn, str], images: Path, tmp_path: Path
) -> None:
    _, address = gateway
    out = tmp_path / "out"
    with pytest.raises(InputError, match="cannot read"):
        run_batch(_options(tmp_path / "imagez.txt", out, address))
    assert run_batch(_options(images, out, address)).complete


def test_embeddings_on_request(gateway: tuple[StandIn, str], images: Path, tmp_path: Path) -> None:
    _, address = gateway
    out = tmp_path / "out"
    run_batch(_options(images, out, address, include_embeddings=True))
    ok = [r for r in _rows(out) if r["status"] == "ok"]
    assert ok[0]["garments"][0]["embedding"] == pytest.approx([0.6, 0.8])
    assert (
        read_output(out).schema.field("garments").type.value_type.get_field_index("embedding") >= 0
    )


def fashionserve_main(argv: list[str]) -> int:
    """``fashionserve`` with only the ``batch`` commands (errors raised, not printed)."""
    parser = argparse.ArgumentParser(prog="fashionserve")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status


def test_the_command_line(
    gateway: tuple[StandIn, str],
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, address = gateway
    out = tmp_path / "out"
    monkeypatch.setenv("FASHIONSERVE_API_KEY", KEY)
    monkeypatch.setenv("FASHIONSERVE_GATEWAY", address)
    run = ["batch", "run", "--input", str(images), "--output", str(out), "--part-rows", "3"]
    assert fashionserve_main(run) == 0
    capsys.readouterr()
    assert fashionserve_main(["batch", "status", "--output", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["done"] == status["total"] == 12 and status["complete"] is True
    assert status["failed"] == {"CORRUPT_IMAGE": 1, "UNSUPPORTED_FORMAT": 1}
    assert fashionserve_main(["batch", "status", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "done:    12 of 12 (100.0%)" in text and "complete" in text
    with pytest.raises(OutputFormatError, match="no bulk journal"):
        fashionserve_main(["batch", "status", "--output", str(tmp_path / "none")])
    with pytest.raises(SystemExit):
        fashionserve_main(["batch", "run", "--input", "x", "--output", "y", "--shard", "3/3"])
    assert isinstance(read_output(out), pa.Table)
