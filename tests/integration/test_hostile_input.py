"""A corpus of malformed and hostile inputs, each sent to a real gateway process over a real
socket in front of a real Triton (the conftest's oracle models, whose detector finds
pure-colour rectangles exactly, so a correct result can be checked to the pixel).

Every case names its expected outcome: the documented refusal (status code, ErrorInfo
reason, and the metadata naming the limit where there is one), or a correct result. Each
image is sent twice: alone with Analyze, and inside a BatchAnalyze beside a good image
(the same refusal must come back as that entry's error, and the good image is analysed).
After every case a normal image must still be analysed: nothing a caller sends breaks the
gateway or Triton for the next caller.

The inputs are built in code at test time from small drawings: no binary files.
"""

from __future__ import annotations

import io
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import (
    LIMITS,
    SERVICE,
    Gateway,
    Oracle,
    corrupt_png_that_passes_the_header_checks,
    encode,
    start_gateway,
)
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import Image

from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.triton import TritonServer

ORACLE = Oracle()
# The good image sent after every case: two garments the oracle finds exactly.
GOOD_W, GOOD_H = 320, 240
GOOD_RECTS = [((20, 30, 120, 200), 0), ((160, 50, 300, 150), 2)]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# What the streaming cases run with (a gateway of their own, limits small enough to reach).
STREAM_LIMITS = {
    "max_stream_requests": 10,
    "max_stream_duration_seconds": 1.0,
    "max_concurrent_rpcs": 1,
}


# ---------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Outcome:
    """What came back: a result, or a status (from the call or an ItemError)."""

    code: grpc.StatusCode
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    message: str = ""
    result: pb.ImageResult | None = None


def _from_rpc_error(err: grpc.RpcError) -> Outcome:
    status = rpc_status.from_call(err)
    if status is None:  # refused by gRPC itself (message size): no ErrorInfo
        return Outcome(err.code(), message=err.details() or "")
    assert len(status.details) == 1, "exactly one ErrorInfo"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "fashionserve"
    return Outcome(err.code(), info.reason, dict(info.metadata), status.message)


def _from_item(error: pb.ItemError) -> Outcome:
    code = next(c for c in grpc.StatusCode if c.value[0] == error.code)
    return Outcome(code, error.reason, dict(error.metadata), error.message)


def analyze(gw: Gateway, data: bytes, **options: Any) -> Outcome:
    try:
        return Outcome(grpc.StatusCode.OK, result=gw.analyze(data, **options))
    except grpc.RpcError as err:
        return _from_rpc_error(err)


def batch(gw: Gateway, images: list[bytes], **options: Any) -> list[Outcome] | Outcome:
    """One outcome per entry, or the call's own outcome when the call itself failed."""
    request = pb.BatchAnalyzeRequest(
        images=[pb.Image(data=d) for d in images], options=pb.AnalyzeOptions(**options)
    )
    try:
        reply = gw.stub.BatchAnalyze(request, metadata=gw.auth, timeout=60)
    except grpc.RpcError as err:
        return _from_rpc_error(err)
    return [
        _from_item(e.error)
        if e.WhichOneof("outcome") == "error"
        else Outcome(grpc.StatusCode.OK, result=e.result)
        for e in reply.entries
    ]


def failed_call(outcome: list[Outcome] | Outcome) -> Outcome:
    """The outcome of a batch call expected to fail as a whole."""
    assert isinstance(outcome, Outcome), f"the call succeeded: {outcome}"
    return outcome


def stream(
    gw: Gateway, requests: Iterator[pb.StreamAnalyzeRequest]
) -> tuple[dict[str, Outcome], Outcome]:
    """The answers by request id, and how the call ended."""
    answers: dict[str, Outcome] = {}
    try:
        for r in gw.stub.StreamAnalyze(requests, metadata=gw.auth, timeout=60):
            answers[r.request_id] = (
                _from_item(r.error)
                if r.WhichOneof("outcome") == "error"
                else Outcome(grpc.StatusCode.OK, result=r.result)
            )
    except grpc.RpcError as err:
        return answers, _from_rpc_error(err)
    return answers, Outcome(grpc.StatusCode.OK)


