"""The request path: an inference request checked, admitted (memory, quotas), given its adapter,
queued in its model's batcher and answered through a future; and draining, when the worker stops.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack

import numpy as np

from ortmux.worker.adapters.local_store import DEFAULT_TENANT
from ortmux.worker.adapters.manager import AdapterManager
from ortmux.worker.audit import outcome
from ortmux.worker.dataplane.models import ModelManagement
from ortmux.worker.dataplane.statistics import ServingStatistics
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.limits import request_tokens
from ortmux.worker.engine.lora.feeds import DEFAULT_FEED_MEMORY_BYTES, FeedBuffers, FeedPool
from ortmux.worker.engine.memory import MemoryGuard
from ortmux.worker.engine.specs import validate_inputs, validate_output_names
from ortmux.worker.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from ortmux.worker.quotas import RequestQuotas
from ortmux.worker.scheduler.batcher import Batcher, BatchLimits
from ortmux.worker.scheduler.request import BatchResult, QueuedRequest
from ortmux.worker.scheduler.runner import batch_runner


@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    model: str
    inputs: Mapping[str, np.ndarray]
    adapter: str = ""
    output_names: Sequence[str] = ()
    request_id: str = ""
    priority: int = 0
    tenant: str = ""
    deadline: float | None = None  # time.monotonic() value
    is_active: Callable[[], bool] = lambda: True


@dataclasses.dataclass(frozen=True)
class InferenceResult:
    model: str
    adapter: str
    outputs: dict[str, np.ndarray]
    request_id: str
    queue_seconds: float
    compute_seconds: float
    batch_rows: int


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What the request path admits, besides each model's own limits."""

    batching: BatchLimits = dataclasses.field(default_factory=BatchLimits)
    mix_adapters: bool = True
    max_request_elements: int = 1 << 26


