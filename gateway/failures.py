"""The gateway's domain errors, free of gRPC.

Every error a caller can see is a :class:`fashionserve.errors.Error`: a transport-free
:class:`~fashionserve.errors.ErrorKind`, an UPPER_SNAKE reason, a developer-facing message
and lowerCamel metadata. The gateway's own derive from :class:`GatewayError`, one subclass
per kind it reports; the batcher's (shutting down, a deadline passed in the queue) derive
from the root directly. :class:`fashionserve.gateway.errors.ErrorInterceptor` is the one
place that turns a kind into a gRPC status code; inside BatchAnalyze and StreamAnalyze the
servicer makes the same fields an ``ItemError``.

No message or metadata names an internal address (a Triton's URL, a pod's IP) or quotes
Triton's own error text: those are logged with the request ids (:data:`request_id_var`,
:data:`batch_requests_var`) where the failure happens.

Any other exception is a bug: :func:`as_error` logs it with the request id and puts the
generic INTERNAL error, quoting that id and never the exception text, in its place (so does
another component's INTERNAL error, such as the batcher's BatchResultMismatch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextvars import ContextVar

from fashionserve.errors import Error, ErrorKind

log = logging.getLogger(__name__)

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
"""The id of the request being served (from ``x-request-id`` or generated); logs quote it."""

batch_requests_var: ContextVar[str] = ContextVar("batch_requests", default="-")
"""The ids of the requests whose images an ensemble call carries, comma-separated (set for
the call by the batched inference path). A failed call's details (a Triton's address, its
own error text) are logged with them, never put in an answer: callers need not learn the
fleet's layout."""


class GatewayError(Error):
    """Base class of every error reported to a caller.

    Raise sites name the reason first, as callers branch on it: ``Unavailable("NOT_SERVING",
    "the pipeline is not serving: ...")``. ``retry_delay`` (seconds) tells the caller when a
    retry may succeed (a ``google.rpc.RetryInfo``).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        metadata: Mapping[str, object] | None = None,
        *,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, retry_delay=retry_delay)


class InvalidArgument(GatewayError):
    """The request itself is wrong: a bad image, an option out of range."""

    kind = ErrorKind.INVALID_ARGUMENT


class Unauthenticated(GatewayError):
    """No API key, or one that does not match."""

    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    """The key is valid but lacks the scope the call needs."""

    kind = ErrorKind.PERMISSION_DENIED


class ResourceExhausted(GatewayError):
    """Too much at once."""

    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(GatewayError):
    """Triton is down or not ready, the served model does not match, or shutting down."""

    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    """The ensemble did not answer in time."""

    kind = ErrorKind.DEADLINE_EXCEEDED


class InternalError(GatewayError):
    """Something failed that the caller cannot fix; details are in the gateway's log."""

    kind = ErrorKind.INTERNAL


def internal_error(request_id: str | None = None) -> InternalError:
    """The generic INTERNAL error: no exception text leaks, the request id is quoted."""
    rid = request_id or request_id_var.get()
    return InternalError(
        "INTERNAL",
        f"internal error; the gateway logged it with request id {rid}",
        {"requestId": rid},
    )


def as_error(exc: BaseException) -> Error:
    """``exc`` if it is an answer for the caller: a :class:`GatewayError`, or another
    :class:`~fashionserve.errors.Error` of a kind other than INTERNAL. Anything else (an
    unexpected exception, or another component's INTERNAL error, whose text was not written
    for callers) is logged and replaced by the generic INTERNAL error: the only place an
    unexpected exception becomes an answer."""
    if isinstance(exc, GatewayError) or (
        isinstance(exc, Error) and exc.kind is not ErrorKind.INTERNAL
    ):
        return exc
    rid = request_id_var.get()
    log.error(
        "unexpected error serving request %s", rid, exc_info=(type(exc), exc, exc.__traceback__)
    )
    return internal_error(rid)
