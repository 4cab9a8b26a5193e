"""The paged-attention rewrite (engine/paged.py) on the exports users make: GPT-2, Llama and Qwen2
(Optimum, tests/fixtures/make_generation_fixtures.py), Mistral with grouped KV heads and a sliding
window shorter than the context, and Phi-3 with its fused QKV projection
(tests/fixtures/make_attention_fixtures.py). Rows of different lengths share one paged prefill
and then decode steps; every row's logits equal the exported graph's run alone (1e-5). A decoder
whose attention does not match keeps the dense cache, and says why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from ortmux.client import Client
from ortmux.worker.api.server import start_worker
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.cache import ModelCache
from ortmux.worker.engine.paged import BLOCK_TOKENS
from ortmux.worker.engine.paged_model import PagedModel, paged_or_reason
from ortmux.worker.engine.runtime import RuntimeOptions
from ortmux.worker.generation.model_files import read_generation_config

from ..conftest import worker_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODELS = {
    "gpt2": FIXTURES / "generation" / "gpt2" / "model.onnx",
    "llama": FIXTURES / "generation" / "llama" / "model.onnx",
    "qwen2": FIXTURES / "generation" / "qwen2" / "model.onnx",
    "mistral": FIXTURES / "attention" / "mistral" / "model.onnx",
    "phi3": FIXTURES / "attention" / "phi3" / "model.onnx",
}
LENGTHS = (3, 40, 17)  # Mistral's window is 24: the 40-token row attends over a window
STEPS = 4


def _dense(model: BaseModel, ids: list[int], past: list[np.ndarray] | None) -> tuple[np.ndarray, list]:
    decoder = model.decoder
    start = 0 if past is None else past[0].shape[2]
    feeds = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, start + len(ids)), np.int64),
        "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[np.newaxis],
    }
    empty = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), np.float32)
    names = decoder.cache_names()
    for i, (name, _present) in enumerate(names):
        feeds[name] = empty if past is None else past[i]
    out = model.run(feeds, [decoder.logits, *(present for _name, present in names)])
    return out[decoder.logits][0, -1], [out[present] for _name, present in names]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_paged_rows_of_different_lengths_equal_the_exported_graph_alone(tmp_path: Path, family: str) -> None:
    path = MODELS[family]
    model = BaseModel(family, path, RuntimeOptions(providers=("CPUExecutionProvider",)), ModelCache(tmp_path))
    window = read_generation_config(path).sliding_window
    assert (window == 24) == (family == "mistral")
    paged = paged_or_reason(model, model.decoder, window)
    assert isinstance(paged, PagedModel), paged
    decoder = model.decoder
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 90, n).tolist() for n in LENGTHS]
    width = (max(LENGTHS) + STEPS + BLOCK_TOKENS - 1) // BLOCK_TOKENS
    blocks = width * len(prompts) + 3
    pool = np.zeros((decoder.layers, 2, blocks, decoder.kv_heads, BLOCK_TOKENS, decoder.head_dim), np.float32)
    pools = np.array(
        [[pool[i, 0].ctypes.data, pool[i, 1].ctypes.data, blocks] for i in range(decoder.layers)]
    )
    # rows hold scattered blocks, not in id order
    tables = rng.permutation(blocks)[: width * len(prompts)].reshape(len(prompts), width).astype(np.int64)
    logits = paged.run(PagedModel.prefill_inputs(prompts, pools.astype(np.int64), tables))
    state = []
    for row, prompt in enumerate(prompts):
        want, past = _dense(model, prompt, None)
        scale = np.abs(want).max()
        assert np.abs(logits[row] - want).max() <= 1e-5 * scale, (family, row, "prefill")
        state.append((int(np.argmax(want)), past, len(prompt)))
    for step in range(STEPS):
        step_ids = np.array([[token] for token, _past, _n in state], np.int64)
        step_positions = np.array([[n] for _token, _past, n in state], np.int64)
        step_lens = np.array([[n, 1] for _token, _past, n in state], np.int64)
        logits = paged.run(
            PagedModel.inputs(step_ids, step_positions, pools.astype(np.int64), tables, step_lens)
        )
        for row, (token, past, n) in enumerate(state):
            want, past = _dense(model, [token], past)
            assert np.abs(logits[row] - want).max() <= 1e-5 * np.abs(want).max(), (family, row, step)
            state[row] = (int(np.argmax(want)), past, n + 1)
    paged.close()


def _soft_capped(source: Path, target: Path) -> None:
    """The GPT-2 export with its attention scores passed through Tanh before the Softmax (as
    Gemma-2's soft-capping does): an attention the rewrite does not know."""
    model = onnx.load(str(source))
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Softmax":
            capped = f"{node.input[0]}.capped"
            nodes.append(onnx.helper.make_node("Tanh", [node.input[0]], [capped]))
            node.input[0] = capped
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))


def test_an_attention_the_rewrite_does_not_know_keeps_the_dense_cache(tmp_path: Path) -> None:
    _soft_capped(MODELS["gpt2"], tmp_path / "capped.onnx")
    flags = ["--model", f"capped={tmp_path / 'capped.onnx'}", "--model", f"gpt2={MODELS['gpt2']}"]
    running = start_worker(worker_settings(tmp_path / "data", *flags))
    try:
        with Client(running.address, timeout=60) as client:
            capped = client.model_info("capped")
            assert capped.kv_cache == "dense"
            assert "Tanh" in capped.kv_cache_reason
            assert client.model_info("gpt2").kv_cache == "paged"
            chunks = list(client.generate("capped", input_ids=[5, 6, 7], max_new_tokens=4))
            assert sum(len(chunk.token_ids) for chunk in chunks) == 4
    finally:
        running.stop(0)
