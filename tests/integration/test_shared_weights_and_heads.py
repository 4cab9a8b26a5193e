"""Adapters on weights used more than once, and trained classification heads, against PEFT's own
outputs (tests/fixtures/make_head_fixtures.py makes the fixtures).

- DeBERTa-v3-style attention applies ``query_proj``/``key_proj`` to the hidden states and again to
  the relative position embeddings ([1, 2*span, hidden], shared by every row): both calls take the
  adapter, and the adapter's rows run without other adapters or base rows;
- ALBERT applies one layer's weights at every depth: every call takes the adapter, per row;
- SEQ_CLS / TOKEN_CLS adapters save their heads in full (``modules_to_save``): served per row as
  the exact change from the base's head, mixed with other adapters and base rows in one run.
"""

from __future__ import annotations

import json
import shutil
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
from ortmux.worker.adapters import safetensors
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import scrape, worker_settings

HEADS = Path(__file__).resolve().parents[1] / "fixtures" / "heads"
CASES = json.loads((HEADS / "cases.json").read_text())
# Read whole: an NpzFile reads lazily from one zip handle, not safe from several threads.
EXPECTED = dict(np.load(HEADS / "expected.npz"))
MODELS = sorted({case["model"] for case in CASES})
SERVED = [case for case in CASES if not case.get("refused")]
OUTPUT = {case["model"]: case["output"] for case in CASES}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def inputs_of(model: str) -> dict[str, np.ndarray]:
    prefix = f"{model}/input/"
    return {key[len(prefix) :]: EXPECTED[key] for key in EXPECTED if key.startswith(prefix)}


def value_only(directory: Path, source: Path) -> Path:
    """``source``'s adapter cut down to its value_proj modules: per row on DeBERTa."""
    directory.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    config["target_modules"] = ["value_proj"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = safetensors.load((source / "adapter_model.safetensors").read_bytes())
    kept = {name: value for name, value in tensors.items() if ".value_proj." in name}
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(kept))
    return directory


@pytest.fixture(scope="module")
def heads_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    data = tmp_path_factory.mktemp("heads")
    models = [arg for name in MODELS for arg in ("--model", f"{name}={HEADS / f'{name}.onnx'}")]
    running = start_worker(worker_settings(data, *models, "--max-queue-delay-ms", "200"))
    with Client(running.address, timeout=60) as client:
        for case in SERVED:
            client.register_adapter(case["model"], case["adapter"], HEADS / case["adapter"])
        client.register_adapter("deberta", "deberta-v", value_only(data / "deberta-v", HEADS / "deberta-qkv"))
    yield running
    running.stop(0)


@pytest.fixture()
def client(heads_worker: Worker) -> Iterator[Client]:
    with Client(heads_worker.address, timeout=60) as connected:
        yield connected


@pytest.mark.parametrize("model", MODELS)
def test_base_outputs_equal_the_exporting_library(client: Client, model: str) -> None:
    got = client.infer(model, inputs_of(model))[OUTPUT[model]]
    assert relative_error(got, EXPECTED[f"{model}/base"]) < 1e-5


@pytest.mark.parametrize("case", SERVED, ids=[case["adapter"] for case in SERVED])
def test_each_adapter_equals_peft(client: Client, case: dict) -> None:
    got = client.infer(case["model"], inputs_of(case["model"]), adapter=case["adapter"])[case["output"]]
    want = EXPECTED[f"{case['model']}/{case['adapter']}"]
    assert relative_error(got, want) < 1e-4
    # The adapter changes the output: a branch missing from a call would show against PEFT.
    assert relative_error(want, EXPECTED[f"{case['model']}/base"]) > 1e-2


def _runs(worker: Worker, metric: str, model: str) -> dict[str, float]:
    """Runs of ``model`` by their mix (base, adapter, adapters, adapter+base, adapters+base)."""
    found: dict[str, float] = {}
    for (name, labels), value in scrape(worker).items():
        values = dict(labels)
        if name == f"{metric}_total" and values.get("model") == model:
            found[values["mix"]] = found.get(values["mix"], 0.0) + value
    return found


