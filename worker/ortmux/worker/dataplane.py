"""What the worker does, free of gRPC: list and describe models, run inference requests."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import numpy as np

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.registry import ModelRegistry
from ortmux.worker.errors import Unimplemented
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
    def __init__(self, models: ModelRegistry, metrics: Metrics) -> None:
        self.models = models
        self.metrics = metrics

    def list_models(self) -> list[BaseModel]:
        return self.models.all()

    def loading_models(self) -> list[str]:
        return self.models.loading()

    def get_model(self, name: str) -> BaseModel:
        return self.models.get(name)

    def infer(self, request: InferenceRequest) -> InferenceResult:
        model = self.models.get(request.model)
        if request.adapter:
            raise Unimplemented(
                f"adapter '{request.adapter}' was asked for, but this worker version serves base models "
                "only; leave adapter empty",
                field="adapter",
            )
        started = time.perf_counter()
        outputs = model.run(request.inputs, request.output_names)
        compute_seconds = time.perf_counter() - started
        self.metrics.observe_inference(model.name, compute_seconds, _rows(request.inputs))
        return InferenceResult(
            model=model.name,
            adapter="",
            outputs=outputs,
            request_id=request.request_id,
            queue_seconds=0.0,
            compute_seconds=compute_seconds,
            batch_rows=_rows(request.inputs),
        )


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows of a request: the leading dimension of its first input (1 for scalars)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 0
