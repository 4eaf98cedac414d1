"""The gateway as callers meet it: real Triton, a real ``fashionserve gateway`` process,
calls over loopback sockets.

Three Tritons serve it:

* ``triton`` (conftest, session): the trained demo models, when the checkpoints exist;
* ``own_triton`` (conftest, session): the conftest's oracle models, with the tagger's manifest
  naming the packaged taxonomy so the gateway accepts to decode its logits. The oracle
  detector finds pure-colour rectangles exactly, so boxes can be checked to the pixel;
* ``oracle_triton`` (conftest, session): the same oracle models without a taxonomy in the
  manifest: a served model the gateway must refuse to decode.

The gateway runs with small limits (conftest ``LIMITS``) so over-limit inputs stay small. Transport
limit: a message over ``max_message_bytes`` is refused by gRPC itself with
RESOURCE_EXHAUSTED before the gateway sees it; an image over ``max_image_bytes`` inside an
acceptable message is INVALID_ARGUMENT / IMAGE_TOO_LARGE.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

# The conftest of this directory as pytest imported it (module "conftest": under pytest's
# default import mode this directory is on sys.path), so the oracle models are defined once.
from conftest import (
    LIMITS,
    SERVICE,
    Gateway,
    Oracle,
    checkpoint_dir,
    corrupt_png_that_passes_the_header_checks,
    encode,
    error_reason,
    start_gateway,
    start_triton,
)
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import Image

from fashionserve.ensemble import MODEL_KINDS
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.taxonomy import load_taxonomy
from fashionserve.triton import TritonServer

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_gw(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Gateway]:
    """A gateway in front of the trained demo models (skipped without checkpoints)."""
    missing = [k for k in MODEL_KINDS if not (checkpoint_dir() / f"{k}.pt").is_file()]
    if missing:
        pytest.skip(f"no trained checkpoints in {checkpoint_dir()}: {', '.join(missing)}")
    triton: TritonServer = request.getfixturevalue("triton")
    gateway = start_gateway(triton.grpc_url, tmp_path_factory.mktemp("trained-gw"))
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway
    finally:
        gateway.stop()


# ------------------------------------------------------------------------ helpers


def assert_same_result(a: pb.ImageResult, b: pb.ImageResult) -> None:
    """Equal up to float noise (a model may round differently at another batch size)."""
    assert (a.width, a.height, len(a.garments)) == (b.width, b.height, len(b.garments))
    for x, y in zip(a.garments, b.garments, strict=True):
        assert x.detector_class == y.detector_class
        assert x.detector_score == pytest.approx(y.detector_score, abs=1e-4)
        for box_x, box_y in ((x.box, y.box), (x.normalized_box, y.normalized_box)):
            assert [box_x.x_min, box_x.y_min, box_x.x_max, box_x.y_max] == pytest.approx(
                [box_y.x_min, box_y.y_min, box_y.x_max, box_y.y_max], abs=1e-2
            )
        assert [c.name for c in x.category_path] == [c.name for c in y.category_path]
        assert list(x.embedding) == pytest.approx(list(y.embedding), abs=1e-4)


def real_photograph() -> bytes:
    """A photograph of a person that nobody here drew: Grace Hopper, shipped with
    matplotlib's sample data (``mpl-data/sample_data/grace_hopper.jpg``)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("matplotlib (which ships the sample photograph) is not installed")
    path = (
        Path(next(iter(spec.submodule_search_locations))) / "mpl-data/sample_data/grace_hopper.jpg"
    )
    return path.read_bytes()


# Two garments the oracle detector finds exactly: colour 0 (score 0.9, class 0 = top) and
# colour 2 (score 0.8, class 2 = full-body).
SCENE_W, SCENE_H = 640, 480
SCENE_RECTS = [((40, 60, 240, 400), 0), ((300, 100, 600, 300), 2)]


@pytest.fixture(scope="module")
def scene(oracle: Oracle) -> bytes:
    return oracle.scene(SCENE_W, SCENE_H, SCENE_RECTS, "PNG")


