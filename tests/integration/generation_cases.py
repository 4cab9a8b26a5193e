"""What the generation tests share: the fixtures (tiny decoders, adapters, tokenizer, references
by tests/fixtures/make_generation_fixtures.py), a worker serving them, and small helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ortmux.client import Client, GenerationChunk
from ortmux.worker.api.server import Worker

from ..conftest import plain_session, scrape

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generation"
INFO = json.loads((FIXTURES / "cases.json").read_text())
# Read whole: an NpzFile reads lazily from one zip handle, not safe from several threads.
EXPECTED = dict(np.load(FIXTURES / "expected.npz"))
FAMILIES = [case["model"] for case in INFO["cases"]]
NEW = INFO["new_tokens"]
PROMPTS = range(len(INFO["prompts"]))


def prompt_ids(number: int) -> list[int]:
    return EXPECTED[f"prompt/{number}"].tolist()


def reference(family: str, run: str, number: int) -> list[int]:
    return EXPECTED[f"{family}/{run}/{number}/tokens"].tolist()


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def runs(family: str) -> list[str]:
    return ["base", f"{family}-lora0", f"{family}-lora1"]


def generate_case(client: Client, family: str, run: str, number: int, **extra) -> list[GenerationChunk]:
    adapter = "" if run == "base" else run
    return list(
        client.generate(family, input_ids=prompt_ids(number), adapter=adapter, max_new_tokens=NEW, **extra)
    )


def decode_steps(worker: Worker, model: str) -> tuple[float, float]:
    """(decode steps, rows over all of them) of ``model`` so far."""
    samples = scrape(worker)
    labels = (("model", model),)
    return samples[("ortmux_decode_step_rows_count", labels)], samples[
        ("ortmux_decode_step_rows_sum", labels)
    ]


def generations_kv_bytes(worker: Worker) -> int:
    """KV pool bytes the worker's generations hold (the pool's reservations, less the blocks its
    prefix caches keep)."""
    generation = worker.dataplane.generation
    cached = sum(loop.prefix.held_bytes for loop in generation.loops() if loop.prefix is not None)
    return generation.kv.reserved_bytes - cached


def gauge(worker: Worker, name: str, model: str) -> float:
    return scrape(worker)[(name, (("model", model),))]


def plain_greedy(path: Path, ids: list[int], new: int) -> list[int]:
    """Greedy decoding with plain ONNX Runtime, one sequence, the cache fed back each step."""
    session = plain_session(path)
    names = [i.name for i in session.get_inputs()]
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    feeds = {p.name: np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32) for p in pasts}
    tokens_, current = [], list(ids)
    length = 0
    for _ in range(new):
        feeds["input_ids"] = np.array([current], np.int64)
        feeds["attention_mask"] = np.ones((1, length + len(current)), np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(length, length + len(current), dtype=np.int64)[None]
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        token = int(np.argmax(outputs["logits"][0, -1]))
        tokens_.append(token)
        length += len(current)
        current = [token]
        for past in pasts:
            feeds[past.name] = outputs[past.name.replace("past_key_values", "present")]
    return tokens_
