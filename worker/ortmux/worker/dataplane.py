"""What the worker does, free of gRPC: list and describe models, run inference requests."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ortmux.worker.adapters.lora_feeds import RowSpan
from ortmux.worker.adapters.manager import AdapterInfo, AdapterManager, UploadHeader
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.registry import ModelRegistry
from ortmux.worker.observability.metrics import Metrics


@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    model: str
    inputs: Mapping[str, np.ndarray]
    adapter: str = ""
    output_names: Sequence[str] = ()
    request_id: str = ""
    priority: int = 0


@dataclasses.dataclass(frozen=True)
class InferenceResult:
    model: str
    adapter: str
    outputs: dict[str, np.ndarray]
    request_id: str
    queue_seconds: float
    compute_seconds: float
    batch_rows: int


class DataPlane:
    def __init__(self, models: ModelRegistry, adapters: AdapterManager, metrics: Metrics) -> None:
        self.models = models
        self.adapters = adapters
        self.metrics = metrics

    def list_models(self) -> list[BaseModel]:
        return self.models.all()

    def loading_models(self) -> list[str]:
        return self.models.loading()

    def get_model(self, name: str) -> BaseModel:
        return self.models.get(name)

    def infer(self, request: InferenceRequest) -> InferenceResult:
        model = self.models.get(request.model)
        started = time.perf_counter()
        if request.adapter:
            with self.adapters.use(model.name, request.adapter) as adapter:
                spans = [RowSpan(0, model.batch_size(request.inputs), adapter.lora)] if adapter.lora else []
                outputs = model.run(
                    request.inputs,
                    request.output_names,
                    session=adapter.session,
                    lora_spans=spans,
                    extra_feeds=adapter.feeds,
                )
        else:
            outputs = model.run(request.inputs, request.output_names)
        compute_seconds = time.perf_counter() - started
        self.metrics.observe_inference(model.name, compute_seconds, _rows(request.inputs))
        return InferenceResult(
            model=model.name,
            adapter=request.adapter,
            outputs=outputs,
            request_id=request.request_id,
            queue_seconds=0.0,
            compute_seconds=compute_seconds,
            batch_rows=_rows(request.inputs),
        )

    def register_adapter(self, header: UploadHeader, chunks: Iterable[bytes]) -> AdapterInfo:
        payload, pending = self.adapters.receive(header, chunks)
        return self.adapters.register(header, payload, pending)

    def register_adapter_from_path(self, header: UploadHeader, path: Path) -> AdapterInfo:
        return self.adapters.register_from_path(header, path)

    def get_adapter(self, model: str, adapter_id: str) -> AdapterInfo:
        return self.adapters.get(model, adapter_id)

    def list_adapters(self, model: str = "") -> list[AdapterInfo]:
        return self.adapters.list(model)

    def delete_adapter(self, model: str, adapter_id: str) -> None:
        self.adapters.delete(model, adapter_id)


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows of a request: the leading dimension of its first input (1 for scalars)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0
