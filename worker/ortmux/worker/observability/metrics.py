"""Every Prometheus metric of the worker, on one injected registry, served on its own port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self._http_server: object | None = None

    def observe_inference(self, model: str, seconds: float, rows: int) -> None:
        self.inference_seconds.labels(model).observe(seconds)
        self.inference_rows.labels(model).observe(rows)

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
