"""Every Prometheus metric of the worker, on one injected registry, served on its own port."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ortmux.worker.observability.collectors import (
    AdapterCollector,
    BatcherCollector,
    GenerationCollector,
    MemoryCollector,
    ModelCollector,
)

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
        self.time_to_first_token = Histogram(
            "ortmux_generation_time_to_first_token_seconds",
            "From a generation's arrival to its first token, by base model.",
            ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "ortmux_generation_inter_token_seconds",
            "Between two tokens of one generation, by base model.",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "ortmux_generated_tokens_total",
            "Tokens generated, by base model.",
            ["model"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "ortmux_prefix_cache_prompt_tokens_total",
            "Prompt tokens of generations that may use the prefix cache, by base model.",
            ["model"],
            registry=self.registry,
        )
        self.prefix_hit_tokens = Counter(
            "ortmux_prefix_cache_hit_tokens_total",
            "Prompt tokens whose KV came from the prefix cache (not prefilled), by base model.",
            ["model"],
            registry=self.registry,
        )
        self.preemptions = Counter(
            "ortmux_kv_preemptions_total",
            "Sequences preempted when the paged KV cache ran out of blocks (recomputed later), by model.",
            ["model"],
            registry=self.registry,
        )
        self.decode_step_rows = Histogram(
            "ortmux_decode_step_rows",
            "Rows (sequences) per decode step, by base model.",
            ["model"],
            buckets=_ROW_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "ortmux_http_requests_total",
            "Calls of the OpenAI-compatible HTTP API, by path and HTTP status.",
            ["path", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "ortmux_http_request_seconds",
            "Time to answer an HTTP call (to its first byte when streamed), by path.",
            ["path"],
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
        self.registry.register(ModelCollector(models))

    def watch_adapters(self, adapters: Any) -> None:
        """Report adapter counts, resident bytes, registrations, evictions and reloads at every scrape."""
        self.registry.register(AdapterCollector(adapters))

    def watch_memory(self, feeds: Any, uploads: Any, guard: Any) -> None:
        """Report the bounded memory pools (LoRA feed arrays, uploads in progress) and the memory
        guard at every scrape."""
        self.registry.register(MemoryCollector(feeds, uploads, guard))

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

    def watch_generation(self, loops: Callable[[], Sequence[Any]], kv: Any) -> None:
        """Report running and waiting generations and the KV cache at every scrape."""
        self.registry.register(GenerationCollector(loops, kv))

    def observe_http(self, path: str, status: int, seconds: float) -> None:
        self.http_requests.labels(path, str(status)).inc()
        self.http_seconds.labels(path).observe(seconds)

    def generation_observer(self, model: str) -> GenerationMetrics:
        """What a model's decode loop reports its steps and tokens through."""
        return GenerationMetrics(self, model)

    def watch_batchers(self, batchers: Callable[[], Sequence[Any]]) -> None:
        """Report queue depth and dropped requests of every model's batcher at every scrape."""
        self.registry.register(BatcherCollector(batchers))

    def observe_request(self, model: str, tenant: str, code: str, seconds: float) -> None:
        """One answered request; ``model`` is "" when the name was not a served model (keeping
        label values bounded)."""
        self.requests.labels(model, tenant, code).inc()
        if model:
            self.request_seconds.labels(model).observe(seconds)

    def observe_inference(self, model: str, seconds: float, rows: int) -> None:
        self.inference_seconds.labels(model).observe(seconds)
        self.inference_rows.labels(model).observe(rows)

    def calls_in_flight(self, except_prefixes: tuple[str, ...] = ()) -> int:
        """Calls being served, but those whose method starts with one of ``except_prefixes``."""
        samples = self.rpcs_in_flight.collect()[0].samples
        return int(sum(s.value for s in samples if not s.labels["method"].startswith(except_prefixes)))

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


def _adapter_count_label(count: int) -> str:
    """Adapter counts in a few ranges, so the label stays low-cardinality."""
    for upper, label in ((0, "0"), (1, "1"), (4, "2-4"), (16, "5-16")):
        if count <= upper:
            return label
    return "17+"


class GenerationMetrics:
    """One model's decode loop reporting into the metrics."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._rows = metrics.decode_step_rows.labels(model)
        self._first = metrics.time_to_first_token.labels(model)
        self._inter = metrics.inter_token.labels(model)
        self._tokens = metrics.generated_tokens.labels(model)
        self._prompt = metrics.prompt_tokens.labels(model)
        self._hits = metrics.prefix_hit_tokens.labels(model)
        self._preempted = metrics.preemptions.labels(model)

    def step(self, rows: int, seconds: float) -> None:
        self._rows.observe(rows)

    def token(self, first: bool, seconds: float) -> None:
        (self._first if first else self._inter).observe(seconds)
        self._tokens.inc()

    def prefix(self, hit_tokens: int, prompt_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)
        self._hits.inc(hit_tokens)

    def preempted(self) -> None:
        self._preempted.inc()
