"""The one error model: domain errors become google.rpc.Status with exactly one ErrorInfo;
anything else becomes a generic INTERNAL that leaks nothing and quotes a request id.

The interceptor is exercised on a real grpc.aio server over a real socket.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from fashionserve.errors import ErrorKind
from fashionserve.gateway.batcher import BatcherClosed, BatchResultMismatch
from fashionserve.gateway.errors import DOMAIN, STATUS_CODES, ErrorInterceptor, to_rpc_status
from fashionserve.gateway.failures import InvalidArgument, Unavailable, as_error, request_id_var


def aio(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return run


def error_info(status: Any) -> error_details_pb2.ErrorInfo:
    assert len(status.details) == 1, "exactly one detail"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def test_domain_error_maps_to_status_with_one_error_info() -> None:
    err = InvalidArgument(
        "CORRUPT_IMAGE", "the JPEG image is truncated", {"format": "JPEG", "n": 3}
    )
    status = to_rpc_status(err)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == "the JPEG image is truncated"
    info = error_info(status)
    assert (info.reason, info.domain) == ("CORRUPT_IMAGE", DOMAIN)
    assert dict(info.metadata) == {"format": "JPEG", "n": "3"}


# ---------------------------------------------------------------- over a socket
async def _boom_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"domain":
        raise Unavailable("TRITON_UNAVAILABLE", "the inference server cannot be reached")
    if request == b"rid":
        return request_id_var.get().encode()
    raise RuntimeError("secret internal detail: password=hunter2")


async def _boom_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"fail":
            raise InvalidArgument("INVALID_OPTION", "bad option", {"option": "minScore"})
        yield request


async def _parsed_unary(
    request: error_details_pb2.ErrorInfo, context: grpc.aio.ServicerContext
) -> bytes:
    return request.reason.encode()


async def _parsed_stream(
    requests: AsyncIterator[error_details_pb2.ErrorInfo], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request.reason.encode()


class _Handlers(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        parse = error_details_pb2.ErrorInfo.FromString  # any message type will do
        if details.method == "/fashion.v1.Test/ParsedUnary":
            return grpc.unary_unary_rpc_method_handler(_parsed_unary, request_deserializer=parse)
        if details.method == "/fashion.v1.Test/ParsedStream":
            return grpc.stream_stream_rpc_method_handler(_parsed_stream, request_deserializer=parse)
        if details.method == "/fashion.v1.Test/Unary":
            return grpc.unary_unary_rpc_method_handler(_boom_unary)
        if details.method == "/fashion.v1.Test/Stream":
            return grpc.stream_stream_rpc_method_handler(_boom_stream)
        return None


async def _serve() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers([_Handlers()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@aio
async def test_domain_error_reaches_the_caller_as_status() -> None:
    server, address = await _serve()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/fashion.v1.Test/Unary")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"domain")
            err = info.value
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert err.details() == "the inference server cannot be reached"
            status = rpc_status.from_call(err)
            assert status is not None
            assert error_info(status).reason == "TRITON_UNAVAILABLE"
    finally:
        await server.stop(0)


@aio
async def test_unexpected_exception_is_generic_internal_with_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, address = await _serve()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/fashion.v1.Test/Unary")
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"crash", metadata=(("x-request-id", "req-42"),))
            err = info.value
            assert err.code() == grpc.StatusCode.INTERNAL
            assert "hunter2" not in (err.details() or "")
            assert "req-42" in (err.details() or "")
            status = rpc_status.from_call(err)
            assert status is not None
            info_ = error_info(status)
            assert info_.reason == "INTERNAL" and info_.metadata["requestId"] == "req-42"
            # The gateway's log has the details, under the same request id.
            logged = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
            assert "req-42" in logged and "secret internal detail" in logged
    finally:
        await server.stop(0)


@aio
async def test_each_call_gets_a_request_id() -> None:
    server, address = await _serve()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/fashion.v1.Test/Unary")
            a, b = await call(b"rid"), await call(b"rid")
            assert a and b and a != b
            assert await call(b"rid", metadata=(("x-request-id", "mine"),)) == b"mine"
    finally:
        await server.stop(0)


@aio
async def test_error_in_a_stream_ends_it_with_the_status() -> None:
    server, address = await _serve()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.stream_stream("/fashion.v1.Test/Stream")(
                iter([b"a", b"b", b"fail", b"c"])
            )
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for item in call:
                    got.append(item)
            assert got == [b"a", b"b"]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            status = rpc_status.from_call(info.value)
            assert status is not None
            assert dict(error_info(status).metadata) == {"option": "minScore"}
    finally:
        await server.stop(0)


def _assert_malformed(err: grpc.aio.AioRpcError) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "the request is not a valid google.rpc.ErrorInfo message"
    status = rpc_status.from_call(err)
    assert status is not None
    info = error_info(status)
    assert (info.reason, dict(info.metadata)) == (
        "MALFORMED_REQUEST",
        {"messageType": "google.rpc.ErrorInfo"},
    )


@aio
async def test_a_request_that_does_not_parse_is_invalid_argument() -> None:
    """Not gRPC's UNKNOWN quoting the parser (unary), nor INTERNAL (inside a stream)."""
    server, address = await _serve()
    good = error_details_pb2.ErrorInfo(reason="OK").SerializeToString()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            unary = channel.unary_unary("/fashion.v1.Test/ParsedUnary")
            assert await unary(good) == b"OK"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(b"\xff\xff\xff")
            _assert_malformed(info.value)
            stream = channel.stream_stream("/fashion.v1.Test/ParsedStream")
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for item in stream(iter([good, b"\xff\xff\xff"])):
                    got.append(item)
            assert got == [b"OK"]
            _assert_malformed(info.value)
    finally:
        await server.stop(0)


def test_every_kind_has_a_status_code_and_only_answers_written_for_callers_pass() -> None:
    assert set(STATUS_CODES) == set(ErrorKind)
    closed = BatcherClosed("the gateway is shutting down; retry")
    assert as_error(closed) is closed
    assert to_rpc_status(closed).code == grpc.StatusCode.UNAVAILABLE.value[0]
    # Another component's INTERNAL error was not written for callers: generic, with the id.
    token = request_id_var.set("req-7")
    try:
        answer = as_error(BatchResultMismatch("the backend returned 1 results for 2 requests"))
    finally:
        request_id_var.reset(token)
    assert (answer.reason, answer.metadata) == ("INTERNAL", {"requestId": "req-7"})
    assert "backend" not in answer.message