# ---------------------------------------------------------------------- expectations
@dataclass(frozen=True)
class Refused:
    """The documented error: code, reason, and metadata keys naming the limit or option."""

    code: grpc.StatusCode
    reason: str
    metadata: Mapping[str, str | None] = field(default_factory=dict)  # None: key present

    def check(self, got: Outcome) -> None:
        assert (got.code, got.reason) == (self.code, self.reason), got
        assert got.message, "a message says what was wrong"
        for key, value in self.metadata.items():
            assert key in got.metadata, (key, got)
            if value is not None:
                assert got.metadata[key] == value, (key, got)


Rect = tuple[tuple[int, int, int, int], int]


@dataclass(frozen=True)
class Analysed:
    """A correct result: the image size after EXIF rotation, and the garments the oracle
    must find (box within ``tolerance`` pixels, in score order)."""

    width: int
    height: int
    rects: list[Rect]
    tolerance: float = 4.0

    def check(self, got: Outcome) -> None:
        assert got.code == grpc.StatusCode.OK and got.result is not None, got
        result = got.result
        assert (result.width, result.height) == (self.width, self.height)
        expected = sorted(self.rects, key=lambda r: r[1])  # colour 0 scores highest
        assert len(result.garments) == len(expected), result
        for garment, ((x1, y1, x2, y2), colour) in zip(result.garments, expected, strict=True):
            assert garment.detector_score == pytest.approx(ORACLE.score(colour), abs=1e-3)
            box = garment.box
            assert (box.x_min, box.y_min, box.x_max, box.y_max) == pytest.approx(
                (x1, y1, x2, y2), abs=self.tolerance
            )


Expectation = Refused | Analysed


# ---------------------------------------------------------------------- image builders
def drawing(width: int, height: int, rects: list[Rect]) -> np.ndarray:
    image = np.full((height, width, 3), 255, np.uint8)
    for (x1, y1, x2, y2), colour in rects:
        image[y1:y2, x1:x2] = ORACLE.colours[colour]
    return image


SCENE_RECTS: list[Rect] = [((40, 30, 160, 200), 0), ((200, 60, 380, 180), 2)]


def scene(fmt: str = "JPEG", **kw: Any) -> bytes:
    return encode(drawing(400, 240, SCENE_RECTS), fmt, **({"quality": 95} | kw))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_size(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR (CRC fixed up) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (200, 10, 10)), "PNG"))
    ihdr = bytes(data[16:29])
    body = struct.pack(">II", width, height) + ihdr[8:]
    data[8:33] = png_chunk(b"IHDR", body)
    return bytes(data)


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 10)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_with_canvas(width: int, height: int) -> bytes:
    """A lossless 8x8 WebP wrapped in a VP8X header that declares a bigger canvas."""
    small = encode(Image.new("RGB", (8, 8), (10, 10, 200)), "WEBP", lossless=True)
    vp8l = small[12:]  # the image chunk after "RIFF" size "WEBP"
    vp8x = riff_chunk(b"VP8X", b"\x00\x00\x00\x00" + _u24(width - 1) + _u24(height - 1))
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    """A RIFF chunk (little-endian size, padded to even)."""
    return kind + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")


def _u24(value: int) -> bytes:
    return value.to_bytes(3, "little")


def decompression_bomb() -> bytes:
    """100 megapixels of one colour: about 12 KiB of PNG."""
    return encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=True)


