"""gRPC handler plumbing shared by the gateway's interceptors.

An interceptor of ``grpc.aio`` gets the call's handler and returns one: :func:`wrap_handler`
makes a copy that runs code before the behaviour, around it, or on its errors, for all four
RPC shapes; :func:`refusing_handler` refuses a call without reading its request;
:func:`guard_requests` makes a request that does not parse an error the error interceptor
maps like any other; :func:`metadata_value` reads the caller's metadata.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from fashionserve.gateway.failures import InvalidArgument

SERVICE_PREFIX = "/fashion.v1."
"""Methods of our service start with this; health and reflection do not."""

Around = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]
"""What :func:`wrap_handler` runs a behaviour inside, given the call's context."""


class _Undecodable:
    """A request message that did not parse, carrying the error to raise in its place."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def guard_requests(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` on which a request message that does not parse raises
    INVALID_ARGUMENT (MALFORMED_REQUEST) inside the call, where the error mapping sees it.

    gRPC parses requests before any interceptor code runs and answers a parse failure with
    UNKNOWN quoting the parser's exception (or, inside a stream, the exception reaches the
    handler and would become INTERNAL). So the parser here returns a marker instead of
    raising, and the behaviour raises on meeting it.
    """
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    message_class = getattr(deserializer, "__self__", None)
    name = getattr(getattr(message_class, "DESCRIPTOR", None), "full_name", "request")

    def tolerant(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Undecodable(
                InvalidArgument(
                    "MALFORMED_REQUEST",
                    f"the request is not a valid {name} message",
                    {"messageType": name},
                )
            )

    def checked(request: Any) -> Any:
        if isinstance(request, _Undecodable):
            raise request.error
        return request

    async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            yield checked(request)

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, False),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, True),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attr, factory, streams_in in kinds:
        behavior = getattr(handler, attr)
        if behavior is None:
            continue

        def requests_of(request: Any, streams_in: bool = streams_in) -> Any:
            return checked_stream(request) if streams_in else checked(request)

        if inspect.isasyncgenfunction(behavior):

            async def guarded_gen(
                request: Any, context: grpc.aio.ServicerContext, behavior: Any = behavior
            ) -> AsyncIterator[Any]:
                async for item in behavior(requests_of(request), context):
                    yield item

            guarded: Callable[..., Any] = guarded_gen
        else:

            async def guarded_call(
                request: Any, context: grpc.aio.ServicerContext, behavior: Any = behavior
            ) -> Any:
                return await behavior(requests_of(request), context)

            guarded = guarded_call
        return factory(
            guarded,
            request_deserializer=tolerant,
            response_serializer=handler.response_serializer,
        )
    return handler


def refusing_handler(
    handler: grpc.RpcMethodHandler,
    refuse: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
) -> grpc.RpcMethodHandler:
    """A handler for ``handler``'s method that ends the call with ``refuse(context)``, which
    must raise (an error, or ``context.abort``), without reading the request.

    grpc.aio receives and parses a unary request in full before it calls the behaviour, so
    refusing inside the method's own handler would still cost the whole message (up to
    ``max_message_bytes``) and answer a malformed one with its parse error. This handler
    takes the requests as a stream it never reads: gRPC then holds no more of the body than
    the HTTP/2 flow-control window, and the call ends as soon as ``refuse`` raises.
    """

    async def refused(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        del requests  # never read
        await refuse(context)
        raise AssertionError("refuse() returned instead of ending the call")

    if handler.response_streaming:
        # A coroutine, not a generator: gRPC's reader/writer form of a streaming behaviour.
        return grpc.stream_stream_rpc_method_handler(
            refused, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refused, response_serializer=handler.response_serializer
    )


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    before: Callable[[grpc.aio.ServicerContext], Awaitable[None]] | None = None,
    on_error: Callable[[BaseException, grpc.aio.ServicerContext], Awaitable[None]] | None = None,
    around: Around | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour first awaits ``before(context)`` and sends
    any exception (from ``before`` or the behaviour) to ``on_error``; all of it runs inside
    ``async with around(context)`` (to time or trace the whole call).

    Works for all four RPC shapes, and for streaming behaviours written either as async
    generators or as coroutines that call ``context.write``.
    """
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, factory in kinds:
        behavior = getattr(handler, attr)
        if behavior is None:
            continue
        streams_out = attr.endswith("_stream")
        wrapped = _wrap_behavior(behavior, streams_out, before, on_error, around)
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _wrap_behavior(
    behavior: Callable[..., Any],
    streams_out: bool,
    before: Callable[[grpc.aio.ServicerContext], Awaitable[None]] | None,
    on_error: Callable[[BaseException, grpc.aio.ServicerContext], Awaitable[None]] | None,
    around: Around | None,
) -> Callable[..., Any]:
    def scope(context: grpc.aio.ServicerContext) -> contextlib.AbstractAsyncContextManager[None]:
        return around(context) if around is not None else contextlib.nullcontext()

    async def handle(exc: Exception, context: grpc.aio.ServicerContext) -> None:
        # context.abort raises AbortError: it is how a status leaves, not an error to map.
        if on_error is None or isinstance(exc, grpc.aio.AbortError):
            raise exc
        await on_error(exc, context)
        raise exc

    if streams_out and inspect.isasyncgenfunction(behavior):

        async def stream_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(context):
                try:
                    if before is not None:
                        await before(context)
                    async for item in behavior(request, context):
                        yield item
                except Exception as exc:
                    await handle(exc, context)

        return stream_gen

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with scope(context):
            try:
                if before is not None:
                    await before(context)
                return await behavior(request, context)
            except Exception as exc:
                await handle(exc, context)

    return unary


def metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    """The first value of invocation metadata ``key``, as text."""
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None
