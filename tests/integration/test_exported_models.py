"""Adapters on the ONNX files users really have: Optimum and both torch exporters, BERT, DistilBERT,
RoBERTa, GPT-2 (Conv1D, flattened activations), Qwen2 with and without past, ConvNeXt (4-D
activations, a 2-D classifier) and a graph with unnamed nodes, each with PEFT adapters, against
PEFT's own outputs (tests/fixtures/make_export_fixtures.py makes them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import scrape, worker_settings

EXPORTS = Path(__file__).resolve().parents[1] / "fixtures" / "exports"
CASES = json.loads((EXPORTS / "cases.json").read_text())
# Read whole: an NpzFile reads lazily from one zip handle, not safe from several threads.
EXPECTED = dict(np.load(EXPORTS / "expected.npz"))
MODELS = sorted({case["model"] for case in CASES})


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def inputs_of(model: str) -> dict[str, np.ndarray]:
    prefix = f"{model}/input/"
    return {key[len(prefix) :]: EXPECTED[key] for key in EXPECTED if key.startswith(prefix)}


@pytest.fixture(scope="module")
def export_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    models = [arg for name in MODELS for arg in ("--model", f"{name}={EXPORTS / f'{name}.onnx'}")]
    running = start_worker(
        worker_settings(tmp_path_factory.mktemp("exports"), *models, "--max-queue-delay-ms", "200")
    )
    with Client(running.address, timeout=60) as client:
        for case in CASES:
            client.register_adapter(case["model"], case["adapter"], EXPORTS / case["adapter"])
    yield running
    running.stop(0)


@pytest.fixture()
def client(export_worker: Worker) -> Iterator[Client]:
    with Client(export_worker.address, timeout=60) as connected:
        yield connected


@pytest.mark.parametrize("model", MODELS)
def test_base_outputs_equal_the_exporting_library(client: Client, model: str) -> None:
    output = next(case["output"] for case in CASES if case["model"] == model)
    got = client.infer(model, inputs_of(model))[output]
    assert relative_error(got, EXPECTED[f"{model}/base"]) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=[f"{c['model']}+{c['adapter']}" for c in CASES])
def test_each_adapter_equals_peft(client: Client, case: dict) -> None:
    got = client.infer(case["model"], inputs_of(case["model"]), adapter=case["adapter"])[case["output"]]
    want = EXPECTED[f"{case['model']}/{case['adapter']}"]
    assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("model", ["bert-optimum", "gpt2-dynamo", "qwen2-optimum-past", "convnext-dynamo"])
def test_adapters_and_base_rows_share_runs_and_stay_exact(
    export_worker: Worker, client: Client, model: str
) -> None:
    """Requests of different adapters and base-only ones, sent at once, run in shared batches and
    each equals its own reference."""
    adapters = [case["adapter"] for case in CASES if case["model"] == model]
    output = next(case["output"] for case in CASES if case["model"] == model)
    plan = [*adapters, "", *adapters, ""]
    before = _mixed_runs(export_worker, model)
    results: dict[int, np.ndarray] = {}

    def send(index: int, adapter: str) -> None:
        results[index] = client.infer(model, inputs_of(model), adapter=adapter or None)[output]

    threads = [threading.Thread(target=send, args=(i, a)) for i, a in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, adapter in enumerate(plan):
        want = EXPECTED[f"{model}/{adapter or 'base'}"]
        assert relative_error(results[index], want) < (1e-4 if adapter else 1e-5), (index, adapter)
    assert _mixed_runs(export_worker, model) > before, "no run mixed adapters"


def _mixed_runs(worker: Worker, model: str) -> float:
    """Runs of ``model`` that carried at least one adapter and other rows (base or another)."""
    samples = scrape(worker)
    total = 0.0
    for (name, labels), value in samples.items():
        values = dict(labels)
        if name == "ortmux_batch_rows_count" and values.get("model") == model and values["adapters"] != "0":
            total += value
    return total


def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ortmux.worker.cli", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )


def test_inspect_lists_an_optimum_export_as_peft_names_it() -> None:
    result = _inspect(EXPORTS / "bert-optimum.onnx")
    assert "adaptable projections: 12" in result.stdout
    query = r"encoder\.layer\.0\.attention\.self\.query +32 -> 32  weight onnx::MatMul_"
    assert re.search(query, result.stdout)
    assert "(node scope, rows)" in result.stdout
    assert "PEFT target_modules: dense, key, query, value" in result.stdout


def test_inspect_lists_the_unnamed_graph() -> None:
    result = _inspect(EXPORTS / "unnamed.onnx")
    assert "mlp.up_proj    8 -> 16  weight mlp.up_proj.weight  (initializer, rows)" in result.stdout
    assert "mlp.down_proj  16 -> 8  weight mlp.down_proj.weight  (initializer, rows)" in result.stdout


def test_get_model_reports_the_mapping(client: Client) -> None:
    info = client.model_info("gpt2-optimum")
    lora = {t.module: t for t in info.adapter_targets if t.kind == "lora"}
    assert lora["transformer.h.0.attn.c_attn"].layout == "flattened"
    assert lora["transformer.h.0.attn.c_attn"].rule == "initializer"
    assert lora["transformer.h.0.attn.c_attn"].shape == (32, 96)
    assert info.unadaptable == ()


# -- refusals --------------------------------------------------------------------------------------


def _peft_dir(directory: Path, modules: dict[str, tuple[int, int]], rank: int = 2) -> Path:
    """A PEFT adapter for hand-built graphs: module -> (in, out)."""
    from ortmux.worker.adapters import safetensors

    rng = np.random.default_rng(0)
    tensors = {}
    for module, (fan_in, fan_out) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(
            np.float32
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(
            np.float32
        )
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(modules)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


def _graph(path: Path, nodes: list, weights: dict[str, np.ndarray]) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _refusal(tmp_path: Path, model_path: Path, modules: dict[str, tuple[int, int]]) -> OrtmuxError:
    worker = start_worker(worker_settings(tmp_path / "data", "--model", f"m={model_path}"))
    try:
        with Client(worker.address, timeout=30) as client, pytest.raises(OrtmuxError) as caught:
            client.register_adapter("m", "a", _peft_dir(tmp_path / "adapter", modules))
        assert client is not None
        return caught.value
    finally:
        worker.stop(0)


def test_two_candidates_for_one_module_are_refused_listing_both(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weights = {
        "onnx::MatMul_1": rng.standard_normal((8, 8)).astype(np.float32),
        "onnx::MatMul_2": rng.standard_normal((8, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["h"], name="/mlp/proj/MatMul"),
        helper.make_node("MatMul", ["h", "onnx::MatMul_2"], ["y"], name="/mlp/proj/MatMul_1"),
    ]
    error = _refusal(tmp_path, _graph(tmp_path / "g.onnx", nodes, weights), {"mlp.proj": (8, 8)})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mlp.proj (ambiguous: onnx::MatMul_1 (mlp.proj), onnx::MatMul_2 (mlp.proj))" in error.message


def test_an_unmappable_module_is_refused(tmp_path: Path) -> None:
    error = _refusal(tmp_path, EXPORTS / "unnamed.onnx", {"mlp.gate_proj": (8, 16)})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "mlp.gate_proj (no weight of the base model belongs to it)" in error.message
    assert "ortmux inspect" in error.message


def test_an_activation_without_the_batch_in_front_is_refused_with_its_layout(tmp_path: Path) -> None:
    """x [batch, seq, in] transposed to [seq, batch, in] before the projection: a branch per row
    would mix requests, so the module is refused with the reason."""
    weights = {"mlp.proj.weight": np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32)}
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["xt", "mlp.proj.weight"], ["yt"]),
        helper.make_node("Transpose", ["yt"], ["y"], perm=[1, 0, 2]),
    ]
    error = _refusal(tmp_path, _graph(tmp_path / "g.onnx", nodes, weights), {"mlp.proj": (8, 8)})
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "mlp.proj (its projection #1 cannot take a branch: its activation [sequence, batch, 8] "
        in error.message
    )
    assert "does not lead with the batch dimension 'batch'" in error.message


def test_a_target_inside_fused_attention_is_failed_precondition(tmp_path: Path) -> None:
    """ONNX Runtime's transformer optimizer packs BERT's query, key and value into Attention."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(
        str(EXPORTS / "bert-optimum.onnx"), model_type="bert", num_heads=2, hidden_size=32, opt_level=0
    )
    assert any(node.op_type == "Attention" for node in fused.model.graph.node)
    path = tmp_path / "bert-fused.onnx"
    fused.save_model_to_file(str(path))
    worker = start_worker(worker_settings(tmp_path / "data", "--model", f"m={path}"))
    try:
        with Client(worker.address, timeout=30) as client, pytest.raises(OrtmuxError) as caught:
            client.register_adapter("m", "a", EXPORTS / "bert-all")
    finally:
        worker.stop(0)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "fused nodes (Attention '" in caught.value.message
    assert "before ONNX Runtime's transformer optimizer" in caught.value.message
