"""The worker's error hierarchy. The core raises these; only ``api.errors`` knows about gRPC.

Each error carries a neutral :class:`ErrorCode`, a message meant for the caller, a machine
readable ``reason`` (UPPER_SNAKE) and optional ``field`` (which request field was wrong) and
``retry_after`` (seconds, for overload answers).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    UNIMPLEMENTED = "unimplemented"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class WorkerError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL
    default_reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})


class InvalidArgument(WorkerError):
    code = ErrorCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(WorkerError):
    code = ErrorCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(WorkerError):
    code = ErrorCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(WorkerError):
    code = ErrorCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(WorkerError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(WorkerError):
    code = ErrorCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(WorkerError):
    code = ErrorCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class Unimplemented(WorkerError):
    code = ErrorCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Unavailable(WorkerError):
    code = ErrorCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(WorkerError):
    code = ErrorCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(WorkerError):
    code = ErrorCode.CANCELLED
    default_reason = "CANCELLED"


class InternalError(WorkerError):
    code = ErrorCode.INTERNAL
    default_reason = "INTERNAL"
