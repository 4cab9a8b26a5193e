"""Choosing a decode step's tokens: ms per step of ``--rows`` rows at vocabularies of 32k, 128k
(Llama 3) and 152k (Qwen2), in this process.

    python bench/sampling.py [--rows 32] [--repeats 5]

Methods: greedy (the batched argmax); the old per-row sampler (reimplemented here as the baseline:
float64 and a stable argsort of the whole vocabulary for every row); the batched sampler
(ortmux.worker.generation.sampling.sample) at temperature 0.8 / top_k 50 / top_p 0.95 and at
top_p 0.95 alone (temperature 1). The logits look like a language model's: every row a normal
background (std 2.5) and 50 tokens of its own lifted by 10 + 3 N(0, 1), so a nucleus of a few
tokens. The last row per vocabulary is top_p 0.95 on plain normal logits (std 3), a nucleus of
thousands: measured in ranges of logits (two of them sorted). Medians of ``--repeats`` steps (one warm-up step
first, but for the baseline).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, table

from ortmux.worker.generation.sampling import Sampler, SamplingParams, sample

VOCABS = (32_000, 128_256, 152_064)
LIFTED = 50


def lm_like(rows: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    logits = (rng.standard_normal((rows, vocab)) * 2.5).astype(np.float32)
    for row in logits:
        row[rng.choice(vocab, LIFTED, replace=False)] += 10 + 3 * rng.standard_normal(LIFTED)
    return logits


def full_sort(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The baseline: the per-row sampler before the batched one, as it was."""
    wide = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        scores = (wide - wide.max()) / params.temperature
    order = np.argsort(-scores, kind="stable")
    if params.top_k > 0:
        order = order[: params.top_k]
    kept = scores[order]
    probs = np.exp(kept - kept.max())
    probs /= probs.sum()
    if params.top_p < 1:
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / cumulative[min(keep, len(cumulative)) - 1]
    index = min(int(np.searchsorted(np.cumsum(probs), rng.random(), side="right")), len(order) - 1)
    return int(order[index])


def nucleus(row: np.ndarray, params: SamplingParams) -> int:
    """How many tokens the top-p nucleus of one row holds."""
    wide = np.sort(row.astype(np.float64))[::-1]
    probs = np.exp((wide - wide[0]) / params.temperature)
    return int(np.searchsorted(np.cumsum(probs) / probs.sum(), params.top_p)) + 1


def step_ms(step: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return median(times) * 1e3


def measure(vocab: int, rows: int, repeats: int) -> tuple[list[list[object]], Sequence[int]]:
    rng = np.random.default_rng(vocab)
    logits = lm_like(rows, vocab, rng)
    wide = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    mixed = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=0)
    top_p = SamplingParams(temperature=1.0, top_p=0.95, seed=0)

    def batched(params: SamplingParams, values: np.ndarray) -> Callable[[], object]:
        samplers = [Sampler(params) for _ in range(rows)]
        return lambda: sample(values, samplers)

    baseline_rng = np.random.default_rng(0)
    methods = [
        ("greedy (batched argmax)", batched(SamplingParams(), logits), True),
        (
            "old full sort per row, T 0.8 / k 50 / p 0.95 (baseline)",
            lambda: [full_sort(row, mixed, baseline_rng) for row in logits],
            False,
        ),
        ("batched, T 0.8 / k 50 / p 0.95", batched(mixed, logits), True),
        ("batched, p 0.95", batched(top_p, logits), True),
        ("batched, p 0.95, wide nucleus", batched(top_p, wide), True),
    ]
    results = [(name, step_ms(step, repeats, warm_up)) for name, step, warm_up in methods]
    greedy = results[0][1]
    sizes = [nucleus(logits[0], top_p), nucleus(wide[0], top_p)]
    return [[f"{vocab:,}", name, ms, ms / greedy] for name, ms in results], sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lines, notes = [], []
    for vocab in VOCABS:
        rows, (narrow, wide) = measure(vocab, args.rows, args.repeats)
        lines += rows
        notes.append(f"{vocab:,}: {narrow} and {wide} (wide)")
    print(
        f"{args.rows} rows per step, medians of {args.repeats}; numpy {np.__version__}, "
        f"{platform.machine()}. Nucleus of top_p 0.95 at temperature 1, first row: {'; '.join(notes)}\n"
    )
    print(table(["vocab", "method", "ms/step", "x of greedy"], lines))


if __name__ == "__main__":
    main()
