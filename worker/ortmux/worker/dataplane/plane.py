"""The data plane: the one grpc-free facade the protocol servicers and the server talk to.

It composes the parts that each own one rule: :class:`~.models.ModelManagement` (which models
serve, name and path rules), :class:`~.requests.RequestPath` (admission, batching, answers,
draining), :class:`~.statistics.ServingStatistics` (what each model served), and the adapter
manager, whose operations it scopes to the caller's tenant and audits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path

from ortmux.worker.adapters.manager import AdapterInfo, AdapterManager, UploadHeader, UploadTrailer
from ortmux.worker.audit import audited
from ortmux.worker.auth import Identity
from ortmux.worker.dataplane.generation import (
    GenerationPath,
    GenerationRequest,
    GenerationStream,
    ModelGeneration,
)
from ortmux.worker.dataplane.models import ModelManagement
from ortmux.worker.dataplane.requests import InferenceRequest, InferenceResult, RequestPath
from ortmux.worker.dataplane.statistics import ServingCounters, ServingStatistics
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.scheduler.batcher import Batcher


class DataPlane:
    def __init__(
        self,
        models: ModelManagement,
        requests: RequestPath,
        adapters: AdapterManager,
        statistics: ServingStatistics,
        generation: GenerationPath | None = None,
    ) -> None:
        self.models = models
        self.requests = requests
        self.adapters = adapters
        self.statistics = statistics
        self.generation = generation or GenerationPath(
            models, adapters, statistics.metrics, KvPool(1 << 30), feed_pool=requests.feed_pool
        )
        models.on_unloaded(requests.close_model)
        models.on_unloaded(self.generation.close_model)

    # -- models ------------------------------------------------------------------------------------

    def load_startup_models(self, paths: Mapping[str, Path], own_files: bool = False) -> None:
        """The models the worker starts with, through the same checks as LoadModel (``own_files``:
        files the worker wrote itself, the demo model, which need not lie under worker_paths)."""
        self.models.load_all(paths, own_files)

    def load_model(self, identity: Identity, name: str, path: Path) -> BaseModel:
        """Load a base model at runtime (admins only); returns once it serves."""
        with audited("model.load", identity.tenant, name, "", path=str(path)):
            identity.require_admin("loading a base model")
            return self.models.load(name, path)

    def unload_model(self, identity: Identity, name: str) -> None:
        """Stop serving a model (admins only): new requests are refused, queued ones still run.
        Its adapters stay on disk and serve again if a model of that name is loaded."""
        with audited("model.unload", identity.tenant, name, ""):
            identity.require_admin("unloading a base model")
            self.models.unload(name)

    def on_models_changed(self, callback: Callable[[], None]) -> None:
        self.models.on_changed(callback)

    def list_models(self) -> list[BaseModel]:
        return self.models.all()

    def loading_models(self) -> list[str]:
        return self.models.loading()

    def get_model(self, name: str) -> BaseModel:
        return self.models.get(name)

    def model_stats(self, name: str) -> ServingCounters:
        """What ``name`` served since start (zeros for a model that served nothing)."""
        return self.statistics.counters(name)

    @property
    def max_batch_rows(self) -> int:
        return self.requests.limits.batching.max_batch_rows

    # -- requests ----------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Serving: base models loaded and not shutting down."""
        return not self.requests.draining and bool(self.list_models())

    def submit(self, request: InferenceRequest) -> Future[InferenceResult]:
        return self.requests.submit(request)

    def infer(self, request: InferenceRequest) -> InferenceResult:
        return self.requests.infer(request)

    def generate(self, request: GenerationRequest) -> GenerationStream:
        """Start a generation; its chunks stream as they come (closing the stream cancels it)."""
        return self.generation.generate(request)

    def describe_generation(self, model: BaseModel) -> ModelGeneration:
        return self.generation.describe(model)

    def on_drain(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self.requests.on_drain(callback)

    def drain(self) -> None:
        """Open streams stop taking requests and new generations are refused; running ones go on."""
        self.generation.draining = True
        self.requests.drain()

    def batcher(self, model: BaseModel) -> Batcher:
        return self.requests.batcher(model)

    def batchers(self) -> list[Batcher]:
        return self.requests.batchers()

    def close(self) -> None:
        """Stop taking requests (queued ones still run) and close the adapter store."""
        self.requests.close()
        self.generation.close()
        self.adapters.store.close()

    # -- adapters, scoped to the caller's tenant and audited ---------------------------------------

    def register_adapter(
        self, identity: Identity, header: UploadHeader, chunks: Iterable[bytes | UploadTrailer]
    ) -> AdapterInfo:
        header = dataclasses.replace(header, tenant=identity.tenant)
        with audited("adapter.register", identity.tenant, header.model, header.adapter_id):
            header, payload, pending = self.adapters.receive(header, chunks)
            return self.adapters.register(header, payload, pending)

    def register_adapter_from_path(self, identity: Identity, header: UploadHeader, path: Path) -> AdapterInfo:
        header = dataclasses.replace(header, tenant=identity.tenant)
        with audited(
            "adapter.register_from_path", identity.tenant, header.model, header.adapter_id, path=str(path)
        ):
            identity.require_admin("registering an adapter from a path on the worker")
            readable = self.models.readable
            return self.adapters.register_from_path(header, readable(path), readable)

    def get_adapter(self, identity: Identity, model: str, adapter_id: str) -> AdapterInfo:
        return self.adapters.get(model, adapter_id, identity.tenant)

    def list_adapters(self, identity: Identity, model: str = "") -> list[AdapterInfo]:
        return self.adapters.list(model, identity.tenant)

    def count_adapters(self, model: str) -> tuple[int, int]:
        """(registered, resident) adapters of every tenant on ``model``."""
        adapters = self.adapters.list(model, tenant=None)
        return len(adapters), sum(1 for info in adapters if info.resident)

    def delete_adapter(self, identity: Identity, model: str, adapter_id: str) -> None:
        with audited("adapter.delete", identity.tenant, model, adapter_id):
            self.adapters.delete(model, adapter_id, identity.tenant)
