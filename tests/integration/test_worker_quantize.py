"""``--quantize``: the worker quantizes a float base once, when it enters the cache, the way a user
would with onnxruntime's tools, keeps the float graph's module names, and serves LoRA adapters on
it with float branches."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.demo import TransformerShape, build_demo_model, build_transformer, ensure_demo_model
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.cache import ModelCache
from ortmux.worker.engine.lora.targets import find_sites
from ortmux.worker.engine.runtime import RuntimeOptions
from ortmux.worker.errors import InvalidArgument

from ..conftest import plain_session, small_tmpfs, worker_settings
from ..demo_adapters import write_peft
from ..quantized_reference import branched_reference, peft_factors, quantize, relative

IDS = np.random.default_rng(11).integers(0, 1000, size=(2, 8), dtype=np.int64)

PEFT = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
# Read whole: an NpzFile reads lazily from one zip handle, not safe from several threads.
EXPECTED = dict(np.load(PEFT / "expected.npz"))
RECIPES = {"int8": "int8-matmul", "int4": "int4"}  # --quantize -> the same recipe run by hand


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("float"))


@pytest.fixture(scope="module", params=sorted(RECIPES))
def quantizing_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo: Path
) -> Iterator[tuple[str, Worker]]:
    data = tmp_path_factory.mktemp(f"quantize-{request.param}")
    models = ["--model", f"demo={demo}"]
    models += [arg for base in ("llama", "bert") for arg in ("--model", f"{base}={PEFT / f'{base}.onnx'}")]
    running = start_worker(worker_settings(data, "--quantize", request.param, *models))
    yield request.param, running
    running.stop(0)


def test_the_worker_quantizes_as_onnxruntimes_tools_do_and_keeps_module_names(
    quantizing_worker: tuple[str, Worker], demo: Path, tmp_path: Path
) -> None:
    kind, worker = quantizing_worker
    by_hand = quantize(RECIPES[kind], demo, tmp_path / "by-hand.onnx")
    with Client(worker.address) as client:
        got = client.infer("demo", {"input_ids": IDS})["logits"]
        targets = [t for t in client.model_info("demo").adapter_targets if t.kind == "lora"]
        client.register_adapter("demo", "a", write_peft(tmp_path / "peft"))
        adapted = client.infer("demo", {"input_ids": IDS}, adapter="a")["logits"]
    np.testing.assert_allclose(
        got, plain_session(by_hand).run(None, {"input_ids": IDS})[0], rtol=1e-4, atol=1e-4
    )
    assert len(targets) == 13
    assert {t.quantized_op for t in targets} == {"MatMulInteger" if kind == "int8" else "MatMulNBits"}
    assert "layers.1.mlp.up_proj" in {t.module for t in targets}
    factors = peft_factors(tmp_path / "peft")
    reference = branched_reference(by_hand, build_demo_model(), [factors] * 2, {"input_ids": IDS})
    assert relative(adapted, reference) <= 1e-4
    model = worker.dataplane.get_model("demo")
    assert model.key.quantize == f"{kind}-1"
    assert model.quantized  # overrides of its weights are refused like on any quantized base


@pytest.mark.parametrize(("base", "output"), [("llama", "logits"), ("bert", "last_hidden_state")])
def test_a_dynamo_export_keeps_its_module_names_through_the_quantizer(
    quantizing_worker: tuple[str, Worker], base: str, output: str
) -> None:
    """The quantizers drop the dynamo exporter's name_scopes; the worker names the quantized
    projections after the float graph's, so PEFT adapters map as on the float model."""
    kind, worker = quantizing_worker
    adapters = {a: b for a, b in json.loads((PEFT / "adapters.json").read_text()).items() if b == base}
    feeds = {"input_ids": EXPECTED["input_ids"]}
    with Client(worker.address) as client:
        plain = client.infer(base, feeds)[output]
        print(f"{base} {kind} base against torch: {relative(plain, EXPECTED[f'{base}/base']):.4f}")
        for adapter in sorted(adapters):
            client.register_adapter(base, adapter, PEFT / adapter)
            got = client.infer(base, feeds, adapter=adapter)[output]
            drift = relative(got, EXPECTED[adapter])  # against PEFT on the float model: reported
            print(f"{base} {kind} + {adapter} against PEFT in float: {drift:.4f}")
            assert relative(got, plain) > 1e-3  # the adapter is applied
        targets = [t for t in client.model_info(base).adapter_targets if t.kind == "lora"]
    assert len(targets) == {"llama": 15, "bert": 12}[base]
    assert all(t.module and t.quantized_op for t in targets)


def test_quantization_happens_once_per_cache_entry_and_already_quantized_bases_are_kept(
    tmp_path: Path, demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the quantizers' temporary files must not land here
    cache = ModelCache(tmp_path / "cache")
    runtime = RuntimeOptions(providers=("CPUExecutionProvider",), quantize="int8")
    first = BaseModel("demo", demo, runtime, cache)
    again = BaseModel("demo", demo, runtime, cache)
    plain = BaseModel("demo", demo, RuntimeOptions(providers=("CPUExecutionProvider",)), cache)
    assert (first.cache_hit, again.cache_hit, plain.cache_hit) == (False, True, False)
    assert first.key.digest == again.key.digest != plain.key.digest
    assert not list((tmp_path / "cache").glob(".quantize-*"))  # the scratch copy is gone
    assert not list((tmp_path / "cwd").iterdir())
    quantized = quantize("int8", demo, tmp_path / "int8.onnx")
    kept = BaseModel("q8", quantized, runtime, cache)
    assert kept.key.quantize == ""


def test_quantize_and_overridable_do_not_combine(tmp_path: Path, demo: Path) -> None:
    runtime = RuntimeOptions(providers=("CPUExecutionProvider",), quantize="int4")
    with pytest.raises(InvalidArgument, match="--quantize int4 and --overridable do not combine"):
        BaseModel("demo", demo, runtime, ModelCache(tmp_path / "cache"), ["layers.0.*"])


def test_quantize_int8_is_refused_on_cuda_saying_what_runs_there(tmp_path: Path, demo: Path) -> None:
    """Decided before any session: dynamic int8 operators have CPU kernels only."""
    runtime = RuntimeOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), quantize="int8")
    with pytest.raises(InvalidArgument, match=r"CPU only.*--quantize int4 \(MatMulNBits has a CUDA kernel\)"):
        BaseModel("demo", demo, runtime, ModelCache(tmp_path / "cache"))


