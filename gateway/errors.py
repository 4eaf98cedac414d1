"""One error model, mapped to gRPC in one place.

Every error a caller can see is a :class:`GatewayError`: a gRPC status code, an UPPER_SNAKE
reason, a developer-facing message and lowerCamel metadata. :class:`ErrorInterceptor`
turns one into a ``google.rpc.Status`` carrying exactly one ``google.rpc.ErrorInfo``
(domain ``fashionserve``); inside BatchAnalyze and StreamAnalyze the same fields become an
``ItemError``. Any other exception is a bug: it is logged with the request id and the
caller gets INTERNAL with a generic message quoting that id, never the exception text.

(Google AIP-193; grpc ``examples/python/errors``.)
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "fashionserve"
REQUEST_ID_HEADER = "x-request-id"
SERVICE_PREFIX = "/fashion.v1."

log = logging.getLogger(__name__)

Around = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]
"""What :func:`wrap_handler` runs a behaviour inside, given the call's context."""

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
"""The id of the request being served (from ``x-request-id`` or generated); logs quote it."""


class GatewayError(Exception):
    """Base class of every error reported to a caller.

    ``reason`` is UPPER_SNAKE and stable (clients branch on it); ``metadata`` keys are
    lowerCamel and values are strings, as in ``google.rpc.ErrorInfo``. ``retry_delay``
    (seconds) tells the caller when a retry may succeed (a ``google.rpc.RetryInfo``).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        reason: str,
        message: str,
        metadata: Mapping[str, object] | None = None,
        *,
        code: grpc.StatusCode | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.retry_delay = retry_delay
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason}, {self.message!r})"

    @property
    def code_number(self) -> int:
        """The ``google.rpc.Code`` number of :attr:`code`."""
        number: int = self.code.value[0]
        return number


class InvalidArgument(GatewayError):
    """The request itself is wrong: a bad image, an option out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(GatewayError):
    """No API key, or one that does not match."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    """The key is valid but lacks the scope the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GatewayError):
    """Too much at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GatewayError):
    """Triton is down or not ready, the served model does not match, or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    """The ensemble did not answer in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(GatewayError):
    """Something failed that the caller cannot fix; details are in the gateway's log."""

    code = grpc.StatusCode.INTERNAL


def internal_error(request_id: str | None = None) -> InternalError:
    """The generic INTERNAL error: no exception text leaks, the request id is quoted."""
    rid = request_id or request_id_var.get()
    return InternalError(
        "INTERNAL",
        f"internal error; the gateway logged it with request id {rid}",
        {"requestId": rid},
    )


def as_gateway_error(exc: BaseException) -> GatewayError:
    """``exc`` if it is a :class:`GatewayError`; otherwise log it and return the generic
    INTERNAL error (the only place an unexpected exception is turned into a status)."""
    if isinstance(exc, GatewayError):
        return exc
    rid = request_id_var.get()
    log.error(
        "unexpected error serving request %s", rid, exc_info=(type(exc), exc, exc.__traceback__)
    )
    return internal_error(rid)


def to_rpc_status(err: GatewayError) -> status_pb2.Status:
    """``google.rpc.Status`` with exactly one ``ErrorInfo``, and a ``RetryInfo`` when the
    error says when to retry."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if err.retry_delay is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(round(err.retry_delay * 1e9))
        details.append(any_pb2.Any())
        details[-1].Pack(retry)
    code = err.code_number if err.code_number in code_pb2.Code.values() else code_pb2.INTERNAL
    return status_pb2.Status(code=code, message=err.message, details=details)


def to_grpc_status(err: GatewayError) -> grpc.Status:
    """The status as grpc sends it: code, details and the binary status trailer."""
    return rpc_status.to_status(to_rpc_status(err))


async def abort(context: grpc.aio.ServicerContext, err: GatewayError) -> None:
    """End the call with ``err`` (raises, as ``context.abort`` does). The trailing
    metadata echoes the request id: abort's metadata replaces any set before."""
    status = to_grpc_status(err)
    trailers = (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id_var.get()))
    await context.abort(status.code, status.details, trailers)


# ----------------------------------------------------------------- handler wrapping
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


_SERVER_SIDE = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
)


def metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    """The first value of invocation metadata ``key``, as text."""
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Assigns each call of our service a request id (echoed in the trailing metadata
    ``x-request-id``) and maps its errors to statuses, telling ``on_reported`` (metrics)
    about each.

    It must come before the interceptors whose errors it maps (authentication).
    """

    def __init__(self, on_reported: Callable[[GatewayError], None] | None = None) -> None:
        self.on_reported = on_reported

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap our service's handlers; health and reflection pass through untouched."""
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return await continuation(handler_call_details)
        given = metadata_value(handler_call_details, REQUEST_ID_HEADER)
        # Keep a caller's id only if it is short and printable: it goes into our logs.
        rid = given if given and len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        # The interceptors and the handler share one contextvars.Context per call
        # (grpc.aio.ServerInterceptor's contract), so this is visible to all of them.
        request_id_var.set(rid)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler

        async def echo_request_id(context: grpc.aio.ServicerContext) -> None:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))

        async def on_error(exc: BaseException, context: grpc.aio.ServicerContext) -> None:
            err = as_gateway_error(exc)  # logs unexpected exceptions with their traceback
            if isinstance(exc, GatewayError):
                level = logging.WARNING if err.code in _SERVER_SIDE else logging.INFO
                log.log(level, "request %s %s: %s %s", rid, method, err.reason, err.message)
            if self.on_reported is not None:
                self.on_reported(err)
            await abort(context, err)

        return wrap_handler(guard_requests(handler), before=echo_request_id, on_error=on_error)
