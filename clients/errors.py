"""The errors of the client library: :class:`FashionServeError`, the one a failed call
raises, and :class:`ClientSetupError`, raised when a client is created as it must not be.

The gateway returns every error as a ``google.rpc.Status`` with exactly one
``google.rpc.ErrorInfo`` (domain ``fashionserve``, an UPPER_SNAKE reason, lowerCamel
metadata keys), carried in the ``grpc-status-details-bin`` trailer. This module unpacks it
once, for both the sync and the asyncio client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is imported by the calls, so the command line can catch this cheaply
    import grpc


class FashionServeError(Exception):
    """A call to the fashion analysis service failed.

    Attributes:
        code: the gRPC status code (``code_name`` is its name, for example ``UNAUTHENTICATED``).
        message: the developer-facing message the server sent.
        reason: the ``ErrorInfo`` reason (UPPER_SNAKE), or ``""`` when the failure did not
            come from the gateway (a connection refused, a deadline passed on the client).
        domain: the ``ErrorInfo`` domain, ``"fashionserve"`` for the gateway's errors.
        metadata: the ``ErrorInfo`` metadata (lowerCamel keys).
        attempts: how many attempts were made (more than one when the call was retried).
        retry_delay: seconds the server asked to wait before retrying (its
            ``google.rpc.RetryInfo``, sent with quota and overload refusals), else None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        attempts: int = 1,
        retry_delay: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.attempts = attempts
        self.retry_delay = retry_delay
        super().__init__(str(self))

    @property
    def code_name(self) -> str:
        """The status code's name, for example ``INVALID_ARGUMENT``."""
        return str(self.code.name)

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code_name}{reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, attempts: int = 1) -> FashionServeError:
        """Build from a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        call: Any = error  # both carry code(), details() and trailing_metadata()
        code: grpc.StatusCode = call.code()
        message: str = call.details() or ""
        reason, domain, metadata = "", "", {}
        retry_delay: float | None = None
        try:
            status = rpc_status.from_call(call)
        except ValueError:
            # The trailer disagrees with the call's status: trust the call, drop the trailer.
            status = None
        if status is not None:
            message = status.message or message
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
        return cls(
            code,
            message,
            reason,
            domain=domain,
            metadata=metadata,
            attempts=attempts,
            retry_delay=retry_delay,
        )


class ClientSetupError(ValueError):
    """A client cannot be created as asked, before any call: it would send an API key or a
    bearer token in plaintext to a machine other than this one, or a TLS file cannot be
    read."""
