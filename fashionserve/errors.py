"""The one exception root of fashionserve, free of any transport.

Every error the package raises on purpose is an :class:`Error`. It carries a
:class:`ErrorKind` (what kind of failure, in words a caller understands), a stable
UPPER_SNAKE ``reason``, a message and lowerCamel ``metadata``. Nothing here knows gRPC: the
gateway's error interceptor is the one place that maps a kind to a gRPC status code, and the
command line catches :class:`Error` once, printing ``error: <message>``.

Any other exception escaping a component is a bug, not an answer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorKind(enum.Enum):
    """What failed, as a caller needs to know it (each maps to one gRPC status code)."""

    INVALID_ARGUMENT = "invalid argument"
    """The input itself is wrong (an image, an option, a file): retrying cannot help."""
    FAILED_PRECONDITION = "failed precondition"
    """The input is fine but the state it needs is not there (a missing version, a
    taxonomy that would break callers): fix the state, then retry."""
    NOT_FOUND = "not found"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission denied"
    RESOURCE_EXHAUSTED = "resource exhausted"
    """Too much at once: retry later (``retry_delay`` says when)."""
    UNAVAILABLE = "unavailable"
    """A dependency is down or not ready: retry."""
    DEADLINE_EXCEEDED = "deadline exceeded"
    INTERNAL = "internal"
    """Something failed that the caller cannot fix."""


class Error(Exception):
    """Base class of every error fashionserve raises on purpose.

    ``reason`` is UPPER_SNAKE and stable (callers branch on it); ``metadata`` keys are
    lowerCamel and values strings, as in ``google.rpc.ErrorInfo``; ``retry_delay`` (seconds)
    tells a caller when a retry may succeed. Subclasses set :attr:`kind` and a default
    :attr:`reason`, so that most raise sites only give the message.
    """

    kind: ErrorKind = ErrorKind.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, object] | None = None,
        kind: ErrorKind | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if kind is not None:
            self.kind = kind
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}
        self.retry_delay = retry_delay

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.name}, {self.reason}, {self.message!r})"


class InvalidInput(Error):
    """Something given to a command or a call is wrong: a file, a flag, an image."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class FailedPrecondition(Error):
    """The input is fine, but the state it needs is not."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"
