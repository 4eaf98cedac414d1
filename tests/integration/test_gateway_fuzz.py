"""Fuzzing the gateway: thousands of mutated images and requests, sent concurrently to a
real gateway process in front of a real Triton (the conftest's oracle models).

The mutations are seeded, so a run is reproducible: bit flips, overwritten bytes,
truncations, splices of two files, repeated and deleted spans, structures repeated
thousands of times (JPEG scans, PNG chunks), and edits of the header
fields decoders trust (PNG IHDR with its CRC fixed up so the edit gets past the CRC check,
JPEG SOF, GIF screen descriptor, WebP RIFF and VP8X sizes, BMP and TIFF dimensions) of
PNG, JPEG, GIF, WebP, BMP and TIFF files; and the requests around them are mutated too
(option values, stream request ids, batch sizes), and so are the serialized request
messages themselves, sent as raw bytes.

What must hold for every call: it ends within its deadline (no hang), with OK or
INVALID_ARGUMENT and a documented reason (never INTERNAL, UNKNOWN or a crash), a result
describes a real image (positive size, boxes inside it); and afterwards the gateway still
serves and analyses a normal image correctly. A failing input is written to the test's
temporary directory for replay.
"""

from __future__ import annotations

import io
import math
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from conftest import LIMITS, Gateway, Oracle, error_reason
from grpc_health.v1 import health_pb2
from PIL import Image

from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb

SEED = 20261122
IMAGES_PER_RUN = 2400  # "thousands": at least 2000 mutated images reach the gateway
DEADLINE = 60.0  # seconds per call; a call that takes longer is a hang
# Every reason the gateway documents for a bad image or bad options.
IMAGE_REASONS = {
    "EMPTY_IMAGE",
    "IMAGE_TOO_LARGE",
    "NOT_AN_IMAGE",
    "UNSUPPORTED_FORMAT",
    "TOO_MANY_PIXELS",
    "TOO_MANY_SCANS",
    "TOO_MANY_CHUNKS",
    "CORRUPT_IMAGE",
}
REQUEST_REASONS = {
    "INVALID_OPTION",
    "INVALID_REQUEST_ID",
    "NO_IMAGES",
    "TOO_MANY_IMAGES",
    "MALFORMED_REQUEST",
}
ORACLE = Oracle()
GOOD_RECTS = [((10, 8, 50, 56), 0), ((60, 20, 92, 44), 2)]