class RequestPath:
    """Requests from submission to answer, one batcher per model."""

    def __init__(
        self,
        models: ModelManagement,
        adapters: AdapterManager,
        statistics: ServingStatistics,
        limits: RequestLimits | None = None,
        quotas: RequestQuotas | None = None,
        feed_pool: FeedPool | None = None,
        memory: MemoryGuard | None = None,
    ) -> None:
        self.models = models
        self.adapters = adapters
        self.statistics = statistics
        self.limits = limits or RequestLimits()
        self.quotas = quotas or RequestQuotas()
        self.feed_pool = feed_pool or FeedPool(DEFAULT_FEED_MEMORY_BYTES)
        self.memory = memory or MemoryGuard(0)
        self._batchers: dict[str, Batcher] = {}
        self._feed_buffers: dict[str, FeedBuffers] = {}
        self._lock = threading.Lock()
        self._drain_callbacks: set[Callable[[], None]] = set()
        self.draining = False

    # -- batchers ----------------------------------------------------------------------------------

    def batcher(self, model: BaseModel) -> Batcher:
        with self._lock:
            batcher = self._batchers.get(model.name)
            if batcher is None:
                buffers = self._feed_buffers[model.name] = FeedBuffers(self.feed_pool)
                batcher = Batcher(
                    model.name,
                    batch_runner(model, buffers, self.memory.after_run),
                    self.limits.batching,
                    self.statistics.batch_observer(model.name),
                )
                self._batchers[model.name] = batcher
            return batcher

    def batchers(self) -> list[Batcher]:
        with self._lock:
            return list(self._batchers.values())

    def close_model(self, name: str) -> None:
        """The model no longer serves: its queue closes once what it holds has run."""
        with self._lock:
            batcher = self._batchers.pop(name, None)
            buffers = self._feed_buffers.pop(name, None)
        if batcher is not None:
            batcher.close()
        if buffers is not None:
            buffers.close()

    def close(self) -> None:
        """Stop taking requests; queued ones still run."""
        for batcher in self.batchers():
            batcher.close()

    # -- draining ----------------------------------------------------------------------------------

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the worker starts shutting down (at once if it has); returns a
        function that forgets it."""
        with self._lock:
            draining = self.draining
            self._drain_callbacks.add(callback)
        if draining:
            callback()
        return lambda: self._drain_callbacks.discard(callback)

    def drain(self) -> None:
        """The worker is shutting down: open streams stop taking requests and answer what they took."""
        with self._lock:
            self.draining = True
            callbacks = list(self._drain_callbacks)
        for callback in callbacks:
            callback()

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, request: InferenceRequest) -> Future[InferenceResult]:
        """Validate and queue a request in its model's batcher; the future completes with its
        batch. Invalid requests raise here, before anything is queued. Every request is counted
        once, with its outcome, when it is answered."""
        started = time.perf_counter()
        tenant = request.tenant or DEFAULT_TENANT
        model_label = ""  # a name no model has never becomes a label value
        admitted = False
        try:
            model = self.models.get(request.model)
            model_label = model.name
            self._check_size(request)
            self.memory.admit()
            self.quotas.admit(tenant)
            admitted = True
            future = self._queue(model, request, tenant)
        except Exception as error:
            if admitted:
                self.quotas.release(tenant)
            self.statistics.answered(model_label, tenant, outcome(error), time.perf_counter() - started)
            raise
        in_flight = self.statistics.metrics.requests_in_flight.labels(model.name)
        in_flight.inc()

        def answered(done: Future[InferenceResult]) -> None:
            in_flight.dec()
            self.quotas.release(tenant)
            code = outcome(done.exception())
            self.statistics.answered(model.name, tenant, code, time.perf_counter() - started)

        future.add_done_callback(answered)
        return future

    def infer(self, request: InferenceRequest) -> InferenceResult:
        """Submit a request and wait for the batch that carries it."""
        future = self.submit(request)
        timeout = None if request.deadline is None else max(request.deadline - time.monotonic(), 0) + 1.0
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise DeadlineExceeded("the request's deadline passed before its batch ran") from None

    def _check_size(self, request: InferenceRequest) -> None:
        elements = sum(array.size for array in request.inputs.values())
        if elements > self.limits.max_request_elements:
            raise ResourceExhausted(
                f"the request carries {elements} tensor elements, over the limit of "
                f"{self.limits.max_request_elements} (max_request_elements)",
                field="inputs",
            )

    def _queue(self, model: BaseModel, request: InferenceRequest, tenant: str) -> Future[InferenceResult]:
        validate_inputs(model.name, model.inputs, request.inputs)
        model.limits.check(model.name, model.inputs, request.inputs)
        tokens = request_tokens(model.inputs, request.inputs)
        most = self.limits.batching.max_batch_tokens
        if tokens > most:
            raise InvalidArgument(
                f"the request is {tokens} tokens (rows x sequence), over the {most} one run of the "
                "worker takes (max_batch_tokens); send it in smaller requests",
                field="inputs",
            )
        names = tuple(validate_output_names(model.name, model.outputs, request.output_names))
        held = ExitStack()  # the adapter stays in use (never deleted) until the request is answered
        try:
            adapter = (
                held.enter_context(self.adapters.use(model.name, request.adapter, tenant))
                if request.adapter
                else None
            )
            queued = QueuedRequest(
                inputs=request.inputs,
                output_names=names,
                lora=adapter.lora if adapter else {},
                feeds=adapter.feeds if adapter else {},
                fairness_key=fairness_key(request.tenant, request.adapter),
                priority=request.priority,
                deadline=request.deadline,
                is_active=request.is_active,
                batchable=model.batchable,
                group="" if self.limits.mix_adapters else request.adapter,
                exclusive=bool(adapter and adapter.exclusive),
                tokens=tokens,
            )
            self.batcher(model).submit(queued)
        except BaseException:
            held.close()
            raise
        answer: Future[InferenceResult] = Future()

        def finish(done: Future[BatchResult]) -> None:
            held.close()
            error = done.exception()
            if error is not None:
                answer.set_exception(error)
                return
            result = done.result()
            self.statistics.metrics.observe_inference(model.name, result.compute_seconds, queued.rows)
            answer.set_result(
                InferenceResult(
                    model=model.name,
                    adapter=request.adapter,
                    outputs=result.outputs,
                    request_id=request.request_id,
                    queue_seconds=result.queue_seconds,
                    compute_seconds=result.compute_seconds,
                    batch_rows=result.batch_rows,
                )
            )

        queued.future.add_done_callback(finish)
        return answer


def fairness_key(tenant: str, adapter: str) -> str:
    """What the scheduler's queues draw round-robin across (requests and generations alike):
    tenants when the worker has them, else adapters (a single-tenant worker's callers are all
    the default tenant)."""
    if tenant and tenant != DEFAULT_TENANT:
        return tenant
    return adapter
