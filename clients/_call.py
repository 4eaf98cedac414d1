"""Call plumbing shared by the sync and asyncio clients: channel options, metadata, requests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

from fashionserve.clients.types import AnalyzeOptions, Box, StreamRequest
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb

ImageInput: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]
"""Encoded image bytes, or the path of an image file to send as is."""

StreamItem: TypeAlias = StreamRequest | tuple[str, ImageInput]
"""One stream request: a :class:`StreamRequest` or a ``(request_id, image)`` pair."""

DEFAULT_TIMEOUT = 30.0
"""Seconds a unary call may take, retries included (the gateway's own request timeout)."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""The gateway's default ``max_message_bytes``. gRPC's own default is 4 MiB on each end,
too small for a batch of photos, so both directions are raised to match the server."""

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Options for a client channel to the gateway."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.primary_user_agent", "fashionserve-client/0.1"),
        # Long streams cross idle proxies; keepalive notices a dead peer.
        ("grpc.keepalive_time_ms", 60_000),
    ]


def call_metadata(
    api_key: str | None, bearer_token: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: an API key or a bearer token (the gateway refuses
    a call with both)."""
    if api_key and bearer_token:
        raise ValueError("pass an API key or a bearer token, not both")
    if bearer_token:
        return ((AUTHORIZATION_HEADER, f"Bearer {bearer_token}"),)
    return ((API_KEY_HEADER, api_key),) if api_key else ()


def image_bytes(image: ImageInput) -> bytes:
    """The encoded bytes of ``image``: read from disk when it is a path."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


def analyze_request(image: ImageInput, options: AnalyzeOptions | None) -> pb.AnalyzeRequest:
    """An ``AnalyzeRequest`` for one image."""
    return pb.AnalyzeRequest(
        image=pb.Image(data=image_bytes(image)), options=(options or AnalyzeOptions()).to_proto()
    )


def batch_request(
    images: Iterable[ImageInput], options: AnalyzeOptions | None
) -> pb.BatchAnalyzeRequest:
    """A ``BatchAnalyzeRequest`` for several images analysed with the same options."""
    return pb.BatchAnalyzeRequest(
        images=[pb.Image(data=image_bytes(i)) for i in images],
        options=(options or AnalyzeOptions()).to_proto(),
    )


def stream_requests(
    items: Iterable[StreamItem], options: AnalyzeOptions | None
) -> Iterator[pb.StreamAnalyzeRequest]:
    """Lazily convert stream items; lazily, so gRPC's flow control paces reading them."""
    for item in items:
        if not isinstance(item, StreamRequest):
            request_id, image = item
            item = StreamRequest(request_id=request_id, image=image_bytes(image))
        yield item.to_proto(options)


def search_request(
    query: ImageInput | Sequence[float],
    k: int,
    *,
    garment_index: int | None = None,
    box: Box | None = None,
    filter: Mapping[str, str] | None = None,
    include_metadata: bool = False,
) -> pb.SearchSimilarRequest:
    """A SearchSimilar request: ``query`` is an image (bytes or a path; then
    ``garment_index`` or ``box`` picks its garment) or an embedding (a sequence of floats)."""
    request = pb.SearchSimilarRequest(
        k=k, filter=dict(filter or {}), include_metadata=include_metadata
    )
    if isinstance(query, bytes | bytearray | memoryview | str | os.PathLike):
        request.image.image.data = image_bytes(query)
        if garment_index is not None:
            request.image.garment_index = garment_index
        elif box is not None:
            request.image.box.CopyFrom(
                pb.Box(x_min=box.x_min, y_min=box.y_min, x_max=box.x_max, y_max=box.y_max)
            )
    else:
        request.embedding.values.extend(float(v) for v in query)
    return request
