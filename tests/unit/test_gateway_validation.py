"""What the gateway accepts and refuses before anything reaches Triton, and why."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import struct
import time
import zlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
from PIL import Image

from fashionserve.gateway.failures import InvalidArgument, ResourceExhausted
from fashionserve.gateway.validation import (
    ImageLimits,
    StreamLimit,
    ends_whole,
    inspect_image,
    validate_image_count,
    validate_options,
    validate_request_id,
)

LIMITS = ImageLimits(
    max_image_bytes=2_000_000,
    max_image_pixels=4_000_000,
    max_jpeg_scans=100,
    max_png_chunks=1000,
    max_png_metadata_bytes=100_000,
)


def encode(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", **kw: object) -> bytes:
    rng = np.random.default_rng(0)
    w, h = size
    if mode == "RGB":
        img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
    elif mode == "RGBA":
        img = Image.fromarray((rng.random((h, w, 4)) * 255).astype(np.uint8), "RGBA")
    elif mode == "I;16":
        img = Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16))
    else:
        img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reason(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(InvalidArgument) as info:
        inspect_image(data, limits)
    assert info.value.kind.name == "INVALID_ARGUMENT"
    return info.value.reason


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with a tiny (wrong) IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("fmt", "mode", "kw"),
    [
        ("JPEG", "RGB", {"quality": 90}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {}),
        ("PNG", "I;16", {}),
        ("WEBP", "RGB", {}),
        ("WEBP", "RGBA", {"lossless": True}),
    ],
)
def test_accepted_images_pass_with_their_header_facts(
    fmt: str, mode: str, kw: dict[str, object]
) -> None:
    data = encode(fmt, (64, 48), mode, **kw)
    info = inspect_image(data, LIMITS)
    assert (info.format, info.width, info.height, info.size_bytes) == (fmt, 64, 48, len(data))


def test_jpeg_with_trailing_data_after_eoi_is_accepted() -> None:
    # Some cameras append a preview or a video after the image.
    data = encode("JPEG") + b"trailer" * 100
    assert inspect_image(data, LIMITS).format == "JPEG"


def test_empty_bytes() -> None:
    assert reason(b"") == "EMPTY_IMAGE"


@pytest.mark.parametrize(
    "data", [b"hello, this is not an image", b"\x00" * 100, b'{"json": true}', b"\xff\xd8"]
)
def test_bytes_that_are_not_an_image(data: bytes) -> None:
    assert reason(data) == "NOT_AN_IMAGE"


@pytest.mark.parametrize(
    ("fmt", "name"), [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF"), ("ICO", "ICO")]
)
def test_unsupported_formats_are_named(fmt: str, name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        inspect_image(encode(fmt, (32, 32)), LIMITS)
    assert info.value.reason == "UNSUPPORTED_FORMAT"
    assert info.value.metadata["format"] == name
    assert name in info.value.message and "JPEG" in info.value.message


def test_svg_and_heif_are_named_unsupported() -> None:
    assert reason(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>') == (
        "UNSUPPORTED_FORMAT"
    )
    assert reason(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "UNSUPPORTED_FORMAT"


def test_too_many_bytes() -> None:
    small = dataclasses.replace(LIMITS, max_image_bytes=1000)
    with pytest.raises(InvalidArgument) as info:
        inspect_image(encode("PNG", (64, 64)), small)
    assert info.value.reason == "IMAGE_TOO_LARGE"
    assert info.value.metadata["maxImageBytes"] == "1000"


def test_too_many_pixels_is_refused_from_the_header() -> None:
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")  # 6 MP over a 4 MP limit, a few kB
    data = buf.getvalue()
    with pytest.raises(InvalidArgument) as info:
        inspect_image(data, LIMITS)
    assert info.value.reason == "TOO_MANY_PIXELS"
    assert info.value.metadata["width"] == "3000"
    assert "3000x2000" in info.value.message


def test_decompression_bomb_header_is_refused_without_decoding() -> None:
    # 100k x 100k declared in a file of a few dozen bytes: refused from the header.
    assert reason(png_header_only(100_000, 100_000)) == "TOO_MANY_PIXELS"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_corrupt(fmt: str) -> None:
    data = encode(fmt, (200, 150))
    with pytest.raises(InvalidArgument) as info:
        inspect_image(data[: len(data) * 2 // 3], LIMITS)
    assert info.value.reason == "CORRUPT_IMAGE"
    assert "truncated" in info.value.message


def test_jpeg_cut_just_before_eoi_is_corrupt() -> None:
    assert reason(encode("JPEG", (200, 150))[:-2]) == "CORRUPT_IMAGE"


PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_only_whole_files_count_as_ending_whole(fmt: str) -> None:
    # A JPEG or PNG that does not end whole is decoded at 1/8 scale, or its chunks
    # verified, to tell a cut file from trailing data.
    data = encode(fmt, (200, 150))
    assert ends_whole(data, fmt)
    assert not ends_whole(data[:-20], fmt)
    if fmt != "WEBP":  # data past a WebP's declared size is not read at all
        assert not ends_whole(data + b"trailer" * 100, fmt)


def test_the_end_check_knows_each_format() -> None:
    """Another format's end marker proves nothing: a cut JPEG ending with a PNG's IEND is
    not whole, nor is a PNG ending with a JPEG's EOI."""
    jpeg, png = encode("JPEG", (200, 150)), encode("PNG", (200, 150))
    assert not ends_whole(jpeg[:-100] + PNG_IEND, "JPEG")
    assert not ends_whole(png[:-100] + b"\xff\xd9", "PNG")
    assert ends_whole(jpeg + b"\x00" * 10, "JPEG")  # zero padding after EOI