def _send_at_once(client: Client, model: str, plan: list[str]) -> dict[int, np.ndarray]:
    results: dict[int, np.ndarray] = {}

    def send(index: int, adapter: str) -> None:
        results[index] = client.infer(model, inputs_of(model), adapter=adapter or None)[OUTPUT[model]]

    threads = [threading.Thread(target=send, args=(i, a)) for i, a in enumerate(plan)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _growth(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {mix: after[mix] - before.get(mix, 0.0) for mix in after if after[mix] > before.get(mix, 0.0)}


def test_an_adapter_on_shared_activations_never_shares_a_run(heads_worker: Worker, client: Client) -> None:
    """DeBERTa's q/k adapter changes the relative position projections every row shares: under
    concurrent load with base rows and a per-row adapter, its rows run only among themselves,
    exact; the others still mix."""
    alone = client.infer("deberta", inputs_of("deberta"), adapter="deberta-v")[OUTPUT["deberta"]]
    plan = ["deberta-qkv", "", "deberta-v", "deberta-qkv", "", "deberta-v"] * 2
    runs_before = _runs(heads_worker, "ortmux_batch_runs", "deberta")
    exclusive_before = _runs(heads_worker, "ortmux_exclusive_adapter_runs", "deberta")
    results = _send_at_once(client, "deberta", plan)
    for index, adapter in enumerate(plan):
        want = alone if adapter == "deberta-v" else EXPECTED[f"deberta/{adapter or 'base'}"]
        assert relative_error(results[index], want) < 1e-4, (index, adapter)
    exclusive = _growth(exclusive_before, _runs(heads_worker, "ortmux_exclusive_adapter_runs", "deberta"))
    assert exclusive and set(exclusive) == {"adapter"}, exclusive
    runs = _growth(runs_before, _runs(heads_worker, "ortmux_batch_runs", "deberta"))
    assert runs.get("adapter+base", 0) > 0, runs  # deberta-v mixed with base rows meanwhile


@pytest.mark.parametrize(
    ("model", "adapters"),
    [
        ("albert", ["albert-qv"]),
        ("bert-cls", ["bert-cls-a", "bert-cls-b"]),
        ("roberta-cls", ["roberta-cls-a", "roberta-cls-b"]),
        ("bert-tok", ["bert-tok-a"]),
    ],
)
def test_adapters_share_runs_with_other_adapters_and_base_rows_and_stay_exact(
    heads_worker: Worker, client: Client, model: str, adapters: list[str]
) -> None:
    plan = [*adapters, "", *adapters, ""] * 2
    before = _runs(heads_worker, "ortmux_batch_runs", model)
    results = _send_at_once(client, model, plan)
    for index, adapter in enumerate(plan):
        want = EXPECTED[f"{model}/{adapter or 'base'}"]
        assert relative_error(results[index], want) < (1e-4 if adapter else 1e-5), (index, adapter)
    runs = _growth(before, _runs(heads_worker, "ortmux_batch_runs", model))
    mixed = "adapters+base" if len(adapters) > 1 else "adapter+base"
    assert runs.get(mixed, 0) > 0, runs


def test_a_head_trained_with_another_label_count_is_refused(client: Client) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.register_adapter("roberta-cls", "five", HEADS / "roberta-cls-5")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = caught.value.message
    assert "modules_to_save 'classifier.out_proj' has weight [5, 32] (32 -> 5)" in message
    assert "'classifier.out_proj.weight' is 32 -> 3" in message
    assert "a base model exported with that head size (5 outputs)" in message


def _with_tensor(directory: Path, source: Path, name: str, value: np.ndarray, saved: list[str]) -> Path:
    shutil.copytree(source, directory)
    config = json.loads((source / "adapter_config.json").read_text())
    config["modules_to_save"] = saved
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = safetensors.load((source / "adapter_model.safetensors").read_bytes())
    tensors[name] = value
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        ("bert.embeddings.word_embeddings", (100, 32), "are served per request, not trained embeddings"),
        ("bert.embeddings.LayerNorm", (32,), "is not a Linear layer"),
    ],
)
def test_trained_modules_that_are_not_linear_are_refused(
    client: Client, tmp_path: Path, module: str, shape: tuple[int, ...], expected: str
) -> None:
    saved = ["classifier", module.rsplit(".", 1)[-1]]
    value = np.ones(shape, np.float32)
    adapter = _with_tensor(
        tmp_path / "a", HEADS / "bert-cls-a", f"base_model.model.{module}.weight", value, saved
    )
    with pytest.raises(OrtmuxError) as caught:
        client.register_adapter("bert-cls", "not-linear", adapter)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert module in caught.value.message
    assert expected in caught.value.message


