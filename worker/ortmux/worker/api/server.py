"""Building and running the gRPC server: services, interceptors, health, reflection, drain."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from ortmux.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from ortmux.worker.adapters.local_store import AdapterStore
from ortmux.worker.adapters.manager import AdapterLimits, AdapterManager
from ortmux.worker.adapters.object_store import S3Objects
from ortmux.worker.adapters.shared_store import SharedStore
from ortmux.worker.adapters.sync import SyncLoop
from ortmux.worker.api.grpc_runtime import GrpcServer, Health, Offload
from ortmux.worker.api.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from ortmux.worker.api.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from ortmux.worker.api.oip import SERVICE as OIP_SERVICE
from ortmux.worker.api.oip import OipServicer, UnservedRpcs
from ortmux.worker.api.servicers import AdapterServicer, InferenceServicer, ModelServicer
from ortmux.worker.auth import KeyRing
from ortmux.worker.dataplane import DataPlane, RequestLimits, RequestPath
from ortmux.worker.dataplane.generation import GenerationPath
from ortmux.worker.dataplane.models import ModelManagement
from ortmux.worker.dataplane.statistics import ServingStatistics
from ortmux.worker.demo import DEMO_NAME, ensure_demo_model
from ortmux.worker.engine.cache import ModelCache
from ortmux.worker.engine.lora.feeds import FeedPool
from ortmux.worker.engine.memory import MemoryGuard
from ortmux.worker.engine.providers import resolve_providers
from ortmux.worker.engine.registry import ModelRegistry
from ortmux.worker.engine.runtime import RuntimeOptions, configure_process
from ortmux.worker.errors import InvalidArgument
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.quotas import RequestQuotas, TokenQuota
from ortmux.worker.scheduler.batcher import BatchLimits
from ortmux.worker.scheduler.decode_scheduler import DecodeLimits
from ortmux.worker.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
)
OVERALL_HEALTH = ""
MODEL_HEALTH_PREFIX = "ortmux.model."


# Calls that stay open as long as their client likes: they never hold back a stop.
LONG_LIVED_CALLS = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.")


@dataclasses.dataclass
class Worker:
    """A running worker: the gRPC server and everything it serves."""

    settings: Settings
    server: GrpcServer
    port: int
    dataplane: DataPlane
    metrics: Metrics
    health: Health
    metrics_port: int | None = None
    adapter_sync: SyncLoop | None = None
    keys: KeyRing | None = None
    http: Any = None  # the OpenAI-compatible HTTP API's server, when http_port >= 0
    http_port: int | None = None
    _stopped: threading.Event = dataclasses.field(default_factory=threading.Event)
    _model_health_names: set[str] = dataclasses.field(default_factory=set)

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.settings.host in {"0.0.0.0", "[::]", ""} else self.settings.host
        return f"{host}:{self.port}"

    def load_models(self) -> None:
        """Load the configured base models (the demo model when none is), then report SERVING."""
        configured = self.settings.model_paths()
        if configured:
            self.dataplane.load_startup_models(configured)
        else:
            demo = {DEMO_NAME: ensure_demo_model(self.settings.data_dir)}
            self.dataplane.load_startup_models(demo, own_files=True)
        for model in self.dataplane.list_models():
            self.metrics.model_loads.labels(model.name, "hit" if model.cache_hit else "miss").inc()
        self.metrics.models_loaded.set(len(self.dataplane.list_models()))
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within ``grace`` seconds, then stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.dataplane.drain()
        grace = self.settings.drain_grace_seconds if grace is None else grace
        # New work is refused (draining, health NOT_SERVING); calls in flight get the grace.
        # Health watches and reflection streams would hold it whole, so they do not count; the
        # server is stopped once (grpc.aio's shutdown is not to be called twice), ending them.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.metrics.calls_in_flight(LONG_LIVED_CALLS):
            time.sleep(0.05)
        self.server.stop(0).wait(30)
        self.server.close()
        if self.http is not None:
            self.http.stop(grace)
        if self.adapter_sync is not None:
            self.adapter_sync.stop()
        self.dataplane.close()
        self.metrics.close()
        log.info("worker stopped")

    def _set_health(self, status: int) -> None:
        for service in (OVERALL_HEALTH, *SERVICE_NAMES):
            self.health.set(service, status)
        self._set_model_health()

    def _set_model_health(self) -> None:
        """``ortmux.model.<name>`` is SERVING while that model serves and the worker is not draining."""
        served = {model.name for model in self.dataplane.list_models()}
        for name in served | self._model_health_names:
            serving = name in served and not self._stopped.is_set()
            self.health.set(
                MODEL_HEALTH_PREFIX + name,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
        self._model_health_names |= served
        self.metrics.models_loaded.set(len(served))


def create_server(
    settings: Settings, metrics_registry: CollectorRegistry | None = None
) -> tuple[GrpcServer, int, Worker]:
    """Bind the server (port 0: any free port) with every service registered; not started yet.

    Health answers NOT_SERVING until :meth:`Worker.load_models` has loaded the base models.
    """
    metrics = Metrics(metrics_registry)
    configure_process(settings.intra_op_threads)  # before any session, the provider probe's included
    runtime = RuntimeOptions(
        providers=tuple(resolve_providers(settings.providers)),
        intra_op_threads=settings.intra_op_threads,
        optimization_level=settings.optimization_level,
        base_graph=settings.base_graph,
        quantize=settings.quantize,
        lora_branch=settings.lora_branch,
    )
    models = ModelRegistry(
        runtime, ModelCache(settings.cache_path()), settings.overridable, settings.sequence_limits()
    )
    limits = AdapterLimits(
        max_adapter_bytes=settings.max_adapter_bytes,
        max_upload_chunks=settings.max_upload_chunks,
        memory_budget_bytes=settings.adapter_memory_bytes,
        tenant_max_adapters=settings.tenant_max_adapters,
        tenant_max_adapter_bytes=settings.tenant_max_adapter_bytes,
        disk_bytes=settings.adapter_disk_bytes,
        store_lookups_per_second=settings.adapter_store_lookups_per_second,
    )
    store = AdapterStore(settings.data_dir / "adapters", settings.upload_memory_bytes)
    shared = (
        SharedStore(
            S3Objects(settings.adapter_store), orphan_grace_seconds=settings.adapter_orphan_grace_seconds
        )
        if settings.adapter_store
        else None
    )
    adapters = AdapterManager(store, models.get, limits, shared)
    batching = BatchLimits(
        max_batch_rows=settings.max_batch_size,
        max_delay=settings.max_queue_delay_ms / 1000,
        max_queue=settings.max_queue_size,
        fair_share_rows=settings.fair_share_rows,
        max_batch_tokens=settings.max_batch_tokens,
    )
    quotas = RequestQuotas(settings.tenant_max_in_flight, settings.tenant_max_requests_per_second)
    management = ModelManagement(models, [Path(p) for p in settings.worker_paths])
    statistics = ServingStatistics(metrics)
    requests = RequestPath(
        management,
        adapters,
        statistics,
        RequestLimits(batching, settings.mix_adapters, settings.max_request_elements),
        quotas,
        FeedPool(settings.feed_memory_bytes),
        MemoryGuard.from_setting(settings.memory_limit_bytes),
    )
    kv = KvPool(settings.kv_cache_bytes)
    generation = GenerationPath(
        management,
        adapters,
        metrics,
        kv,
        DecodeLimits(settings.max_running_sequences, settings.max_prefill_tokens, settings.max_queue_size),
        quotas,
        requests.feed_pool,
        requests.memory,
        TokenQuota(settings.tenant_max_generated_tokens_per_minute),
        settings.max_generation_seconds,
        settings.prefix_cache,
        settings.prefix_cache_shared_base,
        settings.paged_kv_cache,
    )
    dataplane = DataPlane(management, requests, adapters, statistics, generation)
    metrics.watch_generation(generation.loops, kv)
    keys = KeyRing(settings.api_keys, Path(settings.api_keys_file) if settings.api_keys_file else None)
    if not keys.enabled:
        log.warning(
            "NO API KEYS CONFIGURED: this worker is single-tenant and every caller is an admin; "
            "set api_keys or api_keys_file to have tenants"
        )
    metrics.watch_models(dataplane.list_models)
    metrics.watch_adapters(adapters)
    metrics.watch_batchers(dataplane.batchers)
    metrics.watch_memory(requests.feed_pool, store.upload_memory, requests.memory)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    requests_pool = Offload(settings.grpc_workers, "ortmux-requests")
    control = Offload(max(4, settings.grpc_workers // 4), "ortmux-control")
    uploads = Offload(max(2, settings.grpc_workers // 4), "ortmux-uploads")
    server = GrpcServer(
        (requests_pool, control, uploads),
        interceptors=[MetricsInterceptor(metrics), ErrorInterceptor(), AuthInterceptor(keys)],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    health_servicer = Health(server)

    def build(server: grpc.aio.Server) -> None:
        models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(dataplane, control), server)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterServicer(dataplane, control, uploads), server
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(dataplane, settings.stream_window, requests_pool), server
        )
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            OipServicer(dataplane, settings.stream_window, requests_pool, control), server
        )
        server.add_generic_rpc_handlers((UnservedRpcs(),))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer.servicer, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                OIP_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )

    server.register(build)
    address = f"{settings.host}:{settings.port}"
    credentials = _server_credentials(settings)
    port = server.register(
        (lambda s: s.add_secure_port(address, credentials))
        if credentials
        else (lambda s: s.add_insecure_port(address))
    )
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    worker = Worker(settings, server, port, dataplane, metrics, health_servicer, keys=keys)
    if shared is not None:
        worker.adapter_sync = SyncLoop(adapters, settings.adapter_sync_seconds, settings.adapter_gc_seconds)
    worker._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    dataplane.on_models_changed(worker._set_model_health)
    return server, port, worker


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the settings' PEM files; mutual TLS when a client CA is given."""
    if not settings.tls_cert_file:
        return None
    try:
        key = Path(settings.tls_key_file).read_bytes()
        chain = Path(settings.tls_cert_file).read_bytes()
        client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    except OSError as exc:
        raise InvalidArgument(f"TLS file {exc.filename}: {exc.strerror}", field="tls_cert_file") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def start_worker(settings: Settings, metrics_registry: CollectorRegistry | None = None) -> Worker:
    """Create, start and load a worker; metrics served when ``settings.metrics_port`` >= 0."""
    _server, port, worker = create_server(settings, metrics_registry)
    worker.server.start()
    if worker.adapter_sync is not None:
        worker.adapter_sync.start()
    log.info("gRPC on %s:%d", settings.host, port)
    if settings.metrics_port >= 0:
        worker.metrics_port = worker.metrics.serve(settings.host, settings.metrics_port)
    if settings.http_port >= 0:
        from ortmux.worker.api.openai_http import HttpServer, OpenAIApi  # its stack loads only when used

        assert worker.keys is not None
        worker.http = HttpServer(OpenAIApi(worker.dataplane, worker.keys, worker.metrics, settings), settings)
        worker.http.start()
        worker.http_port = worker.http.port
        log.info("HTTP on %s:%d", settings.host, worker.http_port)
    try:
        worker.load_models()
    except BaseException:
        worker.stop(0)
        raise
    return worker
