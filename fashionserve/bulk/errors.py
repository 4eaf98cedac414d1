"""What ``fashionserve batch`` raises on purpose: :class:`fashionserve.errors.Error` subclasses."""

from __future__ import annotations

from fashionserve.errors import Error, ErrorKind, FailedPrecondition, InvalidInput


class InputError(InvalidInput):
    """The input cannot be listed: a missing file, an unknown layout, a missing column."""

    reason = "BAD_BULK_INPUT"


class DuplicateIds(InvalidInput):
    """The input names some id more than once; nothing was processed."""

    reason = "DUPLICATE_IDS"


class OutputMismatch(FailedPrecondition):
    """The output directory belongs to another run (another input, shard or options)."""

    reason = "OUTPUT_OF_ANOTHER_RUN"


class OutputFormatError(FailedPrecondition):
    """A bulk output directory is not in a format this version reads."""

    reason = "BAD_BULK_OUTPUT"


class GatewayUnavailable(Error):
    """The gateway stayed unavailable through every retry: the run stopped, resumable."""

    kind = ErrorKind.UNAVAILABLE
    reason = "GATEWAY_UNAVAILABLE"


class CallRefused(FailedPrecondition):
    """The gateway refused a call for a reason that is not the image's (a bad API key...)."""

    reason = "GATEWAY_REFUSED"
