"""What each model served: per-model counters for statistics endpoints (Triton's
ModelStatistics), and the Prometheus metrics of answers and batched runs."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.scheduler.request import QueuedRequest


@dataclasses.dataclass
class ServingCounters:
    """What a model served since the worker started (times in ns)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    rows: int = 0
    last_inference_ms: int = 0


class ServingStatistics:
    """Counts answers and batched runs per model, in the counters and the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._counters: dict[str, ServingCounters] = {}
        self._lock = threading.Lock()

    def counters(self, model: str) -> ServingCounters:
        """A copy of what ``model`` served (zeros for a model that served nothing)."""
        with self._lock:
            return dataclasses.replace(self._counters.get(model) or ServingCounters())

    def answered(self, model: str, tenant: str, code: str, seconds: float) -> None:
        """A request was answered with ``code`` ("OK" or a status code name); ``model`` is empty
        for a request naming no served model (never a label value)."""
        self.metrics.observe_request(model, tenant, code, seconds)
        if not model:
            return
        with self._lock:
            counters = self._counters.setdefault(model, ServingCounters())
            if code == "OK":
                counters.success_count += 1
                counters.success_ns += int(seconds * 1e9)
            else:
                counters.fail_count += 1
                counters.fail_ns += int(seconds * 1e9)

    def batch_observer(self, model: str) -> Callable[[Sequence[QueuedRequest], float, float], None]:
        """What a model's batcher calls after each run: its rows, their mix and their waits."""

        def observe(requests: Sequence[QueuedRequest], started: float, finished: float) -> None:
            rows = sum(request.rows for request in requests)
            adapters = len({id(request.lora) for request in requests if request.lora})
            base_rows = any(not request.lora for request in requests)
            exclusive = any(request.exclusive for request in requests)
            self.metrics.observe_batch(model, rows, adapters, finished - started, base_rows, exclusive)
            waited = [started - request.enqueued_at for request in requests]
            for seconds in waited:
                self.metrics.queue_seconds.labels(model).observe(seconds)
            with self._lock:
                counters = self._counters.setdefault(model, ServingCounters())
                counters.queue_count += len(waited)
                counters.queue_ns += int(sum(waited) * 1e9)
                counters.compute_count += 1
                counters.compute_ns += int((finished - started) * 1e9)
                counters.rows += rows
                counters.last_inference_ms = int(time.time() * 1000)

        return observe
