"""Request checks done in the gateway, before anything is sent to Triton.

Images are checked from their bytes and header only, never fully decoded here (decoding is
the preprocess step's job, on Triton): the size in bytes, the format by its magic number
against the allow-list, the dimensions from the header against the pixel limit
(decompression bombs are refused before a pixel is decoded), and a truncation check that
knows each format's ending: a WebP must hold the bytes its RIFF header announces, a JPEG
must end with its EOI marker, a PNG with its IEND chunk. A JPEG or PNG that does not is
decoded here at 1/8 scale, or its chunks verified, to tell a truncated file from one with
trailing data. Damage that only a full decode can see is reported by Triton's preprocess
step and mapped back to the image. :func:`inspect_image` is caller-controlled work, so the
gateway runs it in its image-check pool (:mod:`fashionserve.gateway.image_checks`), never
on the event loop.

Parsers do work in proportion to structure, not bytes, so structure is limited too, before
any parser runs: a JPEG's scans (each a pass over the whole image), a PNG's chunks, and a
PNG's metadata (ancillary chunks, compressed text counted at its inflated size, inflated
no further than the limit).

Every failure is an :class:`~fashionserve.gateway.failures.InvalidArgument` whose reason names the
problem: EMPTY_IMAGE, IMAGE_TOO_LARGE, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TOO_MANY_PIXELS,
TOO_MANY_SCANS, TOO_MANY_CHUNKS, METADATA_TOO_LARGE, CORRUPT_IMAGE, INVALID_OPTION,
INVALID_REQUEST_ID, NO_IMAGES, TOO_MANY_IMAGES; a stream past its length limits
(:class:`StreamLimit`) ends with :class:`~fashionserve.gateway.failures.ResourceExhausted`
STREAM_TOO_LONG.

The options a caller sent become :class:`ValidatedOptions` (zero values resolved): not the
client library's ``AnalyzeOptions``, which is what a caller sends.

Animated WebP and PNG are accepted and only their first frame is analysed (Triton's
preprocess step decodes that frame alone), so the number of frames costs nothing beyond
the byte limit; GIF is not an accepted format at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import warnings
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from fashionserve.gateway.failures import GatewayError, InvalidArgument, ResourceExhausted
from fashionserve.imaging import ALLOWED_FORMATS, sniff_format

T = TypeVar("T")

ACCEPTED_FORMATS: tuple[str, ...] = tuple(sorted(ALLOWED_FORMATS))
"""The formats the ensemble decodes (shared with Triton's preprocess step)."""

MAX_REQUEST_ID_CHARS = 128

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole chunk: no data, then its CRC
# PNG chunks whose content is zlib-compressed (text, international text, ICC profile).
_PNG_COMPRESSED = frozenset({b"zTXt", b"iTXt", b"iCCP"})
_PNG_FRAME_DATA = b"fdAT"  # an APNG frame's pixels: ancillary, but image data, not metadata


@dataclass(frozen=True)
class ImageLimits:
    """What a single image may be."""

    max_image_bytes: int
    max_image_pixels: int
    max_jpeg_scans: int
    max_png_chunks: int
    max_png_metadata_bytes: int


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an accepted image (dimensions as stored, before EXIF
    rotation)."""

    format: str
    width: int
    height: int
    size_bytes: int


def inspect_image(data: bytes, limits: ImageLimits) -> ImageInfo:
    """Check one encoded image without decoding it; return what its header says.

    Raises :class:`InvalidArgument` with the reason naming the first problem found.
    """
    size = len(data)
    if size == 0:
        raise InvalidArgument("EMPTY_IMAGE", "the image is empty (0 bytes)")
    if size > limits.max_image_bytes:
        raise InvalidArgument(
            "IMAGE_TOO_LARGE",
            f"the image is {size} bytes, over the limit of {limits.max_image_bytes}",
            {"imageBytes": size, "maxImageBytes": limits.max_image_bytes},
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidArgument(
            "NOT_AN_IMAGE",
            f"the bytes are not a recognised image (accepted: {', '.join(ACCEPTED_FORMATS)})",
            {"acceptedFormats": ",".join(ACCEPTED_FORMATS)},
        )
    if fmt not in ALLOWED_FORMATS:
        raise InvalidArgument(
            "UNSUPPORTED_FORMAT",
            f"{fmt} images are not accepted (accepted: {', '.join(ACCEPTED_FORMATS)})",
            {"format": fmt, "acceptedFormats": ",".join(ACCEPTED_FORMATS)},
        )
    if fmt == "JPEG":
        _check_jpeg_scans(data, limits.max_jpeg_scans)
    elif fmt == "PNG":
        _check_png_chunks(data, limits.max_png_chunks, limits.max_png_metadata_bytes)
    elif fmt == "WEBP" and not ends_whole(data, fmt):
        # A WebP shorter than its RIFF header says was cut (checked before PIL, whose WebP
        # plugin sets up a decoder when it opens the file).
        raise _truncated(
            fmt, ValueError(f"the RIFF header declares {_riff_size(data)} bytes, {size} present")
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(
            "TOO_MANY_PIXELS",
            f"the image header declares more pixels than the limit of {limits.max_image_pixels}",
            {"maxImagePixels": limits.max_image_pixels},
        ) from exc
    except Exception as exc:
        raise InvalidArgument(
            "CORRUPT_IMAGE",
            f"the {fmt} header cannot be parsed: {exc}",
            {"format": fmt},
        ) from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidArgument(
            "CORRUPT_IMAGE", f"the {fmt} header declares a {width}x{height} image", {"format": fmt}
        )
    if width * height > limits.max_image_pixels:
        raise InvalidArgument(
            "TOO_MANY_PIXELS",
            f"the image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_image_pixels}",
            {"width": width, "height": height, "maxImagePixels": limits.max_image_pixels},
        )
    _check_complete(data, fmt, img)
    return ImageInfo(fmt, width, height, size)


def _check_jpeg_scans(data: bytes, max_scans: int) -> None:
    """Refuse a JPEG with more scans than a real photo has (a progressive one has about
    ten). Each scan is a pass over every coefficient of the image, so a few megabytes of
    nearly empty scans make a decoder spend minutes on one image. Counting SOS markers
    is a C-speed search; one inside a thumbnail or binary metadata only counts extra."""
    scans = data.count(b"\xff\xda")
    if scans > max_scans:
        raise InvalidArgument(
            "TOO_MANY_SCANS",
            f"the JPEG image has {scans} scans, over the limit of {max_scans}",
            {"scans": scans, "maxJpegScans": max_scans},
        )


def _check_png_chunks(data: bytes, max_chunks: int, max_metadata_bytes: int) -> None:
    """Refuse a PNG made of more chunks than ``max_chunks``, or carrying more metadata than
    ``max_metadata_bytes``, walking at most ``max_chunks`` chunk headers. PIL parses chunks
    one by one in Python: a file of millions of empty chunks would keep the gateway busy for
    seconds.

    Metadata is every ancillary chunk (text, colour profile, EXIF, private chunks) but APNG
    frame data. A compressed one (zTXt, iTXt, iCCP) counts at its inflated size, and is
    inflated here no further than what is left of the limit: PIL inflates text chunks when
    it opens a file (here, and in Triton when it decodes), so a few kilobytes of text that
    inflate to gigabytes would cost that much CPU and memory first.
    """
    pos, count, size, metadata = 8, 0, len(data), 0
    while pos + 8 <= size and count <= max_chunks:
        count += 1
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            return
        if kind[0] & 0x20 and kind != _PNG_FRAME_DATA:  # bit 5 of the first letter: ancillary
            held = min(length, size - pos - 8)  # as stored (a cut file holds less)
            room = max_metadata_bytes - metadata
            if kind in _PNG_COMPRESSED and held <= room:
                body = data[pos + 8 : pos + 8 + held]
                held = max(held, _inflated_size(kind, body, room + 1))
            metadata += held
            if metadata > max_metadata_bytes:
                raise InvalidArgument(
                    "METADATA_TOO_LARGE",
                    f"the PNG image carries more than {max_metadata_bytes} bytes of metadata "
                    "(text, colour profile and other ancillary chunks, compressed ones "
                    "counted inflated)",
                    {"format": "PNG", "maxPngMetadataBytes": max_metadata_bytes},
                )
        pos += 12 + length
    if count > max_chunks:
        raise InvalidArgument(
            "TOO_MANY_CHUNKS",
            f"the PNG image has more than {max_chunks} chunks",
            {"maxPngChunks": max_chunks},
        )


def _inflated_size(kind: bytes, body: bytes, budget: int) -> int:
    """The inflated size of a compressed PNG chunk's stream, inflating at most ``budget``
    bytes (``budget`` >= 1); 0 for a stream PIL would not inflate either."""
    stream = _compressed_stream(kind, body)
    if stream is None:
        return 0
    try:
        return len(zlib.decompressobj().decompress(stream, budget))
    except zlib.error:
        return 0


def _compressed_stream(kind: bytes, body: bytes) -> bytes | None:
    """The zlib stream of a zTXt, iTXt or iCCP chunk, as PIL reads it; None if it has none."""
    _, sep, rest = body.partition(b"\0")  # a keyword or profile name, then NUL
    if kind != b"iTXt":
        return rest[1:] if sep else None  # a compression method byte, then the stream
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, text.
    if len(rest) < 2 or rest[0] == 0:
        return None
    fields = rest[2:].split(b"\0", 2)
    return fields[2] if len(fields) == 3 else None


def _riff_size(data: bytes) -> int:
    """The file size a WebP's RIFF header declares."""
    return int.from_bytes(data[4:8], "little") + 8


def ends_whole(data: bytes, fmt: str) -> bool:
    """Whether ``data`` ends as a whole file of format ``fmt`` does, the cheap proof that it
    was not cut: a JPEG with its EOI marker (bar zero padding), a PNG with its IEND chunk, a
    WebP no earlier than its RIFF header says. Only that format's ending counts (a JPEG
    ending with a PNG's IEND is not whole)."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00").endswith(_JPEG_EOI)
    if fmt == "PNG":
        return data.endswith(_PNG_IEND)
    if fmt == "WEBP":
        return _riff_size(data) <= len(data)
    return False


def _check_complete(data: bytes, fmt: str, img: Image.Image) -> None:
    """Refuse a truncated JPEG or PNG: look at its end first, decode only if in doubt."""
    if ends_whole(data, fmt):
        return
    try:
        if fmt == "JPEG":
            # No EOI at the end: either data trails the image (some cameras append a
            # preview or a video) or the file is cut short. A 1/8-scale decode parses the
            # whole entropy-coded stream at a fraction of the cost of a full decode.
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        elif fmt == "PNG":
            img.verify()  # walks every chunk to IEND checking CRCs; no decompression
    except Exception as exc:
        raise _truncated(fmt, exc) from exc


def _truncated(fmt: str, exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        "CORRUPT_IMAGE",
        f"the {fmt} image is truncated or corrupt: {exc}",
        {"format": fmt},
    )


# ------------------------------------------------------------------------- options
@dataclass(frozen=True)
class ValidatedOptions:
    """Per-request options after validation; ``max_garments`` is resolved (never 0)."""

    min_score: float
    max_garments: int
    include_embeddings: bool = False
    include_probability_tables: bool = False


def validate_options(
    min_score: float,
    max_garments: int,
    include_embeddings: bool,
    include_probability_tables: bool,
    *,
    max_garments_cap: int,
) -> ValidatedOptions:
    """Check the options a caller sent; zero values mean the served defaults.

    ``min_score`` must be in [0, 1] (a value below the served floor has the floor's
    effect); ``max_garments`` must not exceed the served cap, and 0 means the cap.
    """
    if math.isnan(min_score) or not 0.0 <= min_score <= 1.0:
        raise InvalidArgument(
            "INVALID_OPTION",
            f"options.min_score must be in [0, 1], got {min_score}",
            {"option": "minScore", "value": min_score},
        )
    if max_garments < 0 or max_garments > max_garments_cap:
        raise InvalidArgument(
            "INVALID_OPTION",
            f"options.max_garments must be in [0, {max_garments_cap}] (0 means "
            f"{max_garments_cap}), got {max_garments}",
            {"option": "maxGarments", "value": max_garments, "max": max_garments_cap},
        )
    return ValidatedOptions(
        min_score=float(min_score),
        max_garments=max_garments or max_garments_cap,
        include_embeddings=include_embeddings,
        include_probability_tables=include_probability_tables,
    )


def validate_request_id(request_id: str) -> None:
    """A stream request id is at most :data:`MAX_REQUEST_ID_CHARS` characters."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            "INVALID_REQUEST_ID",
            f"request_id is {len(request_id)} characters, over the limit of {MAX_REQUEST_ID_CHARS}",
            {"maxChars": MAX_REQUEST_ID_CHARS},
        )


