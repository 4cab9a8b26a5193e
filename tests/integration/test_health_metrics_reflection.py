from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.server import SERVICE_NAMES, Worker, create_server

from ..conftest import scrape, worker_settings


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_is_serving_overall_and_per_service(worker: Worker) -> None:
    for service in ("", *SERVICE_NAMES):
        assert _health(worker.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_health_is_not_serving_before_models_load_and_after_stop(tmp_path) -> None:
    _server, _port, fresh = create_server(worker_settings(tmp_path))
    fresh.server.start()
    try:
        assert _health(fresh.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        fresh.load_models()
        assert _health(fresh.address) == health_pb2.HealthCheckResponse.SERVING
        fresh.health.enter_graceful_shutdown()
        assert _health(fresh.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        fresh.stop(0)


def test_reflection_lists_every_service(worker: Worker) -> None:
    with grpc.insecure_channel(worker.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = {
            service.name for response in responses for service in response.list_services_response.service
        }
    assert set(SERVICE_NAMES) | {"grpc.health.v1.Health"} <= listed


def test_metrics_count_calls_by_method_and_code(
    worker: Worker, client: Client, token_ids: np.ndarray
) -> None:
    client.infer("demo", {"input_ids": token_ids})
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'ortmux_rpcs_total{code="OK",method="/ortmux.v1.InferenceService/Infer"}' in text
    assert 'ortmux_inference_compute_seconds_count{model="demo"}' in text
    assert "ortmux_models_loaded 1.0" in text


def test_metrics_count_failed_calls_by_their_code(
    worker: Worker, client: Client, token_ids: np.ndarray
) -> None:
    with pytest.raises(OrtmuxError):
        client.infer("absent", {"input_ids": token_ids})
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'ortmux_rpcs_total{code="NOT_FOUND",method="/ortmux.v1.InferenceService/Infer"}' in text


def test_metrics_report_model_accounting(worker: Worker) -> None:
    samples = scrape(worker)
    model = worker.dataplane.get_model("demo")
    demo = (("model", "demo"),)
    assert samples[("ortmux_model_arena_bytes", demo)] == model.arena.total_bytes
    assert samples[("ortmux_model_cache_bytes", demo)] == model.entry.total_bytes
    assert samples[("ortmux_model_sessions", demo)] == 2  # the LoRA graph and the base-only graph
    assert samples[("ortmux_model_loads_total", (("cache", "miss"), ("model", "demo")))] == 1
    assert samples[("ortmux_process_pss_bytes", ())] > 10_000_000


def test_metrics_count_every_request_of_unary_calls_and_streams(
    worker: Worker, client: Client, token_ids: np.ndarray
) -> None:
    from ortmux.client import InferRequest

    def requests(code: str, model: str = "demo") -> float:
        key = ("ortmux_requests_total", (("code", code), ("model", model), ("tenant", "default")))
        return scrape(worker).get(key, 0.0)

    ok, bad_dtype, unknown = requests("OK"), requests("INVALID_ARGUMENT"), requests("NOT_FOUND", "")
    seconds = scrape(worker).get(("ortmux_request_duration_seconds_count", (("model", "demo"),)), 0.0)
    client.infer("demo", {"input_ids": token_ids})
    results = list(
        client.stream_infer(
            [
                InferRequest("demo", {"input_ids": token_ids}),
                InferRequest("demo", {"input_ids": token_ids}),
                InferRequest("demo", {"input_ids": token_ids.astype(np.int32)}),
                InferRequest("no-such-model", {"input_ids": token_ids}),
            ]
        )
    )
    assert [r.ok for r in results].count(True) == 2
    assert requests("OK") - ok == 3
    assert requests("INVALID_ARGUMENT") - bad_dtype == 1
    assert requests("NOT_FOUND", "") - unknown == 1  # unknown names never become label values
    assert scrape(worker)[("ortmux_request_duration_seconds_count", (("model", "demo"),))] - seconds == 4
    assert scrape(worker)[("ortmux_requests_in_flight", (("model", "demo"),))] == 0


def test_every_metric_the_worker_exports_is_documented_in_readme(worker: Worker, client: Client) -> None:
    from pathlib import Path

    client.infer("demo", {"input_ids": np.zeros((1, 2), dtype=np.int64)})  # every lazily labelled family
    section = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    families = {
        name.rsplit("_", 1)[0] if name.endswith(("_bucket", "_count", "_sum", "_created")) else name
        for name, _ in scrape(worker)
    }
    families = {name for name in families if name.startswith("ortmux_")}
    missing = sorted(
        name for name in families if f"`{name}`" not in section and f"`{name}_total`" not in section
    )
    assert not missing, missing
