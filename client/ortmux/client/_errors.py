"""The client's one exception, :class:`OrtmuxError`, keeping the call's ``grpc.StatusCode`` and
the worker's rich error details (reason, field violations, retry delay)."""

from __future__ import annotations

import dataclasses

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class OrtmuxError(Exception):
    """Any failure of an ortmux call.

    ``code`` is the ``grpc.StatusCode``; ``message`` is the worker's message. When the worker sent
    rich details: ``reason`` (e.g. "INVALID_ARGUMENT"), ``field_violations`` (which request field
    was wrong) and ``retry_after`` (seconds to wait before retrying).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.field_violations = field_violations
        self.retry_after = retry_after

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> OrtmuxError:
        """From a google.rpc.Status (unary trailers, or an in-band stream error)."""
        code = _STATUS_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
        reason = ""
        violations: list[FieldViolation] = []
        retry_after = None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
        return cls(
            code, status.message, reason=reason, field_violations=tuple(violations), retry_after=retry_after
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> OrtmuxError:
        """From the error a sync or asyncio stub raised, decoding google.rpc details when present."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else None) or str(error)
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == _DETAILS_KEY:
                status = status_pb2.Status.FromString(value)
                if status.code == code.value[0]:
                    return cls.from_status(status)
        return cls(code, message)


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}