def validate_image_count(count: int, max_images: int) -> None:
    """A BatchAnalyze call holds between 1 and ``max_images`` images."""
    if count == 0:
        raise InvalidArgument("NO_IMAGES", "the request holds no image")
    if count > max_images:
        raise InvalidArgument(
            "TOO_MANY_IMAGES",
            f"the request holds {count} images, over the limit of {max_images} per call",
            {"imageCount": count, "maxImagesPerBatch": max_images},
        )


class StreamLimit:
    """The length limits of one StreamAnalyze call: at most ``max_requests`` requests, and
    open at most ``max_seconds``.

    :meth:`read` passes the requests on and stops after ``max_requests``, so that those are
    still answered; :attr:`exceeded` then holds the error to end the call with. To tell
    "exactly ``max_requests``, then the end" from "one too many", one request past the
    limit is read (and dropped).

    :meth:`deadline` bounds the whole call, whatever it waits for: the caller's next
    request, an answer, or a caller that stops reading answers (gRPC flow control then
    blocks the writes). When it passes, what is in progress is cancelled and the call
    ends with STREAM_TOO_LONG.
    """

    def __init__(self, max_requests: int, max_seconds: float) -> None:
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.exceeded: GatewayError | None = None

    async def read(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        """The requests of ``source``, up to ``max_requests``."""
        count = 0
        async for item in source:
            count += 1
            if count > self.max_requests:
                self.exceeded = ResourceExhausted(
                    "STREAM_TOO_LONG",
                    f"the stream carried more than the limit of {self.max_requests} requests; "
                    f"the first {self.max_requests} were answered, open a new stream for the "
                    "rest",
                    {"maxStreamRequests": self.max_requests},
                )
                return
            yield item

    @contextlib.asynccontextmanager
    async def deadline(self) -> AsyncIterator[None]:
        """Run the body for at most ``max_seconds``, then raise STREAM_TOO_LONG."""
        timeout = asyncio.timeout(self.max_seconds)
        try:
            async with timeout:
                yield
        except TimeoutError:
            if not timeout.expired():
                raise
            raise ResourceExhausted(
                "STREAM_TOO_LONG",
                f"the stream was open longer than the limit of {self.max_seconds:g} s; "
                "requests not answered by then were not served: send them on a new stream",
                {"maxStreamDurationSeconds": f"{self.max_seconds:g}"},
            ) from None
