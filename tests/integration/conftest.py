"""Fixtures of the integration tests: the worker the Open Inference Protocol tests share (an
admin key, a tenant with an adapter, the demo model and the test models of oip_models), and the
worker serving the generation fixtures with their adapters (generation_cases)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ortmux.client import Client
from ortmux.worker.api import oip_convert
from ortmux.worker.api.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.auth import key_digest

from ..conftest import worker_settings
from ..demo_adapters import write_peft
from .generation_cases import FAMILIES, FIXTURES, runs
from .oip_models import ADMIN_KEY, TENANT_KEY, TYPES, faulty_model, types_model


@pytest.fixture(scope="module")
def oip_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    data = tmp_path_factory.mktemp("oip")
    keys = data / "keys.toml"
    keys.write_text(
        f'[[key]]\nsha256 = "{key_digest(ADMIN_KEY)}"\ntenant = "ops"\nrole = "admin"\n\n'
        f'[[key]]\nsha256 = "{key_digest(TENANT_KEY)}"\ntenant = "acme"\nrole = "tenant"\n'
    )
    model = types_model(data / "types.onnx")
    typed = types_model(data / "typed.onnx", tuple(t for t in TYPES if t in oip_convert.TYPED_FIELD))
    flags = ["--api-keys-file", str(keys), "--model", f"demo={_demo(data)}", "--model", f"types={model}"]
    flags += ["--model", f"typed={typed}", "--model", f"faulty={faulty_model(data / 'faulty.onnx')}"]
    running = start_worker(worker_settings(data, *flags))
    with Client(running.address, api_key=TENANT_KEY) as client:
        client.register_adapter("demo", "acme-a", write_peft(data / "peft", seed=60))
    yield running
    running.stop(0)


def _demo(data: Path) -> Path:
    from ortmux.worker.demo import ensure_demo_model

    return ensure_demo_model(data)


@pytest.fixture()
def stub(oip_worker: Worker) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(oip_worker.address) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def generation_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    models = [
        arg for family in FAMILIES for arg in ("--model", f"{family}={FIXTURES / family / 'model.onnx'}")
    ]
    running = start_worker(worker_settings(tmp_path_factory.mktemp("generation"), *models))
    with Client(running.address, timeout=60) as client:
        for family in FAMILIES:
            for adapter in runs(family)[1:]:
                client.register_adapter(family, adapter, FIXTURES / adapter)
    yield running
    running.stop(0)


@pytest.fixture()
def generation_client(generation_worker: Worker) -> Iterator[Client]:
    with Client(generation_worker.address, timeout=60) as connected:
        yield connected
