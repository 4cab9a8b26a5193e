"""Collectors read at every scrape: per-model accounting, batcher queues, adapters, and the
bounded memory pools with the memory guard. :class:`~.metrics.Metrics` registers them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector


class ModelCollector(Collector):
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


class BatcherCollector(Collector):
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


class AdapterCollector(Collector):
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


class MemoryCollector(Collector):
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


class GenerationCollector(Collector):
    def __init__(self, loops: Callable[[], Sequence[Any]], kv: Any) -> None:
        self._loops = loops
        self._kv = kv

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "ortmux_generations_running", "Sequences in a model's decode steps.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "ortmux_generations_waiting", "Generations waiting to be admitted, by model.", labels=["model"]
        )
        cached = GaugeMetricFamily(
            "ortmux_prefix_cache_bytes",
            "KV of cached prompt prefixes, part of ortmux_kv_cache_bytes, by model.",
            labels=["model"],
        )
        blocks = GaugeMetricFamily(
            "ortmux_prefix_cache_blocks", "Cached prompt blocks (16 tokens each), by model.", labels=["model"]
        )
        used = GaugeMetricFamily(
            "ortmux_kv_blocks_used",
            "KV cache blocks (16 positions each) held by sequences, on the paged path, by model.",
            labels=["model"],
        )
        for loop in self._loops():
            if loop.blocks is not None:
                used.add_metric([loop.name], loop.blocks.used)
            running.add_metric([loop.name], loop.running)
            waiting.add_metric([loop.name], loop.waiting)
            if loop.prefix is not None:
                cached.add_metric([loop.name], loop.prefix.held_bytes)
                blocks.add_metric([loop.name], loop.prefix.blocks)
        yield running
        yield waiting
        yield cached
        yield blocks
        yield used
        yield GaugeMetricFamily(
            "ortmux_kv_cache_bytes",
            "KV cache reserved by admitted generations and cached prompt prefixes.",
            value=self._kv.reserved_bytes,
        )
        yield GaugeMetricFamily(
            "ortmux_kv_cache_limit_bytes",
            "The bound on the KV cache (kv_cache_bytes).",
            value=self._kv.limit_bytes,
        )


def _process_pss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
