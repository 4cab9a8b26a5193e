"""Running a batch of queued requests as one ONNX Runtime run on a base model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.lora.feeds import FeedBuffers, RowSpan
from ortmux.worker.errors import InvalidArgument
from ortmux.worker.scheduler.batcher import RunBatch
from ortmux.worker.scheduler.request import QueuedRequest


def batch_runner(
    model: BaseModel, buffers: FeedBuffers | None = None, after_run: Callable[[], None] = lambda: None
) -> RunBatch:
    """Concatenate the requests' rows, give each its LoRA factors, run once, split the outputs.

    Requests of one adapter are placed side by side, so their rows share one span of factors
    (one copy, or views when every row uses that adapter). Feed arrays are
    reused from ``buffers`` (the batcher runs one batch at a time).

    When a batch of several is refused by the model (a bad row the request checks cannot see,
    e.g. a token id out of range), each request runs alone, so only the culprit gets the error.
    """

    buffers = buffers or FeedBuffers()

    def run_one(request: QueuedRequest) -> dict[str, np.ndarray]:
        spans = [RowSpan(0, request.rows, request.lora)] if request.lora else []
        return model.run(
            request.inputs, request.output_names, lora_spans=spans, extra_feeds=request.feeds, buffers=buffers
        )

    def run(requests: Sequence[QueuedRequest]) -> list[dict[str, np.ndarray] | Exception]:
        try:
            return run_placed(requests)
        finally:
            after_run()  # the memory guard: hand the arena's spare memory back past its level

    def run_placed(requests: Sequence[QueuedRequest]) -> list[dict[str, np.ndarray] | Exception]:
        if len(requests) == 1:
            return [run_one(requests[0])]
        order = sorted(range(len(requests)), key=lambda index: id(requests[index].lora))
        results = _run_many([requests[index] for index in order])
        placed: list[dict[str, np.ndarray] | Exception] = [None] * len(requests)  # type: ignore[list-item]
        for index, result in zip(order, results, strict=True):
            placed[index] = result
        return placed

    def _run_many(requests: Sequence[QueuedRequest]) -> list[dict[str, np.ndarray] | Exception]:
        names = list(requests[0].inputs)
        inputs = {name: np.concatenate([r.inputs[name] for r in requests]) for name in names}
        spans, offset = [], 0
        for request in requests:
            if request.lora:
                spans.append(RowSpan(offset, offset + request.rows, request.lora))
            offset += request.rows
        try:
            outputs = model.run(inputs, requests[0].output_names, lora_spans=spans, buffers=buffers)
        except InvalidArgument:
            results: list[dict[str, np.ndarray] | Exception] = []
            for request in requests:
                try:
                    results.append(run_one(request))
                except InvalidArgument as error:
                    results.append(error)
            return results
        split, offset = [], 0
        for request in requests:
            split.append({name: value[offset : offset + request.rows] for name, value in outputs.items()})
            offset += request.rows
        return split

    return run
