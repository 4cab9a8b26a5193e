"""Choosing each next token: greedy, or sampled with temperature, top-k and top-p from a generator
of the request's own (seeded by its ``seed``; one draw per token), so a seeded request gives the
same tokens whatever its batch-mates.

:func:`sample` chooses the tokens of a whole decode step in one call: the greedy rows take their
argmax together; each sampled row is worked on alone, in float32, and never sorts its vocabulary
in the common case. Top-k takes the tokens above a bound read off a strided sample of the row (one
pass: a prefix of the ranking) and sorts only those when they are k or more (else a partial
selection of the k largest). Top-p takes the tokens near the likeliest (weighing at least
e**-NEAR_LOGITS of it, one pass) and sorts only those when they hold ``top_p`` of the
probability. A wider nucleus (a flat row, as random weights give) is measured in ``BUCKETS``
ranges of logits, and only the two buckets where it ends and where the draw lands are sorted:
O(vocab) either way.
Tokens rank by logit, ties by token id.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ortmux.worker.errors import InvalidArgument

CANDIDATES = 256  # a nucleus that must hold more tokens than this is measured in buckets
BUCKETS = 4096  # ranges of logits a wide nucleus is measured in
NEAR_LOGITS = 9.21  # ln(1e4): candidates weigh at least 1e-4 of the likeliest token
NEAR_MAX = 8192  # more candidates than this: a partition selects instead
SAMPLE = 4096  # logits of a row top-k reads its bound off
_SCALE_MAX = float(np.finfo(np.float32).max)  # 1 / temperature beyond it: -inf below the max


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
    """One request's sampling: its parameters and its own generator, seeded by ``seed``."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def next_token(self, logits: np.ndarray) -> int:
        """The next token of one row, from its ``[vocab]`` logits."""
        return sample(np.asarray(logits)[np.newaxis], [self])[0]

    def _sampled(self, row: np.ndarray, scratch: np.ndarray) -> int:
        """The token drawn from one row's float32 logits (temperature above 0). ``scratch`` is room
        for two rows, reused from row to row: fresh memory for each row costs more than its work."""
        params = self.params
        draw = self._rng.random()  # first: one draw per token, whatever the row holds
        top = row.max()
        if not np.isfinite(top):  # every token masked, or an infinite or NaN logit
            return int(np.argmax(row))
        scale = np.float32(min(1.0 / params.temperature, _SCALE_MAX))
        vocab = len(row)
        ids: np.ndarray | None = None
        if 0 < params.top_k < vocab:
            near = _above_sampled_bound(row, params.top_k)  # one pass; a partition only if it fails
            if not params.top_k <= len(near) <= NEAR_MAX:
                near = _largest(row, params.top_k, scratch[1])
            ids = _ranked(row, near)[: params.top_k]
            cumulative = np.cumsum(_probabilities(row[ids], top, scale))
            goal = np.float32(params.top_p) * cumulative[-1]
        elif params.top_p < 1:
            probabilities = _probabilities(row, top, scale, scratch[0])
            goal = np.float32(params.top_p) * probabilities.sum()
            # A wide nucleus is found by buckets, never sorted: when the candidates cannot hold it
            # (each weighs at most 1, the row's max), or when they turn out not to.
            if goal > min(vocab, CANDIDATES):
                return _wide_nucleus(row, probabilities, float(goal), draw, scratch[1])
            ids = _near_top(row, top, scale)  # a prefix of the ranking: the nucleus if it holds goal
            if len(ids) > NEAR_MAX or probabilities[ids].sum() < goal:
                return _wide_nucleus(row, probabilities, float(goal), draw, scratch[1])
            ids = _ranked(row, ids)
            cumulative = np.cumsum(probabilities[ids])
        else:
            cumulative = np.cumsum(_probabilities(row, top, scale, scratch[0]), out=scratch[1])
            goal = None
        if goal is not None:  # the nucleus: up to and including the token that reaches top_p
            cumulative = cumulative[: int(np.searchsorted(cumulative, goal)) + 1]
        index = int(np.searchsorted(cumulative, np.float32(draw) * cumulative[-1], side="right"))
        if index >= len(cumulative):  # the draw rounded up to the total: the last token with weight
            index = int(np.flatnonzero(np.diff(cumulative, prepend=np.float32(0)))[-1])
        return int(index if ids is None else ids[index])


def sample(logits: np.ndarray, samplers: Sequence[Sampler]) -> list[int]:
    """Each row's next token, from ``[rows, vocab]`` logits (cast to float32) and one sampler per
    row. A row's token depends on its own logits and sampler only. A sampler that is no
    :class:`Sampler` (a test's stand-in) is asked with its ``next_token``, one row at a time."""
    if logits.ndim != 2 or len(logits) != len(samplers):
        raise ValueError(f"logits of shape {logits.shape} for {len(samplers)} samplers")
    scores = np.asarray(logits, dtype=np.float32)
    tokens = [0] * len(samplers)
    scratch = None
    greedy = [
        i
        for i, sampler in enumerate(samplers)
        if isinstance(sampler, Sampler) and sampler.params.temperature == 0
    ]
    if greedy:
        chosen = scores.argmax(axis=1) if len(greedy) == len(samplers) else scores[greedy].argmax(axis=1)
        for i, token in zip(greedy, chosen.tolist(), strict=True):
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if not isinstance(sampler, Sampler):
            tokens[i] = int(sampler.next_token(logits[i]))
        elif sampler.params.temperature > 0:
            if scratch is None:
                scratch = np.empty((2, scores.shape[1]), np.float32)
            tokens[i] = sampler._sampled(scores[i], scratch)
    return tokens


