"""Quantized bases as users make them (onnxruntime's quant_pre_process + quantize_dynamic): they
load and serve, and adapters they cannot take are refused with what works instead."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.worker.adapters import safetensors
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.demo import ensure_demo_model

from ..conftest import plain_session, worker_settings
from ..demo_adapters import demo_weight, write_peft

IDS = np.random.default_rng(11).integers(0, 1000, size=(2, 8), dtype=np.int64)


QUANTIZE = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
source, prepared, quantized = sys.argv[1:4]
quant_pre_process(source, prepared)  # folds the weights' Transposes, so the MatMuls get quantized
quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8)
"""


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo model quantized as a user would, in a process of its own (the pre-processing
    optimizes with per-session threads, which this process's global pool forbids)."""
    work = tmp_path_factory.mktemp("int8")
    source = ensure_demo_model(work)
    quantized = work / "int8.onnx"
    subprocess.run(
        [sys.executable, "-c", QUANTIZE, str(source), str(work / "prepared.onnx"), str(quantized)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return source, quantized


@pytest.fixture(scope="module")
def int8_worker(tmp_path_factory: pytest.TempPathFactory, int8_model: tuple[Path, Path]) -> Iterator[Worker]:
    running = start_worker(
        worker_settings(tmp_path_factory.mktemp("int8-data"), "--model", f"q8={int8_model[1]}")
    )
    yield running
    running.stop(0)


def test_a_dynamically_quantized_base_serves_like_plain_onnx_runtime(
    int8_worker: Worker, int8_model: tuple[Path, Path]
) -> None:
    source, quantized = int8_model
    with Client(int8_worker.address) as client:
        got = client.infer("q8", {"input_ids": IDS})["logits"]
    expected = plain_session(quantized).run(None, {"input_ids": IDS})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    float_logits = plain_session(source).run(None, {"input_ids": IDS})[0]
    drift = float(np.abs(got - float_logits).max() / np.abs(float_logits).max())
    print(f"int8 against float32, max |diff| / max |float|: {drift:.4f}")  # reported, not asserted
    assert drift < 0.5


def _error(call) -> OrtmuxError:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value


def test_overrides_of_quantized_weights_are_refused_naming_the_weight_and_what_works(
    int8_worker: Worker, tmp_path: Path
) -> None:
    name = "layers.0.mlp.up_proj.weight"
    path = tmp_path / "override.safetensors"
    path.write_bytes(safetensors.dump({name: demo_weight(name) * 1.01}))
    with Client(int8_worker.address) as client:
        error = _error(lambda: client.register_adapter("q8", "over", path, format="weight_override"))
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION, error
        assert f"weight '{name}' is quantized" in error.message and "MatMulInteger" in error.message
        assert "LoRA adapter" in error.message and "--overridable" in error.message
        assert client.list_adapters("q8") == []


def test_lora_on_quantized_projections_is_refused_saying_what_works(
    int8_worker: Worker, tmp_path: Path
) -> None:
    with Client(int8_worker.address) as client:
        error = _error(lambda: client.register_adapter("q8", "lora", write_peft(tmp_path / "peft")))
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION, error
        assert "is quantized (" in error.message and "MatMulInteger" in error.message
        assert "float model" in error.message
        assert client.infer("q8", {"input_ids": IDS})["logits"].shape == (2, 8, 1000)  # still serving
