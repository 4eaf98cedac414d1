"""The one place where the gateway's errors become gRPC statuses.

Domain errors (:mod:`fashionserve.gateway.failures`, and every other
:class:`fashionserve.errors.Error`) carry a transport-free :class:`~fashionserve.errors.ErrorKind`;
:data:`STATUS_CODES` maps each kind to one gRPC status code. :class:`ErrorInterceptor` turns
an error into a ``google.rpc.Status`` carrying exactly one ``google.rpc.ErrorInfo`` (domain
``fashionserve``), and a ``google.rpc.RetryInfo`` when the error says when to retry. Any
other exception is a bug: it is logged with the request id and the caller gets INTERNAL with
a generic message quoting that id, never the exception text.

(Google AIP-193; grpc ``examples/python/errors``.)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fashionserve.errors import Error, ErrorKind
from fashionserve.gateway.failures import as_error, request_id_var
from fashionserve.gateway.handlers import (
    SERVICE_PREFIX,
    guard_requests,
    metadata_value,
    wrap_handler,
)

DOMAIN = "fashionserve"
REQUEST_ID_HEADER = "x-request-id"

log = logging.getLogger(__name__)

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
"""The gRPC status code of each kind of error."""

# Failures of the service rather than of the caller: logged as warnings.
_SERVER_SIDE = frozenset({ErrorKind.INTERNAL, ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED})


def status_code(err: Error) -> grpc.StatusCode:
    """The gRPC status code of ``err``."""
    return STATUS_CODES[err.kind]


def to_rpc_status(err: Error) -> status_pb2.Status:
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
    code: int = status_code(err).value[0]
    return status_pb2.Status(code=code, message=err.message, details=details)


def to_grpc_status(err: Error) -> grpc.Status:
    """The status as grpc sends it: code, details and the binary status trailer."""
    return rpc_status.to_status(to_rpc_status(err))


async def abort(context: grpc.aio.ServicerContext, err: Error) -> None:
    """End the call with ``err`` (raises, as ``context.abort`` does). The trailing
    metadata echoes the request id: abort's metadata replaces any set before."""
    status = to_grpc_status(err)
    trailers = (*status.trailing_metadata, (REQUEST_ID_HEADER, request_id_var.get()))
    await context.abort(status.code, status.details, trailers)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Assigns each call of our service a request id (echoed in the trailing metadata
    ``x-request-id``) and maps its errors to statuses, telling ``on_reported`` (metrics)
    about each.

    It must come before the interceptors whose errors it maps (authentication).
    """

    def __init__(self, on_reported: Callable[[Error], None] | None = None) -> None:
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
            err = as_error(exc)  # logs unexpected exceptions with their traceback
            if err is exc:
                level = logging.WARNING if err.kind in _SERVER_SIDE else logging.INFO
                log.log(level, "request %s %s: %s %s", rid, method, err.reason, err.message)
            if self.on_reported is not None:
                self.on_reported(err)
            await abort(context, err)

        return wrap_handler(guard_requests(handler), before=echo_request_id, on_error=on_error)
