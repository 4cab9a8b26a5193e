"""Bounds every request is held to, whichever front end sent it (native gRPC, the Open Inference
Protocol, the HTTP API): the length of the names it carries and of its stop strings. The front
ends convert; the core checks, once, with these."""

from __future__ import annotations

from ortmux.worker.errors import InvalidArgument

MAX_NAME_CHARS = 256  # model, adapter, request id, tensor and output names
MAX_STOP = 16  # stop strings, and stop token ids, of one generation
MAX_STOP_CHARS = 256  # characters of one stop string


def check_length(value: str, field: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"{field} is {len(value)} characters long, over the limit of {MAX_NAME_CHARS}", field=field
        )