@pytest.fixture(scope="module")
def blank(oracle: Oracle) -> bytes:
    return oracle.scene(320, 240, [], "JPEG")


# ------------------------------------------------------------------------- the RPCs
def test_analyze_returns_each_garment_in_original_pixels(gw: Gateway, scene: bytes) -> None:
    result = gw.analyze(scene)
    assert (result.width, result.height) == (SCENE_W, SCENE_H)
    assert [g.detector_class for g in result.garments] == ["top", "full-body"]
    assert [round(g.detector_score, 2) for g in result.garments] == [0.9, 0.8]
    for garment, ((x1, y1, x2, y2), _) in zip(result.garments, SCENE_RECTS, strict=True):
        box, norm = garment.box, garment.normalized_box
        # Letterboxed to 256 px: one canvas pixel is 2.5 image pixels.
        assert (box.x_min, box.y_min, box.x_max, box.y_max) == pytest.approx(
            (x1, y1, x2, y2), abs=4
        )
        assert (norm.x_min, norm.y_min, norm.x_max, norm.y_max) == pytest.approx(
            (box.x_min / SCENE_W, box.y_min / SCENE_H, box.x_max / SCENE_W, box.y_max / SCENE_H),
            abs=1e-5,
        )
        # The oracle tagger's root probability is a softmax of the crop's mean colour, about
        # 0.5 for the darker garment: under the default threshold (0.5 given the parent)
        # its path may stay empty; a decided root is the detector's class.
        if garment.category_path:
            assert garment.category_path[0].name == garment.detector_class
        assert {t.group for t in garment.tag_groups} <= {"colour", "pattern", "sleeve", "details"}
        assert not garment.embedding and not garment.probability_tables  # not asked for
    assert result.garments[0].category_path, "the red top's root is decided"


def test_analyze_options(gw: Gateway, scene: bytes) -> None:
    full = gw.analyze(scene, include_embeddings=True, include_probability_tables=True)
    for garment in full.garments:
        assert len(garment.embedding) == 8
        assert np.linalg.norm(garment.embedding) == pytest.approx(1.0, abs=1e-4)
        assert {t.name for t in garment.probability_tables} >= {"category:", "colour"}
    assert len(gw.analyze(scene, max_garments=1).garments) == 1
    assert [round(g.detector_score, 2) for g in gw.analyze(scene, min_score=0.85).garments] == [0.9]


def test_an_image_without_garments_gives_an_empty_list(gw: Gateway, blank: bytes) -> None:
    result = gw.analyze(blank)
    assert (result.width, result.height, list(result.garments)) == (320, 240, [])


