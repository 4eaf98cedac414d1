"""The transport to Triton: message limits, deadlines, and failures that name no server."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from tritonclient.utils import InferenceServerException

from fashionserve.gateway.failures import (
    DeadlineExceeded,
    GatewayError,
    InternalError,
    Unavailable,
    batch_requests_var,
)
from fashionserve.gateway.triton_client import EnsembleClient, channel_args


def test_message_limits_fit_a_full_batch_of_the_largest_images() -> None:
    args = dict(channel_args(max_batch_size=8, max_image_bytes=20 * 1024 * 1024))
    assert args["grpc.max_send_message_length"] >= 8 * 20 * 1024 * 1024
    assert args["grpc.max_receive_message_length"] >= 8 * 20 * 1024 * 1024
    huge = dict(channel_args(max_batch_size=256, max_image_bytes=2**30))
    assert huge["grpc.max_send_message_length"] == 2**31 - 1  # a C int


def test_a_call_whose_deadline_has_passed_is_not_sent() -> None:
    """No Triton listens at the address: a call that were sent would be UNAVAILABLE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def call() -> None:
        client = EnsembleClient(
            f"127.0.0.1:{port}", max_batch_size=1, max_image_bytes=1024, request_timeout_seconds=5
        )
        try:
            await client.infer([b"x"], deadline=time.monotonic() - 0.001)
        finally:
            await client.close()

    with pytest.raises(DeadlineExceeded) as info:
        asyncio.run(call())
    assert info.value.reason == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize(
    ("status", "text", "kind", "reason"),
    [
        (
            "StatusCode.UNAVAILABLE",
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.1.2.3:8001: "
            "Failed to connect to remote host: Connection refused",
            Unavailable,
            "TRITON_UNAVAILABLE",
        ),
        (
            "StatusCode.DEADLINE_EXCEEDED",
            "Deadline Exceeded",
            DeadlineExceeded,
            "INFERENCE_TIMEOUT",
        ),
        (
            "StatusCode.INTERNAL",
            "in ensemble 'fashion_pipeline', onnx runtime error 6: Non-zero status code",
            InternalError,
            "INFERENCE_FAILED",
        ),
    ],
)
def test_a_failed_call_names_no_server_and_quotes_no_triton_text(
    status: str, text: str, kind: type[GatewayError], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What the caller gets is ours; the server's address and Triton's words go to the log,
    with the ids of the requests the call carried."""

    async def fail() -> Exception:
        client = EnsembleClient(
            "10.1.2.3:8001", max_batch_size=1, max_image_bytes=1024, request_timeout_seconds=5
        )
        try:
            batch_requests_var.set("req-1,req-2")
            return client._map_error(InferenceServerException(text, status=status), 2, 5.0)
        finally:
            await client.close()

    with caplog.at_level(logging.WARNING):
        error = asyncio.run(fail())
    assert isinstance(error, kind) and error.reason == reason
    said = f"{error.message} {error.metadata}"
    for internal in ("10.1.2.3", "8001", "ipv4", "Connection refused", "onnx", "Deadline"):
        assert internal not in said
    logged = caplog.text
    assert "10.1.2.3:8001" in logged and text in logged and "req-1,req-2" in logged


def test_an_unreachable_server_is_not_named_to_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on: gRPC's own "connection refused"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def call() -> None:
        client = EnsembleClient(
            f"127.0.0.1:{port}", max_batch_size=1, max_image_bytes=1024, request_timeout_seconds=5
        )
        try:
            await client.infer([b"x"], deadline=time.monotonic() + 5)
        finally:
            await client.close()

    with caplog.at_level(logging.WARNING), pytest.raises(Unavailable) as info:
        asyncio.run(call())
    assert info.value.reason == "TRITON_UNAVAILABLE"
    said = f"{info.value.message} {info.value.metadata}"
    assert "127.0.0.1" not in said and str(port) not in said
    assert f"127.0.0.1:{port}" in caplog.text