def test_a_dynamo_export_quantized_by_hand_maps_through_module_mapping(tmp_path: Path) -> None:
    """Quantized outside the worker, the dynamo export's projections lose their names: the error
    says so and what works; a module_mapping from `ortmux inspect` of the float model (the weight
    names before quantization) maps them, equal to the branches written into the quantized graph."""
    quantized = quantize("int8", PEFT / "llama.onnx", tmp_path / "llama-int8.onnx")
    float_model = onnx.load(str(PEFT / "llama.onnx"))
    mapping = {site.module: site.weight for site in find_sites(float_model).sites}
    adapter = PEFT / "llama-r2-mlp"
    running = start_worker(worker_settings(tmp_path / "data", "--model", f"llama={quantized}"))
    try:
        with Client(running.address) as client:
            with pytest.raises(OrtmuxError) as caught:
                client.register_adapter("llama", "plain", adapter)
            assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert "carry no module name" in caught.value.message and "--quantize" in caught.value.message
            client.register_adapter("llama", "mapped", adapter, module_mapping=mapping)
            feeds = {"input_ids": EXPECTED["input_ids"]}
            got = client.infer("llama", feeds, adapter="mapped")["logits"]
    finally:
        running.stop(0)
    factors = peft_factors(adapter)
    rows = [factors] * len(EXPECTED["input_ids"])
    reference = branched_reference(quantized, float_model, rows, feeds, weight_of=mapping.__getitem__)
    assert relative(got, reference) <= 1e-4


def test_a_cache_too_full_to_quantize_into_serves_from_an_uncached_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 31 MB model, a cache with 20 MB free: the quantizer runs out of space (and the space
    comes back when its scratch directory goes), so the worker must read ENOSPC in its output."""
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    shape = TransformerShape(vocab=12000, d_model=256, heads=4, d_ff=1024, layers=2)
    onnx.save_model(
        build_transformer(shape), str(path), save_as_external_data=True, location="model.onnx.data"
    )
    with small_tmpfs(tmp_path / "cache", 48 << 20) as cache:
        ModelCache(cache)  # its bookkeeping directories first, then fill the rest
        (cache / "filler").write_bytes(b"\0" * (28 << 20))
        runtime = RuntimeOptions(providers=("CPUExecutionProvider",), quantize="int8")
        with caplog.at_level(logging.WARNING):
            model = BaseModel("big", path, runtime, ModelCache(cache))
        assert any("is full" in r.message and "uncached" in r.message for r in caplog.records)
        assert not model.entry.cached and model.quantized
        assert not [p for p in cache.iterdir() if p.name.startswith((".build-", ".quantize-"))]
        ids = np.zeros((1, 8), dtype=np.int64)
        assert model.run({"input_ids": ids})["logits"].shape == (1, 8, 12000)


EXPORTS = Path(__file__).resolve().parents[1] / "fixtures" / "exports"


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_every_export_fixture_takes_its_adapters_under_quantize(kind: str, tmp_path: Path) -> None:
    """Optimum, both torch exporters, GPT-2, Qwen2 with past, ConvNeXt, an unnamed graph: with
    --quantize each adapter maps every module it targets and is applied; drift against PEFT in
    float is printed (exactness is shown on the demo and the Llama fixture above)."""
    cases = json.loads((EXPORTS / "cases.json").read_text())
    expected = np.load(EXPORTS / "expected.npz")
    models = sorted({case["model"] for case in cases})

    def inputs(model: str) -> dict[str, np.ndarray]:
        prefix = f"{model}/input/"
        return {key[len(prefix) :]: expected[key] for key in expected.files if key.startswith(prefix)}

    flags = [arg for model in models for arg in ("--model", f"{model}={EXPORTS / f'{model}.onnx'}")]
    running = start_worker(worker_settings(tmp_path / "data", "--quantize", kind, *flags))
    try:
        with Client(running.address, timeout=120) as client:
            quantized = {
                model: {t.quantized_op for t in client.model_info(model).adapter_targets if t.kind == "lora"}
                for model in models
            }
            for case in cases:
                model, adapter, output = case["model"], case["adapter"], case["output"]
                client.register_adapter(model, adapter, EXPORTS / adapter)
                got = client.infer(model, inputs(model), adapter=adapter)[output]
                base = client.infer(model, inputs(model))[output]
                drift = relative(got, expected[f"{model}/{adapter}"])
                print(f"{kind} {model} + {adapter} against PEFT in float: {drift:.4f}")
                effect = relative(expected[f"{model}/{adapter}"], expected[f"{model}/base"])
                if effect > 1e-3:  # (ConvNeXt's adapter moves its pooled output by 4e-6 in PEFT)
                    assert relative(got, base) > effect / 10, (model, adapter)
                assert drift < 0.5, (model, adapter, drift)
    finally:
        running.stop(0)
    op = "MatMulInteger" if kind == "int8" else "MatMulNBits"
    assert all(op in ops for model, ops in quantized.items() if model != "convnext-dynamo"), quantized