# ---------------------------------------------------------------------- seed files
def seed_files() -> dict[str, bytes]:
    """Small valid files of every format the fuzzer mutates (accepted or not)."""
    image = np.full((64, 96, 3), 255, np.uint8)
    for (x1, y1, x2, y2), colour in GOOD_RECTS:
        image[y1:y2, x1:x2] = ORACLE.colours[colour]
    pil = Image.fromarray(image)
    files: dict[str, bytes] = {}
    kinds: list[tuple[str, str, str, dict[str, Any]]] = [
        ("png", "PNG", "RGB", {}),
        ("png-palette", "PNG", "P", {}),
        ("png-grey16", "PNG", "I;16", {}),
        ("jpeg", "JPEG", "RGB", {"quality": 90}),
        ("jpeg-progressive", "JPEG", "RGB", {"quality": 90, "progressive": True}),
        ("jpeg-cmyk", "JPEG", "CMYK", {}),
        ("webp-lossy", "WEBP", "RGB", {"quality": 80}),
        ("webp-lossless", "WEBP", "RGBA", {"lossless": True}),
        ("gif", "GIF", "P", {}),
        ("bmp", "BMP", "RGB", {}),
        ("tiff", "TIFF", "RGB", {"compression": "tiff_lzw"}),
    ]
    for name, fmt, mode, kw in kinds:
        if mode == "I;16":
            img = Image.fromarray(np.asarray(pil.convert("L"), np.uint16) * 257)
        else:
            img = pil.convert(mode)
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        files[name] = buf.getvalue()
    buf = io.BytesIO()
    frame2 = Image.fromarray(np.full((64, 96, 3), 40, np.uint8))
    pil.save(buf, "PNG", save_all=True, append_images=[frame2])
    files["apng"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    files["jpeg-exif"] = _encode(pil, "JPEG", exif=exif.tobytes())
    return files


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------- mutations
Mutation = Callable[[random.Random, bytes, list[bytes]], bytes]


def flip_bits(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    out = bytearray(data)
    for _i in range(rng.choice((1, 1, 2, 4, 16))):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite_bytes(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    out = bytearray(data)
    if out:
        at = rng.randrange(len(out))
        value = rng.choice((b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00" * 4))
        out[at : at + len(value)] = value
    return bytes(out)


def truncate(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def splice(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    other = rng.choice(others)
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


def repeat_or_delete(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    if len(data) < 2:
        return data * 2
    a = rng.randrange(len(data) - 1)
    b = rng.randrange(a + 1, min(len(data), a + 512) + 1)
    if rng.random() < 0.5:
        return data[:a] + data[a:b] * rng.randint(2, 20) + data[b:]
    return data[:a] + data[b:]


def repeat_structure(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    """Repeat one structural unit hundreds or thousands of times: a JPEG scan (nearly
    empty), an empty PNG chunk, or else a short span: the inputs that make parsers loop."""
    count = rng.choice((10, 100, 1000, 5000))
    if data.startswith(b"\xff\xd8") and (sos := data.rfind(b"\xff\xda")) > 0 and len(data) > 4:
        header = data[sos : sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]
        return data[:-2] + (header + b"\x00") * count + data[-2:]
    if data.startswith(b"\x89PNG") and len(data) >= 33:
        empty = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
        return data[:33] + empty * count + data[33:]
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[at : at + rng.randint(1, 16)] * count + data[at:]


_EDGE_VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def _edge(rng: random.Random, bits: int) -> int:
    mask = (1 << bits) - 1
    return (rng.choice(_EDGE_VALUES) if rng.random() < 0.7 else rng.getrandbits(bits)) & mask


def edit_header(rng: random.Random, data: bytes, _: list[bytes]) -> bytes:
    """Rewrite a header field the decoder trusts, format by format."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG") and len(data) >= 33:
        # IHDR: width, height, bit depth, colour type, compression, filter, interlace;
        # the CRC is fixed up so the edit is what the decoder sees.
        body = bytearray(out[16:29])
        field = rng.choice(((0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1)))
        at, size = field
        body[at : at + size] = _edge(rng, size * 8).to_bytes(size, "big")
        out[16:29] = body
        out[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)))
    elif data.startswith(b"\xff\xd8") and (sof := data.find(b"\xff\xc0")) > 0:
        # SOF0: precision, height, width, component count.
        at, size = rng.choice(((4, 1), (5, 2), (7, 2), (9, 1)))
        out[sof + at : sof + at + size] = _edge(rng, size * 8).to_bytes(size, "big")
    elif data.startswith(b"\xff\xd8") and (sof := data.find(b"\xff\xc2")) > 0:
        at, size = rng.choice(((5, 2), (7, 2), (9, 1)))
        out[sof + at : sof + at + size] = _edge(rng, size * 8).to_bytes(size, "big")
    elif data.startswith(b"GIF"):
        at = rng.choice((6, 8))  # logical screen width, height (little-endian)
        out[at : at + 2] = _edge(rng, 16).to_bytes(2, "little")
    elif data.startswith(b"RIFF"):
        # The RIFF size, the first chunk's size, or VP8X/VP8L/VP8 dimension bytes.
        at, size = rng.choice(((4, 4), (16, 4), (24, 3), (27, 3), (26, 2), (28, 2), (21, 4)))
        out[at : at + size] = _edge(rng, size * 8).to_bytes(size, "little")
    elif data.startswith(b"BM"):
        at, size = rng.choice(((18, 4), (22, 4), (28, 2), (30, 4), (10, 4)))
        out[at : at + size] = _edge(rng, size * 8).to_bytes(size, "little")
    elif data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 12:
        at = rng.randrange(4, min(len(out), 200) - 3)
        out[at : at + 4] = _edge(rng, 32).to_bytes(4, "little")
    else:
        return flip_bits(rng, data, [])
    return bytes(out)


MUTATIONS: tuple[Mutation, ...] = (
    flip_bits,
    overwrite_bytes,
    truncate,
    splice,
    repeat_or_delete,
    repeat_structure,
    edit_header,
    edit_header,
)


def mutated_image(rng: random.Random, files: list[bytes]) -> bytes:
    data = rng.choice(files)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        data = rng.choice(MUTATIONS)(rng, data, files)
    return data


# ---------------------------------------------------------------------- mutated requests
def mutated_options(rng: random.Random) -> pb.AnalyzeOptions:
    if rng.random() < 0.6:
        return pb.AnalyzeOptions()
    score = rng.choice(
        (0.0, 0.5, 1.0, -0.0, -1e-9, 1.0000001, 2.0, -5.0, math.nan, math.inf, -math.inf)
        + (rng.random(),) * 4
    )
    garments = rng.choice((0, 1, 2, 16, 17, 1000, 2**31, 2**32 - 1, rng.randrange(40)))
    return pb.AnalyzeOptions(
        min_score=score,
        max_garments=garments,
        include_embeddings=rng.random() < 0.3,
        include_probability_tables=rng.random() < 0.2,
    )


def mutated_request_id(rng: random.Random, index: int) -> str:
    kind = rng.random()
    if kind < 0.6:
        return f"r{index}"
    if kind < 0.8:
        return f"r{index}-" + "x" * rng.choice((100, 127, 128, 200, 5000))
    alphabet = "aé€😀\u200b\x00\t\n\\\"'<>%{}"
    return f"r{index}-" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))


# ---------------------------------------------------------------------- checking outcomes
@dataclass
class Failure:
    what: str
    detail: str
    inputs: list[bytes]


def check_result(result: pb.ImageResult) -> str | None:
    """Why a result cannot describe a real image, or None."""
    if result.width <= 0 or result.height <= 0:
        return f"image size {result.width}x{result.height}"
    for g in result.garments:
        b = g.box
        if not (
            -0.5 <= b.x_min <= b.x_max <= result.width + 0.5
            and -0.5 <= b.y_min <= b.y_max <= result.height + 0.5
        ):
            return f"box {b} outside the {result.width}x{result.height} image"
    return None


def check_item(error: pb.ItemError | None, result: pb.ImageResult | None) -> str | None:
    if error is not None:
        if error.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
            return f"item code {error.code} {error.reason}: {error.message}"
        if error.reason not in IMAGE_REASONS | REQUEST_REASONS or not error.message:
            return f"undocumented item error {error.reason!r}: {error.message}"
        return None
    assert result is not None
    return check_result(result)


def check_rpc_error(err: grpc.RpcError) -> str | None:
    code = err.code()
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return f"call ended {code.name}: {err.details()}"
    reason = error_reason(err)
    if reason not in IMAGE_REASONS | REQUEST_REASONS:
        return f"undocumented error {reason!r}: {err.details()}"
    return None


# ---------------------------------------------------------------------- the calls
def run_analyze(gw: Gateway, data: bytes, options: pb.AnalyzeOptions) -> str | None:
    try:
        reply = gw.stub.Analyze(
            pb.AnalyzeRequest(image=pb.Image(data=data), options=options),
            metadata=gw.auth,
            timeout=DEADLINE,
        )
    except grpc.RpcError as err:
        return check_rpc_error(err)
    return check_result(reply.result)


def run_raw(gw: Gateway, method: str, data: bytes) -> str | None:
    """Send ``data`` as the request message of ``method``, byte for byte."""
    call = gw.channel.unary_unary(f"/fashion.v1.FashionAnalysisService/{method}")
    try:
        reply = call(data, metadata=gw.auth, timeout=DEADLINE)
    except grpc.RpcError as err:
        return check_rpc_error(err)
    if method == "Analyze":
        return check_result(pb.AnalyzeResponse.FromString(reply).result)
    entries = pb.BatchAnalyzeResponse.FromString(reply).entries
    for entry in entries:
        is_error = entry.WhichOneof("outcome") == "error"
        problem = check_item(entry.error if is_error else None, None if is_error else entry.result)
        if problem:
            return problem
    return None


def run_batch(gw: Gateway, images: list[bytes], options: pb.AnalyzeOptions) -> str | None:
    try:
        reply = gw.stub.BatchAnalyze(
            pb.BatchAnalyzeRequest(images=[pb.Image(data=d) for d in images], options=options),
            metadata=gw.auth,
            timeout=DEADLINE,
        )
    except grpc.RpcError as err:
        return check_rpc_error(err)
    if len(reply.entries) != len(images):
        return f"{len(reply.entries)} entries for {len(images)} images"
    for i, entry in enumerate(reply.entries):
        is_error = entry.WhichOneof("outcome") == "error"
        problem = check_item(entry.error if is_error else None, None if is_error else entry.result)
        if problem:
            return f"entry {i}: {problem}"
    return None


def run_stream(gw: Gateway, requests: list[pb.StreamAnalyzeRequest]) -> str | None:
    seen: list[str] = []
    try:
        for reply in gw.stub.StreamAnalyze(iter(requests), metadata=gw.auth, timeout=DEADLINE):
            seen.append(reply.request_id)
            is_error = reply.WhichOneof("outcome") == "error"
            problem = check_item(
                reply.error if is_error else None, None if is_error else reply.result
            )
            if problem:
                return f"request {reply.request_id[:40]!r}: {problem}"
    except grpc.RpcError as err:
        return check_rpc_error(err) or "the stream ended with INVALID_ARGUMENT"
    if sorted(seen) != sorted(r.request_id for r in requests):
        return f"{len(seen)} answers for {len(requests)} requests"
    return None


def fuzz_jobs(
    rng: random.Random, files: list[bytes]
) -> Iterator[tuple[str, Callable[..., Any], tuple[Any, ...], list[bytes]]]:
    """(description, call, arguments, the inputs sent) until IMAGES_PER_RUN mutated images
    have been sent (raw request messages come on top)."""
    sent = 0
    index = 0
    max_batch = LIMITS["max_images_per_batch_request"]
    while sent < IMAGES_PER_RUN:
        index += 1
        kind = rng.random()
        if kind < 0.1:
            # The request message itself mutated on the wire (sent as raw bytes).
            image = rng.choice(files) if rng.random() < 0.5 else mutated_image(rng, files)
            method, request = rng.choice(
                (
                    ("Analyze", pb.AnalyzeRequest(image=pb.Image(data=image))),
                    ("BatchAnalyze", pb.BatchAnalyzeRequest(images=[pb.Image(data=image)] * 2)),
                )
            )
            data = request.SerializeToString()
            for _ in range(rng.choice((1, 1, 2))):
                data = rng.choice((flip_bits, overwrite_bytes, truncate, repeat_or_delete))(
                    rng, data, []
                )
            yield f"raw {method} #{index}", run_raw, (method, data), [data]
        elif kind < 0.5:
            image = mutated_image(rng, files)
            sent += 1
            yield f"Analyze #{index}", run_analyze, (image, mutated_options(rng)), [image]
        elif kind < 0.9:
            count = rng.choice((0, 1, 2, 3, 5, 8, 8, max_batch + 1))
            images = [mutated_image(rng, files) for _ in range(count)]
            sent += count
            yield f"BatchAnalyze #{index}", run_batch, (images, mutated_options(rng)), images
        else:
            requests = [
                pb.StreamAnalyzeRequest(
                    request_id=mutated_request_id(rng, i),
                    image=pb.Image(data=mutated_image(rng, files)),
                    options=mutated_options(rng),
                )
                for i in range(rng.randrange(1, 40))
            ]
            sent += len(requests)
            images = [r.image.data for r in requests]
            yield f"StreamAnalyze #{index}", run_stream, (requests,), images


def test_fuzzed_images_and_requests_never_crash_hang_or_fail_internally(
    gw: Gateway, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    files = list(seed_files().values())
    jobs = list(fuzz_jobs(rng, files))
    assert sum(len(images) for what, *_, images in jobs if not what.startswith("raw")) >= 2000

    def run(job: tuple[str, Callable[..., Any], tuple[Any, ...], list[bytes]]) -> Failure | None:
        what, call, args, images = job
        started = time.monotonic()
        problem = call(gw, *args)
        if problem is None and time.monotonic() - started > DEADLINE:
            problem = "took longer than its deadline"
        return Failure(what, problem, images) if problem else None

    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(run, jobs) if f is not None]

    for i, failure in enumerate(failures[:20]):
        for j, data in enumerate(failure.inputs):
            (tmp_path / f"failure-{i}-{j}.bin").write_bytes(data)
    assert not failures, (
        f"{len(failures)} of {len(jobs)} calls failed (inputs in {tmp_path}):\n"
        + "\n".join(f"{f.what}: {f.detail}" for f in failures[:20])
    )
    assert gw.process.poll() is None, "the gateway died"
    assert gw.health() == health_pb2.HealthCheckResponse.SERVING
    good = ORACLE.scene(96, 64, GOOD_RECTS, "PNG")
    result = gw.analyze(good)
    assert [round(g.detector_score, 2) for g in result.garments] == [0.9, 0.8]