def _largest(row: np.ndarray, count: int, scratch: np.ndarray) -> np.ndarray:
    """Ids, in id order, of at least the ``count`` largest logits by partial selection: all the
    tokens tied with the last, none masked with -inf (so fewer where fewer are left)."""
    if count >= len(row):
        return np.flatnonzero(row > -np.inf)
    np.copyto(scratch, row)
    scratch.partition(len(row) - count)
    bound = scratch[len(row) - count]
    return np.flatnonzero(row >= bound if bound > -np.inf else row > -np.inf)


def _near_top(row: np.ndarray, top: np.float32, scale: np.float32) -> np.ndarray:
    """Ids, in id order, of the tokens weighing at least e**-NEAR_LOGITS of the likeliest: every
    token ranked above the least of them, so a prefix of the ranking, found in one pass."""
    return np.flatnonzero(row >= top - np.float32(NEAR_LOGITS / max(float(scale), 1e-30)))


def _above_sampled_bound(row: np.ndarray, k: int) -> np.ndarray:
    """Ids, in id order, of the logits at or above a bound read off an evenly strided sample of the
    row, placed so that about 4k + 64 tokens pass it: a prefix of the ranking, most often holding
    the k largest (the caller checks), in one pass over the row."""
    stride = max(1, len(row) // SAMPLE)
    sample = row[::stride]
    rank = min(len(sample) - 1, math.ceil((4 * k + 64) * len(sample) / len(row)))
    bound = np.partition(sample, len(sample) - 1 - rank)[len(sample) - 1 - rank]
    return np.flatnonzero(row >= bound if bound > -np.inf else row > -np.inf)  # never a masked one


def _wide_nucleus(row: np.ndarray, weights: np.ndarray, goal: float, draw: float, scratch: np.ndarray) -> int:
    """The token drawn from a nucleus too wide to sort, in O(vocab): the logits fall in
    ``BUCKETS`` equal ranges of value (a monotone map: equal logits share a bucket, a larger one
    is never in a lower bucket), each range's weight summed; the bucket that reaches ``goal`` and
    the one the draw lands in are ranked exactly, the others only summed. The token is the one the
    rank-order walk of the nucleus gives."""
    buckets = BUCKETS
    low = float(row.min())
    if low == -np.inf:
        low = float(row[row > -np.inf].min())
    span = float(row.max()) - low
    if span > 0:
        scaled = np.subtract(row, np.float32(low), out=scratch)
        scaled *= np.float32((buckets - 1) / span)
        np.clip(scaled, 0, buckets - 1, out=scaled)  # -inf (masked, weight 0) to the lowest
        index = scaled.astype(np.intp)
    else:
        index = np.zeros(len(row), np.intp)
    mass = np.bincount(index, weights=weights, minlength=buckets)[::-1]  # the largest weights first
    reached = np.cumsum(mass)
    edge = min(int(np.searchsorted(reached, goal)), buckets - 1)  # the bucket the nucleus ends in
    before = float(reached[edge - 1]) if edge else 0.0
    members = _ranked(row, np.flatnonzero(index == buckets - 1 - edge))
    inside = np.cumsum(weights[members], dtype=np.float64)
    last = min(int(np.searchsorted(inside, goal - before)), len(members) - 1)
    target = draw * (before + float(inside[last]))  # the nucleus: up to and including ``last``
    landed = min(int(np.searchsorted(reached, target, side="right")), edge)
    if landed < edge:
        members = _ranked(row, np.flatnonzero(index == buckets - 1 - landed))
        inside = np.cumsum(weights[members], dtype=np.float64)
        last = len(members) - 1
    offset = float(reached[landed - 1]) if landed else 0.0
    chosen = int(np.searchsorted(inside[: last + 1], target - offset, side="right"))
    if chosen > last:  # the draw rounded up to the total: the last token with weight
        chosen = int(np.flatnonzero(weights[members[: last + 1]])[-1])
    return int(members[chosen])


def _ranked(row: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``ids`` by their logits, largest first, ties by id: one sort of 64-bit keys, each a logit's
    bits made to order as integers (descending) above its token id (several times faster than a
    stable argsort of the logits)."""
    bits = (row[ids] + np.float32(0)).view(np.int32)  # + 0: -0.0 ties with 0.0
    ordered = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64)
    keys = (np.int64(0x7FFFFFFF) - ordered).astype(np.uint64) << np.uint64(32) | ids.astype(np.uint64)
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.intp)


def _probabilities(
    logits: np.ndarray, top: np.float32, scale: np.float32, out: np.ndarray | None = None
) -> np.ndarray:
    """exp((logits - top) * scale), unnormalised: the row's max weighs 1, masked tokens 0."""
    with np.errstate(over="ignore"):  # a tiny temperature: -inf below the max, never NaN
        weights = np.subtract(logits, top, out=out, dtype=np.float32)
        weights *= scale
    return np.exp(weights, out=weights)