def test_a_cut_jpeg_ending_with_a_png_end_marker_is_corrupt() -> None:
    data = encode("JPEG", (400, 300), progressive=True)
    assert reason(data[: len(data) // 2] + PNG_IEND) == "CORRUPT_IMAGE"


def test_jpeg_with_garbage_header_is_corrupt() -> None:
    assert reason(b"\xff\xd8\xff" + b"\x00" * 64) == "CORRUPT_IMAGE"


# ------------------------------------------------------------------------ options
def test_zero_options_mean_served_defaults() -> None:
    opts = validate_options(0.0, 0, False, False, max_garments_cap=16)
    assert (opts.min_score, opts.max_garments) == (0.0, 16)


@pytest.mark.parametrize("score", [-0.1, 1.5, float("nan"), float("inf")])
def test_min_score_out_of_range(score: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_options(score, 0, False, False, max_garments_cap=16)
    assert info.value.reason == "INVALID_OPTION"
    assert info.value.metadata["option"] == "minScore"


def test_max_garments_over_the_cap() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_options(0.5, 17, False, False, max_garments_cap=16)
    assert info.value.reason == "INVALID_OPTION"
    assert info.value.metadata == {"option": "maxGarments", "value": "17", "max": "16"}
    assert validate_options(0.5, 3, True, True, max_garments_cap=16).max_garments == 3


def test_request_id_length() -> None:
    validate_request_id("x" * 128)
    validate_request_id("")
    with pytest.raises(InvalidArgument) as info:
        validate_request_id("x" * 129)
    assert info.value.reason == "INVALID_REQUEST_ID"


def test_image_count() -> None:
    validate_image_count(16, 16)
    for count, expected in ((0, "NO_IMAGES"), (17, "TOO_MANY_IMAGES")):
        with pytest.raises(InvalidArgument) as info:
            validate_image_count(count, 16)
        assert info.value.reason == expected


# ------------------------------------------------------------------ parser work
def jpeg_scan_bomb(extra_scans: int) -> bytes:
    """A progressive JPEG followed by ``extra_scans`` nearly empty scans (11 bytes each),
    each of which costs a decoder a pass over the whole image."""
    data = encode("JPEG", (256, 256), progressive=True)
    last_sos = data.rindex(b"\xff\xda")
    header = data[
        last_sos : last_sos + 2 + int.from_bytes(data[last_sos + 2 : last_sos + 4], "big")
    ]
    return data[:-2] + (header + b"\x00") * extra_scans + b"\xff\xd9"


def test_a_progressive_jpeg_is_within_the_scan_limit() -> None:
    data = encode("JPEG", (256, 256), progressive=True)
    assert 2 < data.count(b"\xff\xda") <= 20
    assert inspect_image(data, LIMITS).format == "JPEG"


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    data = jpeg_scan_bomb(20_000)
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as info:
        inspect_image(data, LIMITS)
    assert time.monotonic() - started < 0.1
    assert info.value.reason == "TOO_MANY_SCANS"
    assert info.value.metadata["maxJpegScans"] == "100"
    assert int(info.value.metadata["scans"]) > 20_000


def png_with_chunks(count: int) -> bytes:
    """A valid PNG with ``count`` empty private chunks before its image data."""
    data = encode("PNG", (16, 16))
    at = data.index(b"IDAT") - 4
    empty = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    return data[:at] + empty * count + data[at:]


def png_with_chunk(kind: bytes, body: bytes, count: int = 1, after_image: bool = False) -> bytes:
    """A valid 16 x 16 PNG carrying ``count`` ``kind`` chunks of ``body``, before its image
    data or after it."""
    data = encode("PNG", (16, 16))
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    at = data.index(b"IEND") - 4 if after_image else data.index(b"IDAT") - 4
    return data[:at] + chunk * count + data[at:]


def metadata_refused(data: bytes) -> float:
    """Check that ``data`` is refused for its metadata; the seconds the check took."""
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as info:
        inspect_image(data, LIMITS)
    assert (info.value.reason, info.value.metadata) == (
        "METADATA_TOO_LARGE",
        {"format": "PNG", "maxPngMetadataBytes": "100000"},
    )
    return time.monotonic() - started


def test_a_png_text_bomb_is_refused_inflating_no_more_than_the_limit() -> None:
    # 64 KiB of zTXt that would inflate to 64 MiB: inflated up to the 100 kB limit only.
    bomb = zlib.compress(b"\x00" * (64 * 1024 * 1024), 9)
    assert metadata_refused(png_with_chunk(b"zTXt", b"comment\x00\x00" + bomb)) < 0.05


@pytest.mark.parametrize(
    ("kind", "header"),
    [
        (b"zTXt", b"k\x00\x00"),  # keyword, compression method
        (b"iTXt", b"k\x00\x01\x00en\x00k\x00"),  # ..., compressed flag, language, keyword
        (b"iCCP", b"profile\x00\x00"),
    ],
)
def test_compressed_metadata_counts_inflated_over_all_chunks(kind: bytes, header: bytes) -> None:
    """Ten chunks of 30 kB once inflated (a few dozen bytes each as stored) pass the 100 kB
    limit together; three do not."""
    body = header + zlib.compress(b"a" * 30_000, 9)
    assert len(body) < 100
    assert inspect_image(png_with_chunk(kind, body, count=3), LIMITS).format == "PNG"
    metadata_refused(png_with_chunk(kind, body, count=10))


def test_stored_metadata_counts_before_and_after_the_image_data() -> None:
    text = b"Comment\x00" + b"x" * 60_000
    assert inspect_image(png_with_chunk(b"tEXt", text), LIMITS).format == "PNG"
    metadata_refused(png_with_chunk(b"tEXt", text, count=2))
    metadata_refused(png_with_chunk(b"tEXt", text, count=2, after_image=True))
    metadata_refused(png_with_chunk(b"prVt", b"\x00" * 200_000))  # private chunks too


def test_animation_frames_are_image_data_not_metadata() -> None:
    frames = [Image.fromarray(np.full((200, 200, 3), c, np.uint8)) for c in (0, 90, 180)]
    noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8)
    frames.append(Image.fromarray(noise))  # about 120 kB of frame data
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    assert b"fdAT" in data and len(data) > LIMITS.max_png_metadata_bytes
    assert inspect_image(data, LIMITS).format == "PNG"


def test_png_chunk_limit() -> None:
    assert inspect_image(png_with_chunks(900), LIMITS).format == "PNG"
    data = png_with_chunks(150_000)  # 1.8 MB of empty chunks
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as info:
        inspect_image(data, LIMITS)
    assert time.monotonic() - started < 0.05  # at most max_png_chunks headers walked
    assert info.value.reason == "TOO_MANY_CHUNKS"
    assert info.value.metadata == {"maxPngChunks": "1000"}


# ------------------------------------------------------------------ stream length
async def _requests(count: int) -> AsyncIterator[int]:
    for i in range(count):
        yield i


async def _read_all(limit: StreamLimit, source: AsyncIterator[int]) -> list[int]:
    return [item async for item in limit.read(source)]


@pytest.mark.parametrize("count", [0, 1, 5])
def test_a_stream_within_its_request_limit_is_read_whole(count: int) -> None:
    limit = StreamLimit(max_requests=5, max_seconds=60)
    assert asyncio.run(_read_all(limit, _requests(count))) == list(range(count))
    assert limit.exceeded is None


def test_a_stream_past_its_request_limit_stops_there_and_says_why() -> None:
    limit = StreamLimit(max_requests=5, max_seconds=60)
    assert asyncio.run(_read_all(limit, _requests(1000))) == list(range(5))
    err = limit.exceeded
    assert isinstance(err, ResourceExhausted)
    assert (err.reason, err.metadata) == ("STREAM_TOO_LONG", {"maxStreamRequests": "5"})


def test_a_stream_past_its_duration_ends_whatever_it_waits_for() -> None:
    """An idle caller, or one that stops reading answers (a write that never completes)."""
    limit = StreamLimit(max_requests=1000, max_seconds=0.3)

    async def blocked() -> None:
        async with limit.deadline():
            await asyncio.Event().wait()

    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as info:
        asyncio.run(blocked())
    assert time.monotonic() - started < 1.0
    assert (info.value.reason, info.value.metadata) == (
        "STREAM_TOO_LONG",
        {"maxStreamDurationSeconds": "0.3"},
    )


def test_a_timeout_inside_a_stream_is_not_mistaken_for_its_duration_limit() -> None:
    async def inner_timeout() -> None:
        async with StreamLimit(max_requests=10, max_seconds=60).deadline():
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        asyncio.run(inner_timeout())
