"""Every Prometheus metric of the worker, on one injected registry, served on its own port."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The worker's metrics. Labels are bounded: gRPC method and status code, served model names."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.rpcs = Counter(
            "ortmux_rpcs",
            "gRPC calls finished, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "ortmux_rpc_duration_seconds",
            "Wall time of gRPC calls from arrival to the last response, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rpcs_in_flight = Gauge(
            "ortmux_rpcs_in_flight", "gRPC calls being served, by method.", ["method"], registry=self.registry
        )
        self.requests = Counter(
            "ortmux_requests",
            "Inference requests answered (unary or streamed), by model, tenant and status code.",
            ["model", "tenant", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "ortmux_request_duration_seconds",
            "Time from taking an inference request to its answer (queue and compute), by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests_in_flight = Gauge(
            "ortmux_requests_in_flight",
            "Inference requests taken and not answered yet (queued or running), by model.",
            ["model"],
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "ortmux_inference_compute_seconds",
            "Time ONNX Runtime spent on a run, by base model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_rows = Histogram(
            "ortmux_inference_rows",
            "Rows (leading dimension) per run, by base model.",
            ["model"],
            buckets=_ROW_BUCKETS,
            registry=self.registry,
        )
        self.models_loaded = Gauge(
            "ortmux_models_loaded", "Base models being served.", registry=self.registry
        )
        self.batch_rows = Histogram(
            "ortmux_batch_rows",
            "Rows per batched run, by base model and how many LoRA adapters the run mixed.",
            ["model", "adapters"],
            buckets=_ROW_BUCKETS,
            registry=self.registry,
        )
        self.batch_adapters = Histogram(
            "ortmux_batch_adapters",
            "Distinct LoRA adapters per batched run, by base model.",
            ["model"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.batch_runs = Counter(
            "ortmux_batch_runs_total",
            "Batched runs by base model and what their rows were: base, adapter, adapters (several), "
            "adapter+base, adapters+base.",
            ["model", "mix"],
            registry=self.registry,
        )
        self.exclusive_runs = Counter(
            "ortmux_exclusive_adapter_runs_total",
            "Runs carrying rows of an adapter that changes activations every row shares (it must "
            "run without other adapters' or base rows), by base model and the run's mix.",
            ["model", "mix"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "ortmux_batch_compute_seconds",
            "Time ONNX Runtime spent on a batched run, by base model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "ortmux_queue_seconds",
            "Time requests waited in the queue before their run, by base model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_loads = Counter(
            "ortmux_model_loads",
            "Base model loads, by model and cache result (hit: optimized model reused; miss: optimized now).",
            ["model", "cache"],
            registry=self.registry,
        )
        self._http_server: object | None = None

    def watch_models(self, models: Callable[[], Sequence[Any]]) -> None:
        """Report per-model accounting and process PSS at every scrape, read from ``models()``."""
        self.registry.register(_ModelCollector(models))

    def watch_adapters(self, adapters: Any) -> None:
        """Report adapter counts, resident bytes, registrations, evictions and reloads at every scrape."""
        self.registry.register(_AdapterCollector(adapters))

    def watch_memory(self, feeds: Any, uploads: Any, guard: Any) -> None:
        """Report the bounded memory pools (LoRA feed arrays, uploads in progress) and the memory
        guard at every scrape."""
        self.registry.register(_MemoryCollector(feeds, uploads, guard))

    def observe_batch(
        self, model: str, rows: int, adapters: int, seconds: float, base_rows: bool, exclusive: bool
    ) -> None:
        mix = ("base" if not adapters else "adapter" if adapters == 1 else "adapters") + (
            "+base" if adapters and base_rows else ""
        )
        self.batch_runs.labels(model, mix).inc()
        if exclusive:
            self.exclusive_runs.labels(model, mix).inc()
        self.batch_rows.labels(model, _adapter_count_label(adapters)).observe(rows)
        self.batch_adapters.labels(model).observe(adapters)
        self.batch_seconds.labels(model).observe(seconds)

    def watch_batchers(self, batchers: Callable[[], Sequence[Any]]) -> None:
        """Report queue depth and dropped requests of every model's batcher at every scrape."""
        self.registry.register(_BatcherCollector(batchers))

    def observe_request(self, model: str, tenant: str, code: str, seconds: float) -> None:
        """One answered request; ``model`` is "" when the name was not a served model (keeping
        label values bounded)."""
        self.requests.labels(model, tenant, code).inc()
        if model:
            self.request_seconds.labels(model).observe(seconds)

    def observe_inference(self, model: str, seconds: float, rows: int) -> None:
        self.inference_seconds.labels(model).observe(seconds)
        self.inference_rows.labels(model).observe(rows)

    def calls_in_flight(self, method_prefix: str) -> int:
        """Calls being served whose method starts with ``method_prefix``."""
        samples = self.rpcs_in_flight.collect()[0].samples
        return int(sum(s.value for s in samples if s.labels["method"].startswith(method_prefix)))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on ``port`` (0: any free port) in a daemon thread; the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http_server = server
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop serving /metrics."""
        if self._http_server is not None:
            self._http_server.shutdown()  # type: ignore[attr-defined]
            self._http_server.server_close()  # type: ignore[attr-defined]
            self._http_server = None


class _ModelCollector(Collector):
    def __init__(self, models: Callable[[], Sequence[Any]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        families = {
            "arena": GaugeMetricFamily(
                "ortmux_model_arena_bytes",
                "Base weights shared by all sessions of a model.",
                labels=["model"],
            ),
            "cache": GaugeMetricFamily(
                "ortmux_model_cache_bytes", "Optimized, prepacked model files in the cache.", labels=["model"]
            ),
            "sessions": GaugeMetricFamily(
                "ortmux_model_sessions", "ONNX Runtime sessions open.", labels=["model"]
            ),
            "load": GaugeMetricFamily(
                "ortmux_model_load_seconds", "Seconds the last load took.", labels=["model"]
            ),
        }
        for model in self._models():
            families["arena"].add_metric([model.name], model.arena.total_bytes)
            families["cache"].add_metric([model.name], model.entry.total_bytes)
            families["sessions"].add_metric([model.name], model.sessions)
            families["load"].add_metric([model.name], model.load_seconds)
        yield from families.values()
        pss = _process_pss_bytes()
        if pss is not None:
            yield GaugeMetricFamily(
                "ortmux_process_pss_bytes", "Proportional set size of the worker process.", value=pss
            )


class _BatcherCollector(Collector):
    def __init__(self, batchers: Callable[[], Sequence[Any]]) -> None:
        self._batchers = batchers

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "ortmux_queue_depth", "Requests waiting in a model's queue.", labels=["model"]
        )
        dropped = CounterMetricFamily(
            "ortmux_requests_dropped",
            "Requests answered without running: queue full, deadline passed, or cancelled while queued.",
            labels=["model", "reason"],
        )
        for batcher in self._batchers():
            depth.add_metric([batcher.name], batcher.depth)
            counters = batcher.counters
            dropped.add_metric([batcher.name, "queue_full"], counters.rejected)
            dropped.add_metric([batcher.name, "deadline"], counters.expired)
            dropped.add_metric([batcher.name, "cancelled"], counters.cancelled)
        yield depth
        yield dropped


class _AdapterCollector(Collector):
    def __init__(self, adapters: Any) -> None:
        self._adapters = adapters

    def collect(self) -> Iterator[Metric]:
        registered, resident = self._adapters.counts()
        counters = self._adapters.counters
        yield GaugeMetricFamily(
            "ortmux_adapters_registered",
            "Adapters registered (on disk, or in the shared store).",
            value=registered,
        )
        yield GaugeMetricFamily("ortmux_adapters_resident", "Adapters in memory.", value=resident)
        yield GaugeMetricFamily(
            "ortmux_adapters_resident_bytes",
            "Bytes of adapter tensors in memory.",
            value=self._adapters.resident_bytes(),
        )
        yield CounterMetricFamily(
            "ortmux_adapter_registrations", "Adapters registered since start.", value=counters.registrations
        )
        yield CounterMetricFamily(
            "ortmux_adapter_evictions",
            "Adapters evicted from memory by the memory budget.",
            value=counters.evictions,
        )
        yield CounterMetricFamily(
            "ortmux_adapter_reloads", "Evicted adapters loaded again from disk.", value=counters.reloads
        )
        yield CounterMetricFamily(
            "ortmux_adapter_load_seconds",
            "Seconds spent parsing and checking adapters (registrations and reloads).",
            value=counters.load_seconds_total,
        )
        shared = self._adapters.shared
        if shared is None:
            return
        yield GaugeMetricFamily(
            "ortmux_adapter_disk_bytes",
            "Bytes of adapter payloads cached on the local disk.",
            value=self._adapters.disk_bytes(),
        )
        yield GaugeMetricFamily(
            "ortmux_adapter_disk_limit_bytes",
            "The bound on cached adapter payloads (adapter_disk_bytes; 0: none).",
            value=self._adapters.limits.disk_bytes,
        )
        for name, value, text in (
            ("ortmux_adapter_disk_hits", counters.disk_hits, "Adapter loads served from the local disk."),
            (
                "ortmux_adapter_disk_misses",
                counters.disk_misses,
                "Adapter loads fetched from the shared store.",
            ),
            (
                "ortmux_adapter_disk_evictions",
                counters.disk_evictions,
                "Payloads removed by adapter_disk_bytes.",
            ),
            (
                "ortmux_adapter_store_lookups",
                counters.store_lookups,
                "Unknown adapter ids looked up in the store.",
            ),
            ("ortmux_adapter_store_sync_errors", counters.sync_errors, "Syncs with the store that failed."),
            (
                "ortmux_adapter_store_collected_payloads",
                counters.collected_payloads,
                "Orphaned payloads this pod deleted from the store.",
            ),
        ):
            yield CounterMetricFamily(name, text, value=value)
        operations, received, sent = shared.objects.counters.snapshot()
        requests = CounterMetricFamily(
            "ortmux_adapter_store_requests",
            "Requests to the shared store, by operation.",
            labels=["operation"],
        )
        errors = CounterMetricFamily(
            "ortmux_adapter_store_errors",
            "Requests to the shared store that failed (unreachable, refused), by operation.",
            labels=["operation"],
        )
        latency = SummaryMetricFamily(
            "ortmux_adapter_store_request_seconds",
            "Seconds requests to the shared store took, by operation.",
            labels=["operation"],
        )
        for operation, counts in sorted(operations.items()):
            requests.add_metric([operation], counts.requests)
            errors.add_metric([operation], counts.errors)
            latency.add_metric([operation], count_value=counts.requests, sum_value=counts.seconds)
        yield requests
        yield errors
        yield latency
        moved = CounterMetricFamily(
            "ortmux_adapter_store_bytes", "Bytes moved to and from the shared store.", labels=["direction"]
        )
        moved.add_metric(["received"], received)
        moved.add_metric(["sent"], sent)
        yield moved


class _MemoryCollector(Collector):
    def __init__(self, feeds: Any, uploads: Any, guard: Any) -> None:
        self._feeds = feeds
        self._uploads = uploads
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        feeds, uploads = self._feeds, self._uploads
        yield GaugeMetricFamily(
            "ortmux_feed_memory_bytes", "Bytes of LoRA feed arrays kept for reuse.", value=feeds.held_bytes
        )
        yield GaugeMetricFamily(
            "ortmux_feed_memory_limit_bytes", "The bound on LoRA feed arrays.", value=feeds.limit_bytes
        )
        yield CounterMetricFamily(
            "ortmux_feed_memory_evictions",
            "Times a model's feed arrays were dropped to make room for another's.",
            value=feeds.evictions,
        )
        yield CounterMetricFamily(
            "ortmux_feed_transient_runs",
            "Runs that needed more feed memory than the bound and used arrays of their own.",
            value=feeds.transient_runs,
        )
        yield GaugeMetricFamily(
            "ortmux_upload_memory_bytes",
            "Bytes that adapter uploads in progress hold in memory.",
            value=uploads.held_bytes,
        )
        yield GaugeMetricFamily(
            "ortmux_upload_memory_limit_bytes",
            "The bound on memory held by uploads in progress.",
            value=uploads.limit_bytes,
        )
        yield CounterMetricFamily(
            "ortmux_upload_spills",
            "Uploads received into their staging file because upload memory was taken.",
            value=uploads.spilled,
        )
        guard = self._guard
        yield GaugeMetricFamily(
            "ortmux_memory_limit_bytes",
            "Resident memory past which new requests are refused (0: no guard).",
            value=guard.limit_bytes,
        )
        yield CounterMetricFamily(
            "ortmux_memory_refusals",
            "Requests refused with RESOURCE_EXHAUSTED because the worker was past its memory limit.",
            value=guard.refusals,
        )
        yield CounterMetricFamily(
            "ortmux_memory_releases",
            "Times ONNX Runtime's arena handed its spare memory back (past 3/4 of the limit, or after "
            "a run that failed to allocate).",
            value=guard.releases,
        )


def _adapter_count_label(count: int) -> str:
    """Adapter counts in a few ranges, so the label stays low-cardinality."""
    for upper, label in ((0, "0"), (1, "1"), (4, "2-4"), (16, "5-16")):
        if count <= upper:
            return label
    return "17+"


def _process_pss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
