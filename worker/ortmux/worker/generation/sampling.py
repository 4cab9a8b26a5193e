"""Choosing each next token: greedy, or sampled with temperature, top-k and top-p from a generator
of the request's own (seeded by its ``seed``; one draw per token), so a seeded request gives the
same tokens whatever its batch-mates."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ortmux.worker.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0 (or -1): off
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """InvalidArgument naming the first parameter out of its range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(
                f"temperature must be 0 (greedy) or more, got {self.temperature}", field="temperature"
            )
        if self.top_k < -1:
            raise InvalidArgument(f"top_k must be -1, 0 (off) or more, got {self.top_k}", field="top_k")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise InvalidArgument(f"seed must be 0 to 2**64 - 1, got {self.seed}", field="seed")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def next_token(self, logits: np.ndarray) -> int:
        """The next token of one row, from its ``[vocab]`` logits."""
        params = self.params
        if params.temperature == 0:
            return int(np.argmax(logits))
        wide = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # a tiny temperature: -inf, never nan
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
        draw = self._rng.random()
        index = min(int(np.searchsorted(np.cumsum(probs), draw, side="right")), len(order) - 1)
        return int(order[index])