def test_batch_analyze_keeps_order_and_fails_only_the_corrupt_image(
    gw: Gateway, scene: bytes, blank: bytes, oracle: Oracle
) -> None:
    other = oracle.scene(400, 400, [((50, 50, 350, 200), 1)], "JPEG")
    truncated = other[: len(other) // 2]
    images = [scene, truncated, blank, corrupt_png_that_passes_the_header_checks(), other]
    reply = gw.stub.BatchAnalyze(
        pb.BatchAnalyzeRequest(images=[pb.Image(data=d) for d in images]),
        metadata=gw.auth,
        timeout=60,
    )
    kinds = [entry.WhichOneof("outcome") for entry in reply.entries]
    assert kinds == ["result", "error", "result", "error", "result"]
    # Caught by the gateway's checks (truncated) and by Triton's decode (corrupt data).
    for index in (1, 3):
        error = reply.entries[index].error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error.reason == "CORRUPT_IMAGE", error
    # Batching changes nothing: each result equals the image analysed alone.
    for index in (0, 2, 4):
        assert_same_result(reply.entries[index].result, gw.analyze(images[index]))


def test_batch_analyze_refuses_too_many_images(gw: Gateway, blank: bytes) -> None:
    request = pb.BatchAnalyzeRequest(images=[pb.Image(data=blank)] * 9)
    with pytest.raises(grpc.RpcError) as info:
        gw.stub.BatchAnalyze(request, metadata=gw.auth, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "TOO_MANY_IMAGES"


def test_stream_with_more_in_flight_than_the_batch_size(
    gw: Gateway, scene: bytes, blank: bytes
) -> None:
    count = 5 * LIMITS["max_batch_size"]  # also over max_stream_in_flight
    requests = [
        pb.StreamAnalyzeRequest(
            request_id=f"req-{i}", image=pb.Image(data=scene if i % 2 else blank)
        )
        for i in range(count)
    ]
    requests.append(pb.StreamAnalyzeRequest(request_id="bad-bytes", image=pb.Image(data=b"nope")))
    requests.append(pb.StreamAnalyzeRequest(request_id="x" * 129, image=pb.Image(data=blank)))
    answers = {
        r.request_id: r
        for r in gw.stub.StreamAnalyze(iter(requests), metadata=gw.auth, timeout=120)
    }
    assert set(answers) == {r.request_id for r in requests}  # every id echoed, all answered
    for i in range(count):
        answer = answers[f"req-{i}"]
        assert answer.WhichOneof("outcome") == "result"
        assert len(answer.result.garments) == (2 if i % 2 else 0)
    assert answers["bad-bytes"].error.reason == "NOT_AN_IMAGE"
    assert answers["x" * 129].error.reason == "INVALID_REQUEST_ID"


def test_get_taxonomy(gw: Gateway) -> None:
    reply = gw.stub.GetTaxonomy(pb.GetTaxonomyRequest(), metadata=gw.auth, timeout=10)
    taxonomy = load_taxonomy()
    assert (reply.version, reply.hash) == (taxonomy.version, taxonomy.hash)
    assert [c.name for c in reply.categories][:3] == ["top", "bottom", "full-body"]
    names = [c.name for c in reply.categories]
    for category in reply.categories:  # parents before children
        if category.parent:
            assert names.index(category.parent) < names.index(category.name)
    sleeve = next(g for g in reply.tag_groups if g.name == "sleeve")
    assert sleeve.exclusive and list(sleeve.applies_to) == ["top", "full-body"]


def test_get_serving_info(gw: Gateway, own_repo: Path) -> None:
    reply = gw.stub.GetServingInfo(pb.GetServingInfoRequest(), metadata=gw.auth, timeout=10)
    assert {(m.name, m.version) for m in reply.models} == {
        ("detector", "1"),
        ("tagger", "1"),
        ("embedder", "1"),
    }
    assert reply.taxonomy_hash == load_taxonomy().hash
    limits = reply.limits
    assert limits.max_image_bytes == LIMITS["max_image_bytes"]
    assert limits.max_image_pixels == LIMITS["max_image_pixels"]
    assert limits.max_message_bytes == LIMITS["max_message_bytes"]
    assert limits.max_images_per_batch == LIMITS["max_images_per_batch_request"]
    assert list(limits.accepted_formats) == ["JPEG", "PNG", "WEBP"]
    assert limits.max_garments_per_image == 16
    assert limits.embedding_dimension == 8
    assert reply.gateway_version


def test_get_serving_info_reports_artifact_hashes(gw: Gateway, own_repo: Path) -> None:
    reply = gw.stub.GetServingInfo(pb.GetServingInfoRequest(), metadata=gw.auth, timeout=10)
    from fashionserve.checkpoint import file_sha256

    exported = [m for m in reply.models if m.name in ("detector", "tagger", "embedder")]
    assert len(exported) == 3
    for model in exported:
        assert model.artifact_sha256 == file_sha256(
            own_repo / model.name / model.version / "model.onnx"
        )


# ------------------------------------------------------------------------------ auth
@pytest.mark.parametrize(
    "metadata", [(), (("x-api-key", "tests.wrong-secret"),)], ids=["none", "wrong"]
)
def test_calls_without_a_valid_key_are_refused(gw: Gateway, scene: bytes, metadata: Any) -> None:
    for call, request in [
        (gw.stub.Analyze, pb.AnalyzeRequest(image=pb.Image(data=scene))),
        (gw.stub.GetTaxonomy, pb.GetTaxonomyRequest()),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_reason(info.value) in {"API_KEY_MISSING", "API_KEY_INVALID"}
    assert (
        "wrong-secret" not in gw.log.read_text() and gw.key.split(".")[1] not in gw.log.read_text()
    )


# ------------------------------------------------------------------------ bad input
def _bad_inputs(oracle: Oracle) -> dict[str, tuple[bytes, str]]:
    jpeg = oracle.scene(400, 300, [((10, 10, 200, 200), 0)], "JPEG")
    rng = np.random.default_rng(0)
    return {
        "empty": (b"", "EMPTY_IMAGE"),
        "not an image": (b"these bytes are not an image at all", "NOT_AN_IMAGE"),
        "truncated JPEG": (jpeg[: len(jpeg) * 2 // 3], "CORRUPT_IMAGE"),
        "GIF": (encode(Image.new("P", (32, 32)), "GIF"), "UNSUPPORTED_FORMAT"),
        "BMP": (encode(Image.new("RGB", (32, 32)), "BMP"), "UNSUPPORTED_FORMAT"),
        "over the pixel limit": (encode(Image.new("L", (3000, 2000)), "PNG"), "TOO_MANY_PIXELS"),
        "over the byte limit": (
            encode((rng.random((700, 700, 3)) * 255).astype(np.uint8), "PNG"),
            "IMAGE_TOO_LARGE",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "not an image",
        "truncated JPEG",
        "GIF",
        "BMP",
        "over the pixel limit",
        "over the byte limit",
    ],
)
def test_bad_input_is_invalid_argument_naming_the_problem_and_serving_goes_on(
    gw: Gateway, oracle: Oracle, scene: bytes, case: str
) -> None:
    data, reason = _bad_inputs(oracle)[case]
    with pytest.raises(grpc.RpcError) as info:
        gw.analyze(data)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == reason
    assert info.value.details()
    assert len(gw.analyze(scene).garments) == 2  # still serving
    assert gw.health() == health_pb2.HealthCheckResponse.SERVING


def test_message_over_the_size_limit_is_refused_by_grpc(gw: Gateway, scene: bytes) -> None:
    """gRPC's own limit (max_message_bytes): RESOURCE_EXHAUSTED, not our INVALID_ARGUMENT."""
    huge = b"\xff\xd8\xff" + os.urandom(3 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as info:
        gw.analyze(huge)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(gw.analyze(scene).garments) == 2


def test_invalid_options_are_named(gw: Gateway, scene: bytes) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"min_score": 1.5}, "minScore"),
        ({"max_garments": 99}, "maxGarments"),
    ]
    for options, option in cases:
        with pytest.raises(grpc.RpcError) as info:
            gw.analyze(scene, **options)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == "INVALID_OPTION"
        assert option in str(rpc_status.from_call(info.value))


# ---------------------------------------------------------------- a real photograph
def test_a_real_photograph_of_a_person_is_answered(gw: Gateway) -> None:
    photo = real_photograph()
    result = gw.analyze(photo, include_embeddings=True)
    with Image.open(io.BytesIO(photo)) as img:
        assert (result.width, result.height) == img.size
    for garment in result.garments:
        assert 0 <= garment.normalized_box.x_min <= garment.normalized_box.x_max <= 1


def test_a_real_photograph_through_the_trained_models(trained_gw: Gateway) -> None:
    photo = real_photograph()
    result = trained_gw.analyze(photo, include_embeddings=True, include_probability_tables=True)
    assert (result.width, result.height) == (512, 600)
    for garment in result.garments:
        assert garment.detector_class in {"top", "bottom", "full-body"}
        assert garment.category_path and len(garment.embedding) > 0
        assert 0 <= garment.normalized_box.y_min <= garment.normalized_box.y_max <= 1
    # The same photo in a batch gives the same answer.
    batch = trained_gw.stub.BatchAnalyze(
        pb.BatchAnalyzeRequest(
            images=[pb.Image(data=photo)] * 3,
            options=pb.AnalyzeOptions(include_embeddings=True, include_probability_tables=True),
        ),
        metadata=trained_gw.auth,
        timeout=60,
    )
    for entry in batch.entries:
        assert_same_result(entry.result, result)


def test_trained_serving_info_names_the_exported_versions(trained_gw: Gateway) -> None:
    reply = trained_gw.stub.GetServingInfo(
        pb.GetServingInfoRequest(), metadata=trained_gw.auth, timeout=10
    )
    assert {m.name for m in reply.models} == {"detector", "tagger", "embedder"}
    assert all(m.version.isdigit() for m in reply.models)
    assert reply.taxonomy_hash == load_taxonomy().hash
    assert trained_gw.health() == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------ reflection
def _buf() -> str:
    found = Path(sys.executable).parent / "buf"
    if found.exists():
        return str(found)
    which = shutil.which("buf")
    if which is None:
        pytest.skip("buf (PyPI buf-bin) is not installed")
    return which


def test_a_client_that_never_saw_our_code_discovers_and_calls_the_service(
    gw: Gateway, scene: bytes
) -> None:
    """``buf curl`` learns the schema through server reflection alone."""
    base = [_buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect"]
    url = f"http://{gw.address}"
    listed = subprocess.run(
        [*base, "--list-methods", url], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert f"{SERVICE}/Analyze" in listed.stdout and f"{SERVICE}/StreamAnalyze" in listed.stdout
    body = json.dumps({"image": {"data": base64.b64encode(scene).decode()}})
    called = subprocess.run(
        [*base, "-H", f"x-api-key: {gw.key}", "-d", body, f"{url}/{SERVICE}/Analyze"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    reply = json.loads(called.stdout)
    assert reply["result"]["width"] == SCENE_W
    assert [g["detectorClass"] for g in reply["result"]["garments"]] == ["top", "full-body"]


# ---------------------------------------------------------------------------- health
def test_health_stays_not_serving_when_the_served_taxonomy_does_not_match(
    oracle_triton: TritonServer, tmp_path: Path, scene: bytes
) -> None:
    """The session oracle's tagger declares no taxonomy: its logits must not be decoded."""
    gateway = start_gateway(oracle_triton.grpc_url, tmp_path)
    try:
        time.sleep(1.0)  # several health checks
        assert gateway.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            gateway.analyze(scene)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(info.value) == "TAXONOMY_MISMATCH"
    finally:
        gateway.stop()


def test_health_goes_not_serving_when_triton_stops(
    own_repo: Path, tmp_path: Path, scene: bytes
) -> None:
    server = start_triton(own_repo, tmp_path)
    gateway = start_gateway(server.grpc_url, tmp_path / "gw")
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        assert len(gateway.analyze(scene).garments) == 2
        server.stop()
        gateway.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=15)
        with pytest.raises(grpc.RpcError) as info:
            gateway.analyze(scene)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(info.value) in {"NOT_SERVING", "TRITON_UNAVAILABLE"}
        # The gateway itself stays up and answers what it can without Triton.
        assert gateway.process.poll() is None
        assert gateway.stub.GetTaxonomy(pb.GetTaxonomyRequest(), metadata=gateway.auth).hash
    finally:
        gateway.stop()
        server.stop()


def test_sigterm_stops_the_gateway_cleanly(gw: Gateway) -> None:
    """Last: a graceful stop exits 0 and says so in the log."""
    gw.process.send_signal(signal.SIGTERM)
    assert gw.process.wait(timeout=30) == 0
    assert "gateway stopped" in gw.log.read_text()
