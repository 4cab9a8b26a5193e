"""While a base model is being optimized, the API says it is loading and the worker keeps answering."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.server import create_server
from ortmux.worker.demo import ensure_demo_model
from ortmux.worker.engine.cache import CacheKey, ModelCache, cpu_signature

from ..conftest import worker_settings


def test_model_reports_loading_until_its_optimization_finishes(tmp_path: Path) -> None:
    settings = worker_settings(tmp_path)
    demo = ensure_demo_model(tmp_path)
    key = CacheKey(
        model_sha256=ModelCache(settings.cache_path()).content_sha256(demo),
        onnxruntime_version=ort.__version__,
        providers=("CPUExecutionProvider",),
        optimization_level="all",
        cpu=cpu_signature(),
        overridable=(),
    )
    _server, _port, worker = create_server(settings)
    worker.server.start()
    # Hold the entry's build lock, as another worker process optimizing the same model would.
    with open(settings.cache_path() / f".{key.digest}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        loader = threading.Thread(target=worker.load_models)
        loader.start()
        try:
            with Client(worker.address, timeout=10, retry_attempts=1) as client:
                deadline = time.monotonic() + 30
                while [(m.name, m.state) for m in client.list_models()] != [("demo", "loading")]:
                    assert time.monotonic() < deadline, "the model never showed as loading"
                    time.sleep(0.02)
                with pytest.raises(OrtmuxError) as caught:
                    client.infer("demo", {"input_ids": np.zeros((1, 2), np.int64)})
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
                assert caught.value.message == "model 'demo' is loading; retry shortly"
                assert caught.value.retry_after == 1.0
                with grpc.insecure_channel(worker.address) as channel:
                    health = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
                loader.join(timeout=60)
                assert [(m.name, m.state) for m in client.list_models()] == [("demo", "ready")]
                assert client.infer("demo", {"input_ids": np.zeros((1, 2), np.int64)})["logits"].shape == (
                    1,
                    2,
                    1000,
                )
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            loader.join(timeout=60)
            worker.stop(0)
