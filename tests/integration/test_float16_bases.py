"""A float16 base (as GPU exports and 4-bit CUDA recipes have them) takes LoRA adapters: the
branches run in the base's type, fed factors of that type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortmux.client import Client
from ortmux.worker.adapters import safetensors
from ortmux.worker.api.server import start_worker

from ..conftest import plain_session, worker_settings

RNG = np.random.default_rng(3)
W = RNG.standard_normal((16, 8)).astype(np.float16)  # [in, out], read by MatMul as is


def _projection(weight: np.ndarray, *, relu: bool) -> onnx.ModelProto:
    """``y = x @ weight`` in float16 (then a Relu, when asked), the projection module "proj"."""
    fan_in, fan_out = weight.shape
    nodes = [helper.make_node("MatMul", ["x", "proj.weight"], ["h" if relu else "y"], name="/proj/MatMul")]
    if relu:
        nodes.append(helper.make_node("Relu", ["h"], ["y"], name="/act/Relu"))
    graph = helper.make_graph(
        nodes,
        "float16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", fan_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", fan_out])],
        [numpy_helper.from_array(weight, "proj.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _peft(directory: Path, a: np.ndarray, b: np.ndarray) -> Path:
    directory.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b}
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


def test_lora_on_a_float16_base_runs_in_float16_and_equals_the_merged_weight(tmp_path: Path) -> None:
    path = tmp_path / "fp16.onnx"
    onnx.save(_projection(W, relu=True), str(path))
    a = RNG.standard_normal((2, 16)).astype(np.float32) * 0.3
    b = RNG.standard_normal((8, 2)).astype(np.float32) * 0.3
    x = RNG.standard_normal((3, 5, 16)).astype(np.float16)
    running = start_worker(worker_settings(tmp_path / "data", "--model", f"m={path}"))
    try:
        with Client(running.address) as client:
            client.register_adapter("m", "a", _peft(tmp_path / "peft", a, b))
            got = client.infer("m", {"x": x}, adapter="a")["y"]
            one_row = client.infer("m", {"x": x[:1]}, adapter="a")["y"]
            base = client.infer("m", {"x": x})["y"]
        resident = running.dataplane.adapters.use("m", "a")
        with resident as weights:
            assert {f.a.dtype.name for f in weights.lora.values()} == {"float16"}
    finally:
        running.stop(0)
    merged = (x.astype(np.float32) @ (W.astype(np.float32) + 2.0 * (b @ a).T)).clip(min=0)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), merged, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(one_row, got[:1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(base, plain_session(path).run(None, {"x": x})[0], rtol=1e-3, atol=1e-3)
    assert np.abs(got.astype(np.float32) - base.astype(np.float32)).max() > 0.1


def test_lora_on_a_4bit_base_with_float16_activations(tmp_path: Path) -> None:
    """MatMulNBits with float16 scales, as 4-bit CUDA recipes make them: the branch is float16."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weight = RNG.standard_normal((64, 32)).astype(np.float16)
    quantizer = MatMulNBitsQuantizer(_projection(weight, relu=False), block_size=32, is_symmetric=True)
    quantizer.process()
    path = tmp_path / "q4.onnx"
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    a = RNG.standard_normal((2, 64)).astype(np.float32) * 0.2
    b = RNG.standard_normal((32, 2)).astype(np.float32) * 0.2
    x = RNG.standard_normal((2, 4, 64)).astype(np.float16)
    running = start_worker(worker_settings(tmp_path / "data", "--model", f"q4={path}"))
    try:
        with Client(running.address) as client:
            (target,) = [t for t in client.model_info("q4").adapter_targets if t.kind == "lora"]
            assert (target.module, target.quantized_op) == ("proj", "MatMulNBits")
            client.register_adapter("q4", "a", _peft(tmp_path / "peft", a, b))
            got = client.infer("q4", {"x": x}, adapter="a")["y"]
    finally:
        running.stop(0)
    quantized = plain_session(path).run(None, {"x": x})[0].astype(np.float32)
    expected = quantized + x.astype(np.float32) @ (2.0 * (b @ a).T)
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-2, atol=2e-2)
