"""What the worker does, free of gRPC: list and describe models, run inference requests."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ortmux.worker.adapters.manager import AdapterInfo, AdapterManager, UploadHeader, UploadTrailer
from ortmux.worker.adapters.store import DEFAULT_TENANT
from ortmux.worker.audit import audit
from ortmux.worker.auth import Identity
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.limits import request_tokens
from ortmux.worker.engine.lora.feeds import DEFAULT_FEED_MEMORY_BYTES, FeedBuffers, FeedPool
from ortmux.worker.engine.memory import MemoryGuard
from ortmux.worker.engine.registry import ModelRegistry
from ortmux.worker.engine.specs import validate_inputs, validate_output_names
from ortmux.worker.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OrtmuxError,
    PermissionDenied,
    ResourceExhausted,
)
from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.quotas import RequestQuotas
from ortmux.worker.scheduler.batcher import Batcher, BatchLimits
from ortmux.worker.scheduler.request import BatchResult, QueuedRequest
from ortmux.worker.scheduler.runner import batch_runner

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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


@dataclasses.dataclass
class ModelStats:
    """What a model served since the worker started, for statistics endpoints (times in ns)."""

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


class DataPlane:
    def __init__(
        self,
        models: ModelRegistry,
        adapters: AdapterManager,
        metrics: Metrics,
        limits: BatchLimits | None = None,
        mix_adapters: bool = True,
        quotas: RequestQuotas | None = None,
        max_request_elements: int = 1 << 26,
        worker_paths: Sequence[Path] = (),
        feed_pool: FeedPool | None = None,
        memory: MemoryGuard | None = None,
    ) -> None:
        self.models = models
        self.adapters = adapters
        self.metrics = metrics
        self.limits = limits or BatchLimits()
        self.mix_adapters = mix_adapters
        self.quotas = quotas or RequestQuotas()
        self.max_request_elements = max_request_elements
        self.worker_paths = tuple(Path(p).resolve() for p in worker_paths)
        self.feed_pool = feed_pool or FeedPool(DEFAULT_FEED_MEMORY_BYTES)
        self.memory = memory or MemoryGuard(0)
        self._batchers: dict[str, Batcher] = {}
        self._stats: dict[str, ModelStats] = {}
        self._feed_buffers: dict[str, FeedBuffers] = {}
        self._lock = threading.Lock()
        self._drain_callbacks: set[Callable[[], None]] = set()
        self._model_callbacks: list[Callable[[], None]] = []
        self.draining = False

    def batcher(self, model: BaseModel) -> Batcher:
        with self._lock:
            batcher = self._batchers.get(model.name)
            if batcher is None:
                buffers = self._feed_buffers[model.name] = FeedBuffers(self.feed_pool)
                batcher = Batcher(
                    model.name,
                    batch_runner(model, buffers, self.memory.after_run),
                    self.limits,
                    self._observe_batch(model.name),
                )
                self._batchers[model.name] = batcher
            return batcher

    def batchers(self) -> list[Batcher]:
        with self._lock:
            return list(self._batchers.values())

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

    def close(self) -> None:
        """Stop taking requests; queued ones still run."""
        for batcher in self.batchers():
            batcher.close()

    def _observe_batch(self, model: str) -> Callable[[Sequence[QueuedRequest], float, float], None]:
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
                stats = self._stats.setdefault(model, ModelStats())
                stats.queue_count += len(waited)
                stats.queue_ns += int(sum(waited) * 1e9)
                stats.compute_count += 1
                stats.compute_ns += int((finished - started) * 1e9)
                stats.rows += rows
                stats.last_inference_ms = int(time.time() * 1000)

        return observe

    def load_model(self, identity: Identity, name: str, path: Path) -> BaseModel:
        """Load a base model at runtime (admins only); returns once it serves."""
        with _audited("model.load", identity, name, "", path=str(path)):
            identity.require_admin("loading a base model")
            if not MODEL_NAME.match(name):
                raise InvalidArgument(
                    f"model name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit",
                    field="name",
                )
            path = self._readable(path)
            if not path.is_file():
                raise NotFound(f"no model file at {path}", field="path")
            model = self.models.load(name, path)
            self._notify_models()
            return model

    def unload_model(self, identity: Identity, name: str) -> None:
        """Stop serving a model (admins only): new requests are refused, queued ones still run.
        Its adapters stay on disk and serve again if a model of that name is loaded."""
        with _audited("model.unload", identity, name, ""):
            identity.require_admin("unloading a base model")
            self.models.unload(name)
            with self._lock:
                batcher = self._batchers.pop(name, None)
                buffers = self._feed_buffers.pop(name, None)
            if batcher is not None:
                batcher.close()
            if buffers is not None:
                buffers.close()
            self._notify_models()

    def _readable(self, path: Path) -> Path:
        """``path`` resolved, when it lies under one of ``worker_paths`` (or any path without them)."""
        resolved = path.resolve()
        if self.worker_paths and not any(resolved.is_relative_to(root) for root in self.worker_paths):
            raise PermissionDenied(
                f"{path} is outside the directories this worker reads from (worker_paths)", field="path"
            )
        return resolved

    def on_models_changed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after a model is loaded or unloaded at runtime."""
        self._model_callbacks.append(callback)

    def _notify_models(self) -> None:
        for callback in self._model_callbacks:
            callback()

    def list_models(self) -> list[BaseModel]:
        return self.models.all()

    def loading_models(self) -> list[str]:
        return self.models.loading()

    def get_model(self, name: str) -> BaseModel:
        return self.models.get(name)

    def model_stats(self, name: str) -> ModelStats:
        """A copy of what ``name`` served since start (zeros for a model that served nothing)."""
        with self._lock:
            return dataclasses.replace(self._stats.get(name) or ModelStats())

    def ready(self) -> bool:
        """Serving: base models loaded and not shutting down."""
        return not self.draining and bool(self.list_models())

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
            seconds = time.perf_counter() - started
            self.metrics.observe_request(model_label, tenant, _outcome(error), seconds)
            if model_label:
                self._count_answer(model_label, False, seconds)
            raise
        in_flight = self.metrics.requests_in_flight.labels(model.name)
        in_flight.inc()

        def answered(done: Future[InferenceResult]) -> None:
            in_flight.dec()
            self.quotas.release(tenant)
            code = _outcome(done.exception())
            seconds = time.perf_counter() - started
            self.metrics.observe_request(model.name, tenant, code, seconds)
            self._count_answer(model.name, code == "OK", seconds)

        future.add_done_callback(answered)
        return future

    def _count_answer(self, model: str, ok: bool, seconds: float) -> None:
        with self._lock:
            stats = self._stats.setdefault(model, ModelStats())
            if ok:
                stats.success_count += 1
                stats.success_ns += int(seconds * 1e9)
            else:
                stats.fail_count += 1
                stats.fail_ns += int(seconds * 1e9)

    def _check_size(self, request: InferenceRequest) -> None:
        elements = sum(array.size for array in request.inputs.values())
        if elements > self.max_request_elements:
            raise ResourceExhausted(
                f"the request carries {elements} tensor elements, over the limit of "
                f"{self.max_request_elements} (max_request_elements)",
                field="inputs",
            )

    def _queue(self, model: BaseModel, request: InferenceRequest, tenant: str) -> Future[InferenceResult]:
        validate_inputs(model.name, model.inputs, request.inputs)
        model.limits.check(model.name, model.inputs, request.inputs)
        tokens = request_tokens(model.inputs, request.inputs)
        if tokens > self.limits.max_batch_tokens:
            raise InvalidArgument(
                f"the request is {tokens} tokens (rows x sequence), over the {self.limits.max_batch_tokens} "
                "one run of the worker takes (max_batch_tokens); send it in smaller requests",
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
                fairness_key=_fairness_key(request),
                priority=request.priority,
                deadline=request.deadline,
                is_active=request.is_active,
                batchable=model.batchable,
                group="" if self.mix_adapters else request.adapter,
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
            self.metrics.observe_inference(model.name, result.compute_seconds, queued.rows)
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

    def infer(self, request: InferenceRequest) -> InferenceResult:
        """Submit a request and wait for the batch that carries it."""
        future = self.submit(request)
        timeout = None if request.deadline is None else max(request.deadline - time.monotonic(), 0) + 1.0
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise DeadlineExceeded("the request's deadline passed before its batch ran") from None

    def register_adapter(
        self, identity: Identity, header: UploadHeader, chunks: Iterable[bytes | UploadTrailer]
    ) -> AdapterInfo:
        header = dataclasses.replace(header, tenant=identity.tenant)
        with _audited("adapter.register", identity, header.model, header.adapter_id):
            header, payload, pending = self.adapters.receive(header, chunks)
            return self.adapters.register(header, payload, pending)

    def register_adapter_from_path(self, identity: Identity, header: UploadHeader, path: Path) -> AdapterInfo:
        header = dataclasses.replace(header, tenant=identity.tenant)
        with _audited(
            "adapter.register_from_path", identity, header.model, header.adapter_id, path=str(path)
        ):
            identity.require_admin("registering an adapter from a path on the worker")
            return self.adapters.register_from_path(header, self._readable(path), self._readable)

    def get_adapter(self, identity: Identity, model: str, adapter_id: str) -> AdapterInfo:
        return self.adapters.get(model, adapter_id, identity.tenant)

    def list_adapters(self, identity: Identity, model: str = "") -> list[AdapterInfo]:
        return self.adapters.list(model, identity.tenant)

    def count_adapters(self, model: str) -> tuple[int, int]:
        """(registered, resident) adapters of every tenant on ``model``."""
        adapters = self.adapters.list(model, tenant=None)
        return len(adapters), sum(1 for info in adapters if info.resident)

    def delete_adapter(self, identity: Identity, model: str, adapter_id: str) -> None:
        with _audited("adapter.delete", identity, model, adapter_id):
            self.adapters.delete(model, adapter_id, identity.tenant)


@contextlib.contextmanager
def _audited(event: str, identity: Identity, model: str, adapter_id: str, **fields: str) -> Iterator[None]:
    """Audit ``event`` once it is done, with its outcome."""
    try:
        yield
    except BaseException as error:
        audit(
            event, tenant=identity.tenant, result=_outcome(error), model=model, adapter=adapter_id, **fields
        )
        raise
    audit(event, tenant=identity.tenant, result="OK", model=model, adapter=adapter_id, **fields)


def _fairness_key(request: InferenceRequest) -> str:
    """What the batcher draws round-robin across: tenants when the worker has them, else adapters
    (a single-tenant worker's callers are all the default tenant)."""
    if request.tenant and request.tenant != DEFAULT_TENANT:
        return request.tenant
    return request.adapter


def _outcome(error: BaseException | None) -> str:
    """A request's outcome as a status code name: OK, the error's code, or INTERNAL."""
    if error is None:
        return "OK"
    return error.code.name if isinstance(error, OrtmuxError) else "INTERNAL"
