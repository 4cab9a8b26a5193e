"""PEFT LoRA adapters of real (tiny, random) transformers, exported with torch.onnx dynamo, through
the real server: outputs equal PEFT's own within 1e-4 relative, alone and in mixed batches; with
the LoRA kernel (factors read in place) and with MatMul on copied factors.

Fixtures come from tests/fixtures/make_fixtures.py (needs torch, transformers and peft).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.engine.lora.feeds import RowSpan

from ..conftest import worker_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "peft"
ADAPTER_BASES: dict[str, str] = json.loads((FIXTURES / "adapters.json").read_text())
# Read whole: an NpzFile reads lazily from one zip handle, not safe from several threads.
EXPECTED = dict(np.load(FIXTURES / "expected.npz"))
OUTPUT = {"bert": "last_hidden_state", "llama": "logits"}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=["kernel", "matmul"])
def peft_worker(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Worker]:
    data_dir = tmp_path_factory.mktemp("peft-data")
    models = [arg for base in OUTPUT for arg in ("--model", f"{base}={FIXTURES / f'{base}.onnx'}")]
    running = start_worker(worker_settings(data_dir, *models, "--lora-branch", request.param))
    model = running.dataplane.get_model("llama")
    assert all(bool(lora.table) == (request.param == "kernel") for lora in model.lora_inputs)
    with Client(running.address) as client:
        for adapter, base in ADAPTER_BASES.items():
            client.register_adapter(base, adapter, FIXTURES / adapter)
    yield running
    running.stop(0)


@pytest.mark.parametrize("base", sorted(OUTPUT))
def test_base_outputs_equal_torch(peft_worker: Worker, base: str) -> None:
    with Client(peft_worker.address) as client:
        outputs = client.infer(base, {"input_ids": EXPECTED["input_ids"]})
    assert relative_error(outputs[OUTPUT[base]], EXPECTED[f"{base}/base"]) <= 1e-4


@pytest.mark.parametrize("adapter", sorted(ADAPTER_BASES))
def test_adapter_outputs_equal_peft(peft_worker: Worker, adapter: str) -> None:
    base = ADAPTER_BASES[adapter]
    with Client(peft_worker.address) as client:
        outputs = client.infer(base, {"input_ids": EXPECTED["input_ids"]}, adapter=adapter)
        info = client.get_adapter(base, adapter)
        one_row = client.infer(base, {"input_ids": EXPECTED["input_ids"][:1]}, adapter=adapter)
    reference = EXPECTED[adapter]
    assert relative_error(outputs[OUTPUT[base]], reference) <= 1e-4
    assert relative_error(one_row[OUTPUT[base]], reference[:1]) <= 1e-4
    # and the adapter really changes the output
    assert relative_error(EXPECTED[f"{base}/base"], reference) > 1e-3
    assert info.format == "peft_lora"
    assert info.resident


def test_rank_pattern_and_rslora_are_honoured(peft_worker: Worker) -> None:
    with Client(peft_worker.address) as client:
        pattern = client.get_adapter("bert", "bert-rank-pattern")
        rslora = client.get_adapter("llama", "llama-r8-rslora")
    assert pattern.rank == 8  # r=8, with key projections at rank 2 by rank_pattern
    assert len(pattern.targets) == 2 * 6  # query, key, value and three dense layers per block
    assert rslora.rank == 8


@pytest.mark.parametrize("base", sorted(OUTPUT))
def test_one_mixed_batch_equals_each_request_alone(peft_worker: Worker, base: str) -> None:
    """Rows of different adapters and base-only rows in one run give each row its own result."""
    model = peft_worker.dataplane.get_model(base)
    adapters = sorted(a for a, b in ADAPTER_BASES.items() if b == base)
    ids = EXPECTED["input_ids"]
    rows = ids.shape[0]
    plan = [*adapters, None, *reversed(adapters)]  # each segment: one copy of the fixture inputs
    with ExitStack() as stack:
        residents = {a: stack.enter_context(peft_worker.dataplane.adapters.use(base, a)) for a in adapters}
        spans = [
            RowSpan(i * rows, (i + 1) * rows, residents[a].lora) for i, a in enumerate(plan) if a is not None
        ]
        batch = {"input_ids": np.concatenate([ids] * len(plan))}
        mixed = model.run(batch, lora_spans=spans)[OUTPUT[base]]
    for i, adapter in enumerate(plan):
        reference = EXPECTED[adapter] if adapter else EXPECTED[f"{base}/base"]
        assert relative_error(mixed[i * rows : (i + 1) * rows], reference) <= 1e-4, adapter
