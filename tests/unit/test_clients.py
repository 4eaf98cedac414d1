"""The client library and ``fashionserve analyze`` against a real gRPC server on port 0,
and the rule that credentials go in plaintext only to a loopback address.

The server here is a small stand-in written with the generated servicer base: it lets the
tests make the service fail on purpose (UNAVAILABLE twice, a slow answer, a refused key)
and check what a caller sees: retries, deadlines, errors with their reasons, typed results.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

from fashionserve.cli import main as fashionserve_main
from fashionserve.clients import (
    AnalyzeOptions,
    AsyncFashionClient,
    ClientSetupError,
    FashionClient,
    FashionServeError,
    RetryPolicy,
    StreamRequest,
)
from fashionserve.clients.security import is_loopback
from fashionserve.clients.types import (
    batch_entry_from_proto,
    garment_from_proto,
    serving_info_from_proto,
    to_jsonable,
)
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.protos.fashion.v1 import analysis_service_pb2_grpc as pb_grpc

GOOD_KEY = "dev.s3cret"
MIB = 1024 * 1024


def _garment(width: int, height: int) -> pb.Garment:
    box = pb.Box(x_min=10, y_min=20, x_max=width - 10, y_max=height - 20)
    return pb.Garment(
        box=box,
        normalized_box=pb.Box(
            x_min=10 / width,
            y_min=20 / height,
            x_max=(width - 10) / width,
            y_max=(height - 20) / height,
        ),
        detector_score=0.91,
        detector_class="top",
        category_path=[
            pb.ScoredLabel(name="top", probability=0.97),
            pb.ScoredLabel(name="shirt", probability=0.88),
        ],
        tag_groups=[
            pb.TagGroupResult(group="colour", labels=[pb.ScoredLabel(name="red", probability=0.9)]),
            pb.TagGroupResult(
                group="details",
                labels=[
                    pb.ScoredLabel(name="buttons", probability=0.8),
                    pb.ScoredLabel(name="pockets", probability=0.6),
                ],
            ),
        ],
    )


def _status(code: int, message: str, reason: str, **metadata: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="fashionserve", metadata=metadata)
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


class StandIn(pb_grpc.FashionAnalysisServiceServicer):
    """Answers like the gateway does, with failures the tests switch on."""

    def __init__(self) -> None:
        self.fail_unavailable = 0  # fail this many Analyze calls with UNAVAILABLE first
        self.delay = 0.0  # seconds every Analyze call takes
        self.attempts = 0
        self.attempt_times: list[float] = []
        self.keys_seen: list[str | None] = []
        self.options_seen: list[pb.AnalyzeOptions] = []
        self.batch_sizes: list[int] = []
        self.max_images_per_batch = 2

    async def _check_key(self, context: grpc.aio.ServicerContext) -> None:
        key = dict(context.invocation_metadata() or ()).get("x-api-key")
        self.keys_seen.append(key if isinstance(key, str) else None)
        if key != GOOD_KEY:
            await context.abort_with_status(
                _status(
                    code_pb2.UNAUTHENTICATED,
                    "the API key is not valid",
                    "API_KEY_INVALID",
                    keyId="dev",
                )
            )

    def _result(self, data: bytes) -> pb.ImageResult:
        # The "image size" is read from the bytes, so a test can tell which image came back.
        img = Image.open(io.BytesIO(data))
        return pb.ImageResult(
            width=img.width, height=img.height, garments=[_garment(img.width, img.height)]
        )

    async def Analyze(
        self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AnalyzeResponse:
        self.attempts += 1
        self.attempt_times.append(time.monotonic())
        if self.attempts <= self.fail_unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        await self._check_key(context)
        self.options_seen.append(request.options)
        await asyncio.sleep(self.delay)
        if request.image.data.startswith(b"SIZE:"):
            return pb.AnalyzeResponse(result=pb.ImageResult(width=len(request.image.data)))
        return pb.AnalyzeResponse(result=self._result(request.image.data))

    async def BatchAnalyze(
        self, request: pb.BatchAnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchAnalyzeResponse:
        await self._check_key(context)
        self.batch_sizes.append(len(request.images))
        entries = []
        for image in request.images:
            try:
                entries.append(pb.BatchAnalyzeEntry(result=self._result(image.data)))
            except OSError:
                entries.append(
                    pb.BatchAnalyzeEntry(
                        error=pb.ItemError(
                            code=code_pb2.INVALID_ARGUMENT,
                            message="the bytes are not an image",
                            reason="IMAGE_DECODE_FAILED",
                            metadata={"format": "unknown"},
                        )
                    )
                )
        return pb.BatchAnalyzeResponse(entries=entries)

    async def StreamAnalyze(
        self,
        request_iterator: AsyncIterator[pb.StreamAnalyzeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.StreamAnalyzeResponse]:
        await self._check_key(context)
        async for request in request_iterator:
            yield pb.StreamAnalyzeResponse(
                request_id=request.request_id, result=self._result(request.image.data)
            )

    async def GetTaxonomy(
        self, request: pb.GetTaxonomyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTaxonomyResponse:
        return pb.GetTaxonomyResponse(
            version="2026.11.0",
            hash="abc",
            categories=[
                pb.Category(name="top", path=["top"]),
                pb.Category(name="shirt", parent="top", path=["top", "shirt"]),
            ],
            tag_groups=[
                pb.TagGroup(
                    name="sleeve", exclusive=True, labels=["short", "long"], applies_to=["top"]
                )
            ],
        )

    async def GetServingInfo(
        self, request: pb.GetServingInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServingInfoResponse:
        await self._check_key(context)
        return pb.GetServingInfoResponse(
            models=[pb.ServedModel(name="tagger", version="3", artifact_sha256="f00")],
            taxonomy_version="2026.11.0",
            taxonomy_hash="abc",
            limits=pb.Limits(
                max_image_bytes=20 * MIB,
                max_image_pixels=50_000_000,
                max_images_per_batch=self.max_images_per_batch,
                max_message_bytes=64 * MIB,
                accepted_formats=["JPEG", "PNG", "WEBP"],
                max_garments_per_image=16,
                embedding_dimension=128,
            ),
            gateway_version="0.1.0",
        )


class ServerThread:
    """A grpc.aio server on 127.0.0.1:0 in its own thread and event loop."""

    def __init__(self, servicer: StandIn) -> None:
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _start(self) -> int:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * MIB),
                ("grpc.max_send_message_length", 64 * MIB),
            ]
        )
        pb_grpc.add_FashionAnalysisServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with ServerThread(StandIn()) as s:
        yield s


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.2, max_backoff=1.0, jitter=0.5)

# ---------------------------------------------------------------------------- conversion


def test_garment_conversion_keeps_every_field() -> None:
    g = garment_from_proto(_garment(200, 100))
    assert g.box.as_tuple() == (10, 20, 190, 80)
    assert g.normalized_box.x_max == pytest.approx(0.95)
    assert g.detector_score == pytest.approx(0.91)
    assert [s.name for s in g.category_path] == ["top", "shirt"]
    assert g.category == "shirt"
    assert [s.name for s in g.tags["details"]] == ["buttons", "pockets"]
    assert g.embedding is None  # not requested
    with_embedding = pb.Garment(embedding=[0.6, 0.8], detector_class="bottom")
    converted = garment_from_proto(with_embedding)
    assert converted.embedding == pytest.approx((0.6, 0.8))
    assert converted.category == "bottom"  # no confident path: the detector's class
    doc = to_jsonable(g)
    assert json.loads(json.dumps(doc))["category_path"][1] == {
        "name": "shirt",
        "probability": g.category_path[1].probability,
    }
    assert "embedding" not in doc


def test_batch_entry_error_carries_code_and_reason() -> None:
    entry = batch_entry_from_proto(
        pb.BatchAnalyzeEntry(
            error=pb.ItemError(
                code=code_pb2.INVALID_ARGUMENT,
                message="truncated JPEG",
                reason="IMAGE_TRUNCATED",
                metadata={"bytes": "10"},
            )
        )
    )
    assert not entry.ok and entry.error is not None
    assert entry.error.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(FashionServeError) as info:
        entry.unwrap()
    assert info.value.code_name == "INVALID_ARGUMENT"
    assert info.value.reason == "IMAGE_TRUNCATED"
    assert info.value.metadata == {"bytes": "10"}
    assert to_jsonable(entry)["error"]["code"] == "INVALID_ARGUMENT"


def test_serving_info_conversion() -> None:
    info = serving_info_from_proto(
        pb.GetServingInfoResponse(
            models=[pb.ServedModel(name="detector", version="2")],
            limits=pb.Limits(max_images_per_batch=16, accepted_formats=["JPEG"]),
        )
    )
    assert info.models[0].version == "2"
    assert info.limits.max_images_per_batch == 16
    assert info.limits.accepted_formats == ("JPEG",)


def test_options_are_checked_before_sending() -> None:
    with pytest.raises(ValueError, match="min_score"):
        AnalyzeOptions(min_score=1.5)
    with pytest.raises(ValueError, match="max_garments"):
        AnalyzeOptions(max_garments=-1)


# ------------------------------------------------------------------------- retry policy


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0, jitter=0.5)
    for retry, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        draws = [policy.backoff(retry) for _ in range(200)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in draws)
        assert max(draws) - min(draws) > 0.1 * ceiling  # jittered, not constant


def test_retry_state_never_sleeps_past_the_deadline() -> None:
    now = [0.0]
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.4, max_backoff=0.4, jitter=0.0)
    state = policy.start(1.0, clock=lambda: now[0])
    assert state.next_delay(grpc.StatusCode.UNAVAILABLE) == pytest.approx(0.4)
    now[0] = 0.7  # 0.3 s left: a 0.4 s wait would end past the deadline
    assert state.next_delay(grpc.StatusCode.UNAVAILABLE) is None
    assert state.attempts == 2
    other = policy.start(None)
    assert other.next_delay(grpc.StatusCode.INVALID_ARGUMENT) is None  # not retryable


# ----------------------------------------------------------------------- sync client


def test_unavailable_is_retried_with_backoff_then_succeeds(server: ServerThread) -> None:
    server.servicer.fail_unavailable = 2
    with FashionClient(server.address, GOOD_KEY, retry_policy=FAST_RETRY) as client:
        start = time.monotonic()
        result = client.analyze(png(64, 48))
        elapsed = time.monotonic() - start
    assert (result.width, result.height) == (64, 48)
    assert server.servicer.attempts == 3
    gaps = [
        b - a
        for a, b in zip(
            server.servicer.attempt_times, server.servicer.attempt_times[1:], strict=False
        )
    ]
    # Waits of [0.1, 0.2] then [0.2, 0.4] seconds: exponential, jittered.
    assert 0.1 <= gaps[0] <= 0.2 + 0.25
    assert 0.2 <= gaps[1] <= 0.4 + 0.25
    assert elapsed < 2.0


def test_retries_stop_at_the_deadline(server: ServerThread) -> None:
    server.servicer.fail_unavailable = 1000
    policy = RetryPolicy(max_attempts=100, initial_backoff=0.3, max_backoff=0.3, jitter=0.0)
    with FashionClient(server.address, GOOD_KEY, retry_policy=policy, timeout=1.0) as client:
        start = time.monotonic()
        with pytest.raises(FashionServeError) as info:
            client.analyze(png(8, 8))
        elapsed = time.monotonic() - start
    assert info.value.code_name == "UNAVAILABLE"
    assert info.value.attempts == server.servicer.attempts >= 3
    assert elapsed < 1.3


def test_slow_call_fails_at_its_deadline(server: ServerThread) -> None:
    server.servicer.delay = 5.0
    with FashionClient(server.address, GOOD_KEY) as client:
        start = time.monotonic()
        with pytest.raises(FashionServeError) as info:
            client.analyze(png(8, 8), timeout=0.5)
        elapsed = time.monotonic() - start
    assert info.value.code_name == "DEADLINE_EXCEEDED"
    assert 0.4 < elapsed < 1.5


def test_refused_key_raises_code_reason_and_metadata_without_retry(server: ServerThread) -> None:
    with (
        FashionClient(server.address, "dev.wrong", retry_policy=FAST_RETRY) as client,
        pytest.raises(FashionServeError) as info,
    ):
        client.analyze(png(8, 8))
    err = info.value
    assert err.code is grpc.StatusCode.UNAUTHENTICATED
    assert err.reason == "API_KEY_INVALID"
    assert err.domain == "fashionserve"
    assert err.metadata == {"keyId": "dev"}
    assert err.message == "the API key is not valid"
    assert err.attempts == 1 and server.servicer.attempts == 1
    assert str(err) == "UNAUTHENTICATED (API_KEY_INVALID): the API key is not valid"
    assert server.servicer.keys_seen == ["dev.wrong"]


def test_unreachable_gateway_is_unavailable_without_reason() -> None:
    with (
        FashionClient("127.0.0.1:1", retry_policy=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(FashionServeError) as info,
    ):
        client.get_taxonomy(timeout=5)
    assert info.value.code_name == "UNAVAILABLE"
    assert info.value.reason == ""


def test_large_images_pass_the_raised_message_limits(server: ServerThread) -> None:
    blob = b"SIZE:" + bytes(8 * MIB)  # twice gRPC's 4 MiB default
    with FashionClient(server.address, GOOD_KEY) as client:
        assert client.analyze(blob).width == len(blob)


def test_batch_stream_taxonomy_and_options(server: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png(30, 40))
    with FashionClient(server.address, GOOD_KEY) as client:
        opts = AnalyzeOptions(min_score=0.5, max_garments=3, include_embeddings=True)
        client.analyze(path, opts)
        sent = server.servicer.options_seen[-1]
        assert (sent.min_score, sent.max_garments, sent.include_embeddings) == (0.5, 3, True)

        entries = client.batch_analyze([png(10, 10), b"not an image", path])
        assert [e.ok for e in entries] == [True, False, True]
        assert entries[0].unwrap().width == 10 and entries[2].unwrap().height == 40
        assert entries[1].error is not None and entries[1].error.reason == "IMAGE_DECODE_FAILED"

        stream = client.stream_analyze(
            [StreamRequest("x", png(5, 6)), ("y", png(7, 8)), ("z", path)]
        )
        got = {e.request_id: e.unwrap().width for e in stream}
        assert got == {"x": 5, "y": 7, "z": 30}

        taxonomy = client.get_taxonomy()
        assert taxonomy.roots == ("top",)
        assert taxonomy.tag_groups[0].applies_to == ("top",)
    assert set(server.servicer.keys_seen) == {GOOD_KEY}


def test_stream_refused_raises(server: ServerThread) -> None:
    with (
        FashionClient(server.address, None) as client,
        pytest.raises(FashionServeError) as info,
    ):
        list(client.stream_analyze([("a", png(4, 4))]))
    assert info.value.code_name == "UNAUTHENTICATED"
    assert server.servicer.keys_seen == [None]


# ---------------------------------------------------------------------- asyncio client


def test_async_client_retries_and_returns_the_same_types(server: ServerThread) -> None:
    server.servicer.fail_unavailable = 2

    async def scenario() -> dict[str, Any]:
        async with AsyncFashionClient(server.address, GOOD_KEY, retry_policy=FAST_RETRY) as client:
            single = await client.analyze(png(12, 13))
            batch = await client.batch_analyze([png(1, 2), b"junk"])

            async def requests() -> AsyncIterator[tuple[str, bytes]]:
                for i in range(5):
                    yield (f"r{i}", png(i + 1, 1))

            streamed = {
                e.request_id: e.unwrap().width async for e in client.stream_analyze(requests())
            }
            info = await client.get_serving_info()
            with pytest.raises(FashionServeError) as slow:
                server.servicer.delay = 5.0
                await client.analyze(png(2, 2), timeout=0.3)
            return {
                "single": (single.width, single.height),
                "batch": [e.ok for e in batch],
                "streamed": streamed,
                "per_batch": info.limits.max_images_per_batch,
                "slow": slow.value.code_name,
            }

    out = asyncio.run(scenario())
    assert out == {
        "single": (12, 13),
        "batch": [True, False],
        "streamed": {f"r{i}": i + 1 for i in range(5)},
        "per_batch": 2,
        "slow": "DEADLINE_EXCEEDED",
    }
    assert server.servicer.attempts == 4  # 2 refused + 1 served + 1 slow


def test_async_client_refused_key() -> None:
    async def scenario(address: str) -> FashionServeError:
        async with AsyncFashionClient(address, "dev.nope") as client:
            try:
                await client.get_serving_info()
            except FashionServeError as err:
                return err
        raise AssertionError("the call should have failed")

    with ServerThread(StandIn()) as s:
        err = asyncio.run(scenario(s.address))
    assert (err.code_name, err.reason, err.metadata) == (
        "UNAUTHENTICATED",
        "API_KEY_INVALID",
        {"keyId": "dev"},
    )


# ------------------------------------------------------------------ fashionserve analyze


def _images(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(png(100 + i, 80))
        paths.append(str(p))
    return paths


def test_analyze_cli_table_json_and_drawing(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _images(tmp_path, 3)
    common = ["analyze", *paths, "--gateway", server.address, "--api-key", GOOD_KEY]

    assert fashionserve_main(common) == 0
    table = capsys.readouterr().out
    assert "top 0.97 > shirt 0.88" in table
    assert "colour: red 0.90; details: buttons 0.80, pockets 0.60" in table
    assert table.count("img") == 3  # one garment per image
    # Three images, at most two per call: chunked by the served max_images_per_batch.
    assert server.servicer.batch_sizes == [2, 1]

    out_dir = tmp_path / "drawn"
    assert fashionserve_main([*common, "--json", "--draw", str(out_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [i["width"] for i in doc["images"]] == [100, 101, 102]
    assert doc["images"][0]["garments"][0]["category_path"][-1]["name"] == "shirt"
    drawn = sorted(out_dir.iterdir())
    assert [p.name for p in drawn] == ["img0.png", "img1.png", "img2.png"]
    with Image.open(drawn[0]) as img:
        assert img.size == (100, 80)
        # The box outline (x=10) is drawn in the first palette colour, not the red fill.
        assert img.getpixel((10, 50)) != img.getpixel((50, 50))


def test_analyze_cli_refused_key_exits_nonzero_with_code_and_reason(
    server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Address and key from the environment, as documented.
    monkeypatch.setenv("FASHIONSERVE_GATEWAY", server.address)
    monkeypatch.setenv("FASHIONSERVE_API_KEY", "dev.wrong")
    assert fashionserve_main(["analyze", *_images(tmp_path, 1)]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "API_KEY_INVALID" in err
    assert server.servicer.keys_seen == ["dev.wrong"]


def test_analyze_cli_reports_a_bad_image_and_exits_nonzero(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    args = ["analyze", *_images(tmp_path, 1), str(bad), "--gateway", server.address]
    assert fashionserve_main([*args, "--api-key", GOOD_KEY]) == 1
    out = capsys.readouterr().out
    assert "bad.jpg: error: INVALID_ARGUMENT (IMAGE_DECODE_FAILED)" in out
    assert "shirt" in out  # the good image is still reported


def test_analyze_cli_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fashionserve_main(["analyze", str(tmp_path / "missing.jpg")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ------------------------------------------------------------------ channel security
REMOTE = "192.0.2.7:50051"
"""A documentation address (TEST-NET-1): the refusals come before any connection."""


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LOCALHOST:1", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:50051", True),
        ("unix:/run/fashionserve.sock", True),
        (REMOTE, False),
        ("gateway.fashion.svc:50051", False),
        ("dns:///gateway:50051", False),
        ("[2001:db8::1]:50051", False),
        ("localhost.evil.example:50051", False),
        ("0.0.0.0:50051", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_credentials_go_in_plaintext_only_to_a_loopback_address() -> None:
    with pytest.raises(ClientSetupError, match=REMOTE) as info:
        FashionClient(REMOTE, GOOD_KEY)
    assert "allow_plaintext_credentials=True" in str(info.value)
    with pytest.raises(ClientSetupError, match=REMOTE):
        FashionClient(REMOTE, bearer_token="a.b.c")
    FashionClient(REMOTE, GOOD_KEY, allow_plaintext_credentials=True).close()
    FashionClient(REMOTE).close()  # nothing secret to send
    FashionClient(REMOTE, GOOD_KEY, tls=True).close()
    for local in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        FashionClient(local, GOOD_KEY).close()

    async def run() -> None:
        with pytest.raises(ClientSetupError, match=REMOTE):
            AsyncFashionClient(REMOTE, GOOD_KEY)
        await AsyncFashionClient(REMOTE, GOOD_KEY, allow_plaintext_credentials=True).close()

    asyncio.run(run())


def test_tls_files_are_checked_when_the_client_is_made(tmp_path: Path) -> None:
    with pytest.raises(ClientSetupError, match="go together"):
        FashionClient("127.0.0.1:1", cert_file=tmp_path / "client.pem")
    with pytest.raises(ClientSetupError, match="cannot read the CA file"):
        FashionClient("127.0.0.1:1", ca_file=tmp_path / "missing.pem")


def test_every_command_that_calls_the_gateway_refuses_plaintext_credentials_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = _images(tmp_path, 1)
    remote = ["--gateway", REMOTE, "--api-key", GOOD_KEY]
    batch = ["--input", str(tmp_path), "--output", str(tmp_path / "out")]
    commands = {
        "analyze": (["analyze", *images, *remote], 2),
        "evaluate": (["evaluate", "--data", str(tmp_path), *remote], 1),
        "batch run": (["batch", "run", *batch, *remote], 1),
        "loadtest run": (["loadtest", "run", "--address", REMOTE, "--api-key", GOOD_KEY], 2),
    }
    for name, (argv, status) in commands.items():
        assert fashionserve_main(argv) == status, name
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: refusing to send an API key or token in plaintext to {REMOTE}"
        )
        assert "--insecure-plaintext" in err and "--tls" in err, name
