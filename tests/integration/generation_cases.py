"""What the generation tests share: the fixtures (tiny decoders, adapters, tokenizer, references
by tests/fixtures/make_generation_fixtures.py), a worker serving them, and small helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ortmux.client import Client, GenerationChunk
from ortmux.worker.api.server import Worker

from ..conftest import scrape

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


def gauge(worker: Worker, name: str, model: str) -> float:
    return scrape(worker)[(name, (("model", model),))]
