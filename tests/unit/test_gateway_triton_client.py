"""The transport to Triton: message limits and deadlines."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from fashionserve.gateway.failures import DeadlineExceeded
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
