"""Bookkeeping of one inference stream, shared by the sync and asyncio clients.

Assigns request ids, matches answers to requests, and, in ordered mode, holds answers back until
every earlier one is in. A request the client cannot encode never leaves: it is answered here
with its INVALID_ARGUMENT error, in its place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from ortmux.client import _convert
from ortmux.client._errors import OrtmuxError
from ortmux.client._types import InferRequest, InferResult
from ortmux.v1 import inference_pb2


class StreamBook:
    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self._lock = threading.Lock()
        self._sent = 0
        self._positions: dict[str, int] = {}
        self._held: dict[int, tuple[InferResult, bool]] = {}  # ordered: waiting for earlier answers
        self._local: list[tuple[int, InferResult, bool]] = []  # answered here, not handed out yet
        self._next = 0

    def encode(self, request: Any) -> inference_pb2.InferRequest | None:
        """The message for the next request, or None when it was answered locally (an error)."""
        if not isinstance(request, InferRequest):
            raise TypeError(f"stream_infer takes InferRequest objects, got {type(request).__name__}")
        with self._lock:
            position = self._sent
            self._sent += 1
            request_id = request.request_id if request.request_id is not None else str(position)
            if request_id in self._positions:
                raise ValueError(f"request id {request_id!r} is already in flight on this stream")
            try:
                message = _convert.infer_request(
                    request.model,
                    request.inputs,
                    request.adapter,
                    request.output_names,
                    request_id,
                    priority=request.priority,
                )
            except (OrtmuxError, TypeError) as exc:
                error = exc if isinstance(exc, OrtmuxError) else _invalid(str(exc))
                self._local.append((position, InferResult(request_id, error=error), False))
                return None
            self._positions[request_id] = position
            return message

    def answer(self, message: inference_pb2.InferStreamResponse) -> tuple[list[InferResult], int]:
        """Results ready to hand out after ``message`` (and any answered locally meanwhile), and
        how many of them were in flight (the window slots they free)."""
        if message.WhichOneof("result") == "error":
            result = InferResult(message.request_id, error=OrtmuxError.from_status(message.error))
        else:
            try:
                result = InferResult(message.request_id, outputs=_convert.infer_outputs(message.response))
            except OrtmuxError as error:
                result = InferResult(message.request_id, error=error)
        with self._lock:
            position = self._positions.pop(message.request_id, None)
            if position is None:
                raise OrtmuxError(
                    grpc.StatusCode.INTERNAL,
                    f"the worker answered request id {message.request_id!r}, which is not in flight",
                )
            return self._release([(position, result, True)])

    def flush(self) -> list[InferResult]:
        """Results answered locally and not handed out yet (call when the stream has ended)."""
        with self._lock:
            return self._release([])[0]

    @property
    def unanswered(self) -> int:
        with self._lock:
            return len(self._positions)

    def _release(self, new: list[tuple[int, InferResult, bool]]) -> tuple[list[InferResult], int]:
        new = self._local + new
        self._local = []
        if not self.ordered:
            return [result for _, result, _ in new], sum(sent for _, _, sent in new)
        for position, result, sent in new:
            self._held[position] = (result, sent)
        ready, freed = [], 0
        while self._next in self._held:
            result, sent = self._held.pop(self._next)
            ready.append(result)
            freed += sent
            self._next += 1
        return ready, freed


def handed_out(results: list[InferResult], raise_errors: bool) -> Iterator[InferResult]:
    for result in results:
        if raise_errors and result.error is not None:
            raise result.error
        yield result


def _invalid(message: str) -> OrtmuxError:
    return OrtmuxError(grpc.StatusCode.INVALID_ARGUMENT, message)