def test_get_model_lists_every_call_of_a_module(client: Client) -> None:
    info = client.model_info("deberta")
    lora = [t for t in info.adapter_targets if t.kind == "lora"]
    query = [t for t in lora if t.module.startswith("encoder.layer.0.attention.self.query_proj")]
    assert [t.node for t in query] == [
        "/encoder/layer.0/attention/self/query_proj/MatMul",
        "/encoder/layer.0/attention/self/query_proj_1/MatMul",
    ]
    assert [t.per_row for t in query] == [True, False]
    assert query[0].group == query[1].group
    value = next(t for t in lora if t.module == "encoder.layer.0.attention.self.value_proj")
    assert value.per_row and value.group != query[0].group
    albert = [t for t in client.model_info("albert").adapter_targets if ".attention.query" in t.module]
    assert len(albert) == 3 and len({t.group for t in albert}) == 1 and all(t.per_row for t in albert)
    head = next(t for t in client.model_info("bert-tok").adapter_targets if t.module == "classifier")
    assert head.bias == "classifier.bias"


def test_inspect_lists_both_uses_of_query_proj() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ortmux.worker.cli", "inspect", str(HEADS / "deberta.onnx")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "encoder.layer.0.attention.self.query_proj " in line)
    assert "one adapter per run" in lines[start]
    assert (
        lines[start + 1].strip() == "call /encoder/layer.0/attention/self/query_proj/MatMul  (rows, per row)"
    )
    assert lines[start + 2].strip() == (
        "call /encoder/layer.0/attention/self/query_proj_1/MatMul  (rows, activation shared by every row)"
    )
    assert "query_proj_1," not in result.stdout.split("PEFT target_modules:")[1]


# -- hand-built graphs -----------------------------------------------------------------------------

RNG = np.random.default_rng(7)
W = RNG.standard_normal((8, 8)).astype(np.float32)  # proj.weight as torch stores it, [out, in]
A = RNG.standard_normal((2, 8)).astype(np.float32)  # lora_A [r, in]
B = RNG.standard_normal((8, 2)).astype(np.float32)  # lora_B [out, r]


def _twice_graph(path: Path, second: list) -> Path:
    """y = x @ W.T + relu(x) @ <second use of W>: the second MatMul under the same module's repeated
    call scope, reading W as ``second`` makes it."""
    nodes = [
        helper.make_node("Transpose", ["proj.weight"], ["wt"], perm=[1, 0], name="/proj/Transpose"),
        helper.make_node("MatMul", ["x", "wt"], ["h1"], name="/proj/MatMul"),
        helper.make_node("Relu", ["x"], ["r"], name="/Relu"),
        *second,
        helper.make_node("MatMul", ["r", "w2"], ["h2"], name="/proj_1/MatMul"),
        helper.make_node("Add", ["h1", "h2"], ["y"], name="/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "twice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [
            numpy_helper.from_array(W, "proj.weight"),
            numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
            numpy_helper.from_array(np.array([8, 8], np.int64), "ends"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _proj_adapter(directory: Path) -> Path:
    directory.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    tensors = {"base_model.model.proj.lora_A.weight": A, "base_model.model.proj.lora_B.weight": B}
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


def test_a_weight_read_twice_through_identity_takes_the_branch_at_both(tmp_path: Path) -> None:
    second = [helper.make_node("Identity", ["wt"], ["w2"], name="/proj_1/Identity")]
    path = _twice_graph(tmp_path / "twice.onnx", second)
    worker = start_worker(worker_settings(tmp_path / "data", "--model", f"m={path}"))
    try:
        with Client(worker.address, timeout=30) as client:
            client.register_adapter("m", "a", _proj_adapter(tmp_path / "adapter"))
            x = RNG.standard_normal((3, 4, 8)).astype(np.float32)
            got = client.infer("m", {"x": x}, adapter="a")["y"]
    finally:
        worker.stop(0)
    merged = W + 2.0 * B @ A  # PEFT merges scale * B @ A into the Linear, used at both calls
    want = x @ merged.T + np.maximum(x, 0) @ merged.T
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    partial = x @ merged.T + np.maximum(x, 0) @ W.T
    assert np.abs(got - partial).max() > 1e-2 * np.abs(want).max()


def test_a_weight_reached_through_a_slice_refuses_the_adapter(tmp_path: Path) -> None:
    second = [helper.make_node("Slice", ["wt", "starts", "ends"], ["w2"], name="/proj_1/Slice")]
    path = _twice_graph(tmp_path / "sliced.onnx", second)
    worker = start_worker(worker_settings(tmp_path / "data", "--model", f"m={path}"))
    try:
        with Client(worker.address, timeout=30) as client:
            with pytest.raises(OrtmuxError) as caught:
                client.register_adapter("m", "a", _proj_adapter(tmp_path / "adapter"))
            assert client.list_adapters("m") == []
    finally:
        worker.stop(0)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    message = caught.value.message
    assert "cannot serve adapter module 'proj' exactly" in message
    assert "MatMul node '/proj_1/MatMul'" in message
    assert "through Transpose -> Slice" in message
