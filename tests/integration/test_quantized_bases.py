"""Quantized bases as users make them (onnxruntime's quantizers after quant_pre_process): they serve
like plain ONNX Runtime, LoRA adapters ride on their quantized projections with float branches
(equal to a reference with the branches written into the quantized graph as constants, alone and
in mixed batches), and what cannot work is refused with what works instead."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.worker.adapters import safetensors
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.demo import build_demo_model, ensure_demo_model
from ortmux.worker.engine.lora.feeds import RowSpan
from ortmux.worker.engine.lora.targets import find_sites
from ortmux.worker.engine.providers import cuda_works

from ..conftest import plain_session, worker_settings
from ..demo_adapters import demo_weight, merged_reference, write_peft
from ..quantized_reference import branched_reference, peft_factors, quantize, relative

IDS = np.random.default_rng(11).integers(0, 1000, size=(2, 8), dtype=np.int64)
# served model -> quantize_fixture kind
ADAPTABLE = {"q8": "int8", "q8f": "int8-fused", "qdq": "qdq", "q4": "int4", "q4a": "int4-acc4"}
OPS = {
    "q8": {"MatMulInteger"},
    "q8f": {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"},
    "qdq": {"DequantizeLinear"},
    "q4": {"MatMulNBits"},
    "q4a": {"MatMulNBits"},
}


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("quantized")
    source = ensure_demo_model(work)
    kinds = {**ADAPTABLE, "qop": "qoperator"}
    return {"float": source} | {
        name: quantize(kind, source, work / f"{name}.onnx") for name, kind in kinds.items()
    }


@pytest.fixture(scope="module")
def quantized_worker(
    tmp_path_factory: pytest.TempPathFactory, quantized_models: dict[str, Path]
) -> Iterator[Worker]:
    models = [arg for name, path in quantized_models.items() for arg in ("--model", f"{name}={path}")]
    running = start_worker(worker_settings(tmp_path_factory.mktemp("quantized-data"), *models))
    adapters = tmp_path_factory.mktemp("quantized-adapters")
    with Client(running.address) as client:
        for name in ADAPTABLE:
            for seed in (0, 1):
                client.register_adapter(name, f"a{seed}", write_peft(adapters / f"{name}-{seed}", seed=seed))
    yield running
    running.stop(0)


@pytest.mark.parametrize("name", [*ADAPTABLE, "qop"])
def test_a_quantized_base_serves_like_plain_onnx_runtime(
    quantized_worker: Worker, quantized_models: dict[str, Path], name: str
) -> None:
    with Client(quantized_worker.address) as client:
        got = client.infer(name, {"input_ids": IDS})["logits"]
    expected = plain_session(quantized_models[name]).run(None, {"input_ids": IDS})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    drift = relative(got, plain_session(quantized_models["float"]).run(None, {"input_ids": IDS})[0])
    print(f"{name} against float32, max |diff| / max |float|: {drift:.4f}")  # reported, not asserted
    assert drift < 0.5


@pytest.mark.parametrize("name", sorted(ADAPTABLE))
def test_lora_on_quantized_projections_equals_the_branches_written_into_the_quantized_graph(
    quantized_worker: Worker, quantized_models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    factors = peft_factors(write_peft(tmp_path / "a0", seed=0))
    reference = branched_reference(
        quantized_models[name], build_demo_model(), [factors] * 2, {"input_ids": IDS}
    )
    with Client(quantized_worker.address) as client:
        got = client.infer(name, {"input_ids": IDS}, adapter="a0")["logits"]
        one_row = client.infer(name, {"input_ids": IDS[:1]}, adapter="a0")["logits"]
        base = client.infer(name, {"input_ids": IDS})["logits"]
        info = client.get_adapter(name, "a0")
    assert relative(got, reference) <= 1e-4
    one_row_reference = branched_reference(
        quantized_models[name], build_demo_model(), [factors], {"input_ids": IDS[:1]}
    )
    assert relative(one_row, one_row_reference) <= 1e-4
    assert relative(got, base) > 1e-2  # the adapter changes the output
    assert len(info.targets) == 3
    float_peft = merged_reference(tmp_path / "a0", IDS)  # int8 + LoRA against float + LoRA: reported
    print(f"{name} + LoRA against float + LoRA: {relative(got, float_peft):.4f}")


@pytest.mark.parametrize("name", sorted(ADAPTABLE))
def test_one_mixed_batch_equals_the_reference_with_each_rows_branches(
    quantized_worker: Worker, quantized_models: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """Rows of two adapters and base-only rows in one run. (Dynamic int8 quantizes activations per
    tensor, so a row's result depends on its batch-mates; the reference runs the same batch.)"""
    model = quantized_worker.dataplane.get_model(name)
    factors = {a: peft_factors(write_peft(tmp_path / a, seed=int(a[1]))) for a in ("a0", "a1")}
    plan = ["a0", None, "a1", "a0"]
    batch = np.concatenate([IDS[:1]] * len(plan))
    with ExitStack() as stack:
        residents = {
            a: stack.enter_context(quantized_worker.dataplane.adapters.use(name, a)) for a in factors
        }
        spans = [RowSpan(i, i + 1, residents[a].lora) for i, a in enumerate(plan) if a]
        mixed = model.run({"input_ids": batch}, lora_spans=spans)["logits"]
    reference = branched_reference(
        quantized_models[name],
        build_demo_model(),
        [factors[a] if a else None for a in plan],
        {"input_ids": batch},
    )
    for row in range(len(plan)):
        assert relative(mixed[row], reference[row]) <= 1e-4, (name, row, plan[row])


def test_the_worker_lists_lora_targets_through_their_quantized_operators(quantized_worker: Worker) -> None:
    with Client(quantized_worker.address) as client:
        for name, op in OPS.items():
            targets = [t for t in client.model_info(name).adapter_targets if t.kind == "lora"]
            assert len(targets) == 13, name
            assert {t.quantized_op for t in targets} == op, name
            assert "layers.0.mlp.up_proj" in {t.module for t in targets}, name


def test_site_discovery_writes_nothing_where_it_runs(
    quantized_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's symbolic shape inference cannot follow the fused int8 operators; its own
    entry point would then save the model and a copy of its weights into the working directory."""
    monkeypatch.chdir(tmp_path)
    assert len(find_sites(onnx.load(str(quantized_models["q8f"]))).sites) == 13
    assert not list(tmp_path.iterdir())


def test_inspect_shows_the_quantized_operator_of_each_target(quantized_models: dict[str, Path]) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "ortmux.worker.cli", "inspect", str(quantized_models["q4"])],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "adaptable projections: 13" in shown
    assert "layers.0.mlp.up_proj" in shown and "through MatMulNBits" in shown


def test_an_explicit_mapping_may_name_the_weight_before_quantization(
    quantized_worker: Worker, tmp_path: Path
) -> None:
    peft = write_peft(tmp_path / "peft", modules=("layers.0.self_attn.q_proj",))
    with Client(quantized_worker.address) as client:
        client.register_adapter(
            "q8",
            "mapped",
            peft,
            module_mapping={"layers.0.self_attn.q_proj": "layers.0.self_attn.q_proj.weight"},
        )
        assert client.get_adapter("q8", "mapped").targets == ("layers.0.self_attn.q_proj.weight_t_quantized",)
        client.delete_adapter("q8", "mapped")


def _error(call) -> OrtmuxError:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("name", sorted(OPS))
def test_overrides_of_quantized_weights_are_refused_naming_the_weight_and_what_works(
    quantized_worker: Worker, tmp_path: Path, name: str
) -> None:
    weight = "layers.0.mlp.up_proj.weight"
    path = tmp_path / "override.safetensors"
    path.write_bytes(safetensors.dump({weight: demo_weight(weight) * 1.01}))
    with Client(quantized_worker.address) as client:
        error = _error(lambda: client.register_adapter(name, "over", path, format="weight_override"))
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION, error
        assert f"weight '{weight}' is quantized" in error.message
        assert any(op in error.message for op in OPS[name])
        assert "LoRA adapter" in error.message and "--overridable" in error.message
        assert "over" not in [a.adapter_id for a in client.list_adapters(name)]


def test_lora_on_a_qoperator_base_is_refused_saying_what_works(
    quantized_worker: Worker, tmp_path: Path
) -> None:
    with Client(quantized_worker.address) as client:
        error = _error(lambda: client.register_adapter("qop", "lora", write_peft(tmp_path / "peft")))
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION, error
        assert "QOperator" in error.message and "QLinearMatMul" in error.message
        assert "QuantFormat.QDQ" in error.message and "quantize_dynamic" in error.message
        assert client.list_adapters("qop") == []
        assert client.infer("qop", {"input_ids": IDS})["logits"].shape == (2, 8, 1000)  # still serving


def test_a_module_the_quantized_base_lacks_is_an_invalid_argument(
    quantized_worker: Worker, tmp_path: Path
) -> None:
    peft = write_peft(tmp_path / "peft", modules=("layers.0.self_attn.q_proj",))
    config = (peft / "adapter_config.json").read_text().replace('"q_proj"', '"nope_proj"')
    (peft / "adapter_config.json").write_text(config)
    tensors = safetensors.load((peft / "adapter_model.safetensors").read_bytes())
    renamed = {key.replace("q_proj", "nope_proj"): value for key, value in tensors.items()}
    (peft / "adapter_model.safetensors").write_bytes(safetensors.dump(renamed))
    with Client(quantized_worker.address) as client:
        error = _error(lambda: client.register_adapter("q4", "nope", peft))
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT, error
        assert "layers.0.self_attn.nope_proj (no weight of the base model belongs to it)" in error.message


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_works(), reason="needs a CUDA device")
def test_a_4bit_base_with_lora_runs_on_cuda_like_on_cpu(
    quantized_models: dict[str, Path], tmp_path: Path
) -> None:
    factors = peft_factors(write_peft(tmp_path / "a0", seed=0))
    reference = branched_reference(
        quantized_models["q4"], build_demo_model(), [factors] * 2, {"input_ids": IDS}
    )
    running = start_worker(
        worker_settings(
            tmp_path / "data",
            "--providers",
            "CUDAExecutionProvider",
            "--model",
            f"q4={quantized_models['q4']}",
        )
    )
    try:
        model = running.dataplane.get_model("q4")
        assert model.providers[0] == "CUDAExecutionProvider"
        with Client(running.address) as client:
            client.register_adapter("q4", "a0", tmp_path / "a0")
            got = client.infer("q4", {"input_ids": IDS}, adapter="a0")["logits"]
        assert relative(got, reference) <= 1e-2  # CUDA's MatMulNBits kernel, not the CPU's
    finally:
        running.stop(0)