def png_text_bomb() -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to 64 MiB."""
    data = bytearray(scene("PNG"))
    bomb = zlib.compress(b"\x00" * (64 * 1024 * 1024), 9)
    chunk = png_chunk(b"zTXt", b"comment\x00\x00" + bomb)
    at = data.index(b"IDAT") - 4
    return bytes(data[:at] + chunk + data[at:])


def jpeg_scan_bomb() -> bytes:
    """A progressive JPEG followed by 80,000 nearly empty scans (880 KB). Each scan is a
    pass over the whole image: PIL takes 30 s on one such file of 2000 x 2000 pixels."""
    data = scene("JPEG", progressive=True)
    sos = data.rindex(b"\xff\xda")
    header = data[sos : sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]
    return data[:-2] + (header + b"\x00") * 80_000 + b"\xff\xd9"


def png_chunk_spam() -> bytes:
    """A valid PNG with 80,000 empty private chunks (960 KB) before its image data."""
    data = scene("PNG")
    at = data.index(b"IDAT") - 4
    return data[:at] + png_chunk(b"prVt", b"") * 80_000 + data[at:]


def animated(fmt: str) -> bytes:
    """Two frames: the first has SCENE_RECTS, the second a different garment."""
    first = Image.fromarray(drawing(400, 240, SCENE_RECTS))
    second = Image.fromarray(drawing(400, 240, [((10, 10, 100, 100), 1)]))
    options: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    buf = io.BytesIO()
    first.save(buf, fmt, save_all=True, append_images=[second], duration=100, **options)
    return buf.getvalue()


def sixteen_bit_png() -> bytes:
    """Greyscale, 16 bits per sample: a dark rectangle (the oracle's colour 3) on white."""
    grey = np.full((240, 400), 65535, np.uint16)
    grey[50:150, 60:300] = 25 * 257
    image = Image.fromarray(grey)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def rgb16_png(rgb: np.ndarray) -> bytes:
    """An RGB PNG with 16 bits per sample, written by hand (PIL cannot write one)."""
    height, width = rgb.shape[:2]
    wide = (rgb.astype(">u2") * 257).reshape(height, width * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in wide)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def cmyk_jpeg() -> bytes:
    return encode(
        Image.fromarray(drawing(400, 240, SCENE_RECTS)).convert("CMYK"), "JPEG", quality=95
    )


def exif_rotated_jpeg() -> bytes:
    """Stored turned 90 degrees with EXIF orientation 6, as a phone held upright writes it."""
    return ORACLE.scene(400, 240, SCENE_RECTS, "JPEG", rotated=True)


def broken_crc_png() -> bytes:
    data = bytearray(scene("PNG"))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(side)
    return encode((rng.random((side, side, 3)) * 255).astype(np.uint8), "PNG")


# ---------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class ImageCase:
    """An image sent with Analyze (and inside a batch), with its expected outcome."""

    build: Callable[[], bytes]
    expect: Expectation
    options: dict[str, Any] = field(default_factory=dict)


SCENE_RESULT = Analysed(400, 240, SCENE_RECTS)
# The 16-bit image's dark rectangle is the oracle's colour 3.
GREY_RESULT = Analysed(400, 240, [((60, 50, 300, 150), 3)])
MAX_PIXELS = str(LIMITS["max_image_pixels"])


PIXELS_REFUSED = Refused(INVALID, "TOO_MANY_PIXELS", {"maxImagePixels": MAX_PIXELS})


IMAGE_CASES: dict[str, ImageCase] = {
    # Not an image at all.
    "zero-byte file": ImageCase(lambda: b"", Refused(INVALID, "EMPTY_IMAGE")),
    "text": ImageCase(
        lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Refused(INVALID, "NOT_AN_IMAGE", {"acceptedFormats": "JPEG,PNG,WEBP"}),
    ),
    "wrong magic number": ImageCase(
        lambda: b"\x88" + scene("PNG")[1:], Refused(INVALID, "NOT_AN_IMAGE")
    ),
    "one byte": ImageCase(lambda: b"\xff", Refused(INVALID, "NOT_AN_IMAGE")),
    "JPEG magic only": ImageCase(lambda: b"\xff\xd8\xff", Refused(INVALID, "CORRUPT_IMAGE")),
    "PNG signature only": ImageCase(
        lambda: b"\x89PNG\r\n\x1a\n", Refused(INVALID, "CORRUPT_IMAGE")
    ),
    "RIFF WEBP header only": ImageCase(
        lambda: b"RIFF\x04\x00\x00\x00WEBP", Refused(INVALID, "CORRUPT_IMAGE")
    ),
    # Formats the pipeline does not decode: named, refused before any parser runs.
    "animated GIF": ImageCase(
        lambda: animated("GIF"), Refused(INVALID, "UNSUPPORTED_FORMAT", {"format": "GIF"})
    ),
    "BMP": ImageCase(
        lambda: encode(Image.new("RGB", (32, 32)), "BMP"),
        Refused(INVALID, "UNSUPPORTED_FORMAT", {"format": "BMP"}),
    ),
    "TIFF": ImageCase(
        lambda: encode(Image.new("RGB", (32, 32)), "TIFF"),
        Refused(INVALID, "UNSUPPORTED_FORMAT", {"format": "TIFF"}),
    ),
    "SVG": ImageCase(
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        Refused(INVALID, "UNSUPPORTED_FORMAT", {"format": "SVG"}),
    ),
    "HEIF brand": ImageCase(
        lambda: b"\x00\x00\x00\x18ftypheic" + b"\x00" * 16,
        Refused(INVALID, "UNSUPPORTED_FORMAT", {"format": "HEIF"}),
    ),
    "PDF": ImageCase(
        lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", Refused(INVALID, "UNSUPPORTED_FORMAT")
    ),
    # Truncated and corrupt files.
    "truncated JPEG": ImageCase(
        lambda: scene("JPEG")[: len(scene("JPEG")) * 2 // 3], Refused(INVALID, "CORRUPT_IMAGE")
    ),
    "truncated PNG": ImageCase(
        lambda: scene("PNG")[: len(scene("PNG")) // 2], Refused(INVALID, "CORRUPT_IMAGE")
    ),
    "truncated WebP": ImageCase(
        lambda: scene("WEBP")[: len(scene("WEBP")) // 2],
        Refused(INVALID, "CORRUPT_IMAGE", {"format": "WEBP"}),
    ),
    "PNG with a broken header CRC": ImageCase(broken_crc_png, Refused(INVALID, "CORRUPT_IMAGE")),
    "PNG with garbage in its pixel data": ImageCase(
        corrupt_png_that_passes_the_header_checks, Refused(INVALID, "CORRUPT_IMAGE")
    ),
    "PNG header declaring a zero width": ImageCase(
        lambda: png_with_size(0, 100), Refused(INVALID, "CORRUPT_IMAGE")
    ),
    # Sizes: bytes, pixels, decompression bombs, headers that lie.
    "over the byte limit": ImageCase(
        lambda: noise_png(700),
        Refused(
            INVALID,
            "IMAGE_TOO_LARGE",
            {"maxImageBytes": str(LIMITS["max_image_bytes"]), "imageBytes": None},
        ),
    ),
    "over the pixel limit": ImageCase(
        lambda: encode(Image.new("L", (3000, 2000)), "PNG"),
        Refused(INVALID, "TOO_MANY_PIXELS", {"width": "3000", "height": "2000"}),
    ),
    "decompression bomb (100 megapixels in 12 KiB)": ImageCase(decompression_bomb, PIXELS_REFUSED),
    "PNG header claiming 2^31-1 x 2^31-1": ImageCase(
        lambda: png_with_size(2**31 - 1, 2**31 - 1), PIXELS_REFUSED
    ),
    "JPEG header claiming 65535 x 65535": ImageCase(
        lambda: jpeg_with_size(65535, 65535), PIXELS_REFUSED
    ),
    "WebP canvas claiming 16384 x 16384": ImageCase(
        lambda: webp_with_canvas(16384, 16384), PIXELS_REFUSED
    ),
    "JPEG scan bomb (80,000 empty scans)": ImageCase(
        jpeg_scan_bomb, Refused(INVALID, "TOO_MANY_SCANS", {"maxJpegScans": "100", "scans": None})
    ),
    "PNG of 80,000 empty chunks": ImageCase(
        png_chunk_spam, Refused(INVALID, "TOO_MANY_CHUNKS", {"maxPngChunks": "10000"})
    ),
    # Inflated no further than max_png_metadata_bytes (4 MiB), before PIL sees it.
    "PNG text chunk inflating to 64 MiB": ImageCase(
        png_text_bomb,
        Refused(
            INVALID, "METADATA_TOO_LARGE", {"format": "PNG", "maxPngMetadataBytes": str(4 * 2**20)}
        ),
    ),
    # Unusual but valid images: analysed correctly.
    "CMYK JPEG": ImageCase(cmyk_jpeg, Analysed(400, 240, SCENE_RECTS, tolerance=6)),
    "16-bit greyscale PNG": ImageCase(sixteen_bit_png, GREY_RESULT),
    "16-bit RGB PNG": ImageCase(lambda: rgb16_png(drawing(400, 240, SCENE_RECTS)), SCENE_RESULT),
    "EXIF-rotated photo (orientation 6)": ImageCase(exif_rotated_jpeg, SCENE_RESULT),
    "animated PNG: the first frame is analysed": ImageCase(lambda: animated("PNG"), SCENE_RESULT),
    "animated WebP: the first frame is analysed": ImageCase(lambda: animated("WEBP"), SCENE_RESULT),
    "palette PNG with transparency": ImageCase(
        lambda: encode(
            Image.fromarray(drawing(400, 240, SCENE_RECTS)).convert("P"),
            "PNG",
            transparency=0,
        ),
        SCENE_RESULT,
    ),
    "progressive JPEG": ImageCase(lambda: scene("JPEG", progressive=True), SCENE_RESULT),
    "JPEG with data after its end marker": ImageCase(
        lambda: scene("JPEG") + b"\x00trailing preview data" * 100, SCENE_RESULT
    ),
    "1 x 1 pixel": ImageCase(
        lambda: encode(Image.new("RGB", (1, 1), (255, 255, 255)), "PNG"), Analysed(1, 1, [])
    ),
    "4,000,000 x 1 strip at the pixel limit": ImageCase(
        lambda: encode(Image.new("1", (4_000_000, 1), 1), "PNG"), Analysed(4_000_000, 1, [])
    ),
    "1 x 4,000,000 strip at the pixel limit": ImageCase(
        lambda: encode(Image.new("1", (1, 4_000_000), 1), "PNG"), Analysed(1, 4_000_000, [])
    ),
    # Options out of range.
    "min_score above 1": ImageCase(
        scene, Refused(INVALID, "INVALID_OPTION", {"option": "minScore"}), {"min_score": 1.5}
    ),
    "negative min_score": ImageCase(
        scene, Refused(INVALID, "INVALID_OPTION", {"option": "minScore"}), {"min_score": -0.1}
    ),
    "min_score NaN": ImageCase(
        scene, Refused(INVALID, "INVALID_OPTION", {"option": "minScore"}), {"min_score": math.nan}
    ),
    "min_score infinite": ImageCase(
        scene, Refused(INVALID, "INVALID_OPTION", {"option": "minScore"}), {"min_score": math.inf}
    ),
    "max_garments over the served cap": ImageCase(
        scene,
        Refused(INVALID, "INVALID_OPTION", {"option": "maxGarments", "max": "16"}),
        {"max_garments": 17},
    ),
    "max_garments 2^32-1": ImageCase(
        scene,
        Refused(INVALID, "INVALID_OPTION", {"option": "maxGarments"}),
        {"max_garments": 2**32 - 1},
    ),
}


@pytest.fixture(scope="module")
def good() -> bytes:
    return ORACLE.scene(GOOD_W, GOOD_H, GOOD_RECTS, "PNG")


def assert_still_serving(gw: Gateway, good: bytes) -> None:
    Analysed(GOOD_W, GOOD_H, GOOD_RECTS).check(analyze(gw, good))
    assert gw.process.poll() is None


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image_case(gw: Gateway, good: bytes, name: str) -> None:
    case = IMAGE_CASES[name]
    data = case.build()
    case.expect.check(analyze(gw, data, **case.options))
    # The same inside a batch: only its own entry is affected (options apply to the call).
    outcome = batch(gw, [good, data], **case.options)
    if isinstance(case.expect, Refused) and case.expect.reason == "INVALID_OPTION":
        case.expect.check(failed_call(outcome))
    else:
        assert isinstance(outcome, list), outcome
        Analysed(GOOD_W, GOOD_H, GOOD_RECTS).check(outcome[0])
        case.expect.check(outcome[1])
    assert_still_serving(gw, good)


# ---------------------------------------------------------------------- request-level cases
def test_message_over_the_size_limit(gw: Gateway, good: bytes) -> None:
    """Refused by gRPC itself (max_message_bytes) before a byte reaches the gateway's code."""
    outcome = analyze(gw, b"\xff\xd8\xff" + bytes(3 * 1024 * 1024))
    assert outcome.code == EXHAUSTED, outcome
    assert_still_serving(gw, good)


def test_batch_with_no_image(gw: Gateway, good: bytes) -> None:
    Refused(INVALID, "NO_IMAGES").check(failed_call(batch(gw, [])))
    assert_still_serving(gw, good)


def test_batch_with_too_many_images(gw: Gateway, good: bytes) -> None:
    count = LIMITS["max_images_per_batch_request"] + 1
    outcome = batch(gw, [good] * count)
    expected = {"imageCount": str(count), "maxImagesPerBatch": str(count - 1)}
    Refused(INVALID, "TOO_MANY_IMAGES", expected).check(failed_call(outcome))
    assert_still_serving(gw, good)


def test_batch_of_a_million_empty_images(gw: Gateway, good: bytes) -> None:
    """Two bytes per image: a message within the size limit holds a million of them.
    Refused by their count (checked before any image is copied out of the message)."""
    request = pb.BatchAnalyzeRequest(images=[pb.Image()] * 1_000_000)
    with pytest.raises(grpc.RpcError) as info:
        gw.stub.BatchAnalyze(request, metadata=gw.auth, timeout=30)
    Refused(INVALID, "TOO_MANY_IMAGES", {"imageCount": "1000000"}).check(
        _from_rpc_error(info.value)
    )
    assert_still_serving(gw, good)


def _truncated_request(good: bytes) -> bytes:
    data = pb.AnalyzeRequest(image=pb.Image(data=good)).SerializeToString()
    return data[: len(data) // 2]  # the image field announces more bytes than follow


@pytest.mark.parametrize(
    ("method", "build"),
    [
        ("Analyze", lambda good: b"\xff\xff\xff\xff"),
        ("Analyze", _truncated_request),
        ("BatchAnalyze", lambda good: b"\x0a\x05\x0a\x03abc\x12\x01"),
        ("BatchAnalyze", lambda good: b"\x08" + b"\xff" * 11),  # an over-long varint
    ],
    ids=["garbage", "truncated message", "field overrunning its parent", "over-long varint"],
)
def test_malformed_request_message(
    gw: Gateway, good: bytes, method: str, build: Callable[[bytes], bytes]
) -> None:
    """Bytes that do not parse as the request message: INVALID_ARGUMENT naming the message
    type (gRPC alone would answer UNKNOWN, quoting the parser's exception)."""
    call = gw.channel.unary_unary(f"/{SERVICE}/{method}")  # raw bytes, no serializer
    with pytest.raises(grpc.RpcError) as info:
        call(build(good), metadata=gw.auth, timeout=30)
    expected = {"messageType": f"fashion.v1.{method}Request"}
    Refused(INVALID, "MALFORMED_REQUEST", expected).check(_from_rpc_error(info.value))
    assert_still_serving(gw, good)


def test_malformed_message_inside_a_stream(gw: Gateway, good: bytes) -> None:
    """A request_id that is not UTF-8 (proto3 strings must be): the stream ends with
    INVALID_ARGUMENT, not INTERNAL."""
    call = gw.channel.stream_stream(f"/{SERVICE}/StreamAnalyze")
    good_request = pb.StreamAnalyzeRequest(request_id="a", image=pb.Image(data=good))
    bad_request = b"\x0a\x02\xff\xfe"
    with pytest.raises(grpc.RpcError) as info:
        for _ in call(iter([good_request.SerializeToString(), bad_request]), metadata=gw.auth):
            pass
    expected = {"messageType": "fashion.v1.StreamAnalyzeRequest"}
    Refused(INVALID, "MALFORMED_REQUEST", expected).check(_from_rpc_error(info.value))
    assert_still_serving(gw, good)


def test_stream_request_id_over_128_characters(gw: Gateway, good: bytes) -> None:
    requests = [
        pb.StreamAnalyzeRequest(request_id="x" * 129, image=pb.Image(data=good)),
        pb.StreamAnalyzeRequest(request_id="ok", image=pb.Image(data=good)),
    ]
    answers, end = stream(gw, iter(requests))
    assert end.code == grpc.StatusCode.OK
    Refused(INVALID, "INVALID_REQUEST_ID", {"maxChars": "128"}).check(answers["x" * 129])
    Analysed(GOOD_W, GOOD_H, GOOD_RECTS).check(answers["ok"])


def test_oversized_request_id_header_is_replaced(gw: Gateway, good: bytes) -> None:
    """x-request-id only names the call in logs: one too long is replaced, not an error."""
    request = pb.AnalyzeRequest(image=pb.Image(data=good))
    reply = gw.stub.Analyze(request, metadata=(*gw.auth, ("x-request-id", "r" * 4000)), timeout=30)
    assert len(reply.result.garments) == 2


def test_oversized_metadata_is_refused_by_grpc(gw: Gateway, good: bytes) -> None:
    request = pb.AnalyzeRequest(image=pb.Image(data=good))
    with pytest.raises(grpc.RpcError) as info:
        gw.stub.Analyze(request, metadata=(*gw.auth, ("x-junk", "j" * 64_000)), timeout=30)
    assert info.value.code() == EXHAUSTED, info.value
    assert_still_serving(gw, good)


# ---------------------------------------------------------------------- stream length
@pytest.fixture(scope="module")
def stream_gw(
    own_triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway whose streams may carry 10 requests and last 1 s, serving one call at a
    time (so a stream that outlived its limit would show: the next call is refused)."""
    gateway = start_gateway(
        own_triton.grpc_url, tmp_path_factory.mktemp("stream-gw"), **STREAM_LIMITS
    )
    try:
        gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
        yield gateway
    finally:
        gateway.stop()


def test_stream_over_the_request_limit_ends_after_answering_what_it_read(
    stream_gw: Gateway, good: bytes
) -> None:
    limit = STREAM_LIMITS["max_stream_requests"]
    requests = (
        pb.StreamAnalyzeRequest(request_id=str(i), image=pb.Image(data=good)) for i in range(25)
    )
    answers, end = stream(stream_gw, requests)
    Refused(EXHAUSTED, "STREAM_TOO_LONG", {"maxStreamRequests": str(limit)}).check(end)
    assert set(answers) == {str(i) for i in range(int(limit))}
    for outcome in answers.values():
        Analysed(GOOD_W, GOOD_H, GOOD_RECTS).check(outcome)
    assert_still_serving(stream_gw, good)


def test_stream_over_the_duration_limit_ends(stream_gw: Gateway, good: bytes) -> None:
    def slow() -> Iterator[pb.StreamAnalyzeRequest]:
        yield pb.StreamAnalyzeRequest(request_id="first", image=pb.Image(data=good))
        time.sleep(2.5)  # past the 1 s limit: the gateway has stopped reading
        yield pb.StreamAnalyzeRequest(request_id="late", image=pb.Image(data=good))

    started = time.monotonic()
    answers, end = stream(stream_gw, slow())
    Refused(EXHAUSTED, "STREAM_TOO_LONG", {"maxStreamDurationSeconds": "1"}).check(end)
    assert set(answers) == {"first"}
    assert time.monotonic() - started < 2.4  # ended by the gateway, not by the late request
    assert_still_serving(stream_gw, good)


def test_a_caller_that_holds_a_stream_without_reading_cannot_keep_it_open(
    stream_gw: Gateway, good: bytes
) -> None:
    """It sends a few requests, reads nothing and keeps the stream open: the duration limit
    ends the call and frees its slot (this gateway serves one call at a time)."""

    def requests() -> Iterator[pb.StreamAnalyzeRequest]:
        for i in range(5):
            yield pb.StreamAnalyzeRequest(request_id=str(i), image=pb.Image(data=good))
        time.sleep(3)  # holds the stream open, past the 1 s limit

    call = stream_gw.stub.StreamAnalyze(requests(), metadata=stream_gw.auth, timeout=30)
    time.sleep(2.5)  # not reading
    assert_still_serving(stream_gw, good)  # the only call slot is free again
    answered = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in call:
            answered.append(reply.request_id)
    assert sorted(answered) == [str(i) for i in range(5)]
    Refused(EXHAUSTED, "STREAM_TOO_LONG", {"maxStreamDurationSeconds": "1"}).check(
        _from_rpc_error(info.value)
    )
