"""The batched sampler against a straightforward full-sort reference: greedy, seeded rows whatever
their batch-mates, top-k, top-p (its support and, over many seeded draws, its distribution), both
together, tiny temperatures, masked tokens, vocabularies of 1 and 152k, float16 logits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest

from ortmux.worker.generation import sampling
from ortmux.worker.generation.sampling import CANDIDATES, Sampler, SamplingParams, sample


def reference(logits: np.ndarray, params: SamplingParams) -> dict[int, float]:
    """Each token's probability: every logit sorted (ties by id), top-k, then the smallest prefix
    whose probability reaches top_p (the token reaching it included), renormalised."""
    wide = logits.astype(np.float64)
    order = np.argsort(-wide, kind="stable")
    order = order[np.isfinite(wide[order])]
    if params.top_k > 0:
        order = order[: params.top_k]
    probs = np.exp((wide[order] - wide[order[0]]) / params.temperature)
    probs /= probs.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return {int(token): float(p) for token, p in zip(order, probs, strict=True)}


def draws(logits: np.ndarray, params: SamplingParams, count: int, rows: int = 50) -> np.ndarray:
    """``count`` tokens from one row of logits: batches of ``rows`` copies, a seeded sampler each."""
    samplers = [Sampler(dataclasses.replace(params, seed=seed)) for seed in range(rows)]
    batch = np.repeat(logits[np.newaxis], rows, axis=0)
    return np.array([sample(batch, samplers) for _ in range(count // rows)]).ravel()


def assert_distribution(tokens: np.ndarray, expected: dict[int, float]) -> None:
    """Every token in the support, and a chi-square statistic far below its tail (cells expecting
    fewer than 5 draws pooled)."""
    assert set(tokens.tolist()) <= set(expected), set(tokens.tolist()) - set(expected)
    counts = np.bincount(tokens, minlength=max(expected) + 1)
    ids = np.array(list(expected))
    wanted = np.array([expected[i] for i in ids]) * len(tokens)
    observed = counts[ids].astype(np.float64)
    small = wanted < 5
    cells_wanted = np.append(wanted[~small], wanted[small].sum())
    cells_observed = np.append(observed[~small], observed[small].sum())
    if cells_wanted[-1] == 0:
        cells_wanted, cells_observed = cells_wanted[:-1], cells_observed[:-1]
    chi2 = float(((cells_observed - cells_wanted) ** 2 / cells_wanted).sum())
    freedom = len(cells_wanted) - 1
    assert chi2 < freedom + 6 * math.sqrt(2 * max(freedom, 1)), (chi2, freedom)


def logits_of(rows: int, vocab: int, spread: float = 2.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * spread).astype(np.float32)


def test_greedy_is_the_argmax() -> None:
    logits = logits_of(16, 1000)
    logits[3, [10, 20]] = 100.0  # a tie: the lower id
    samplers = [Sampler(SamplingParams()) for _ in range(16)]
    assert sample(logits, samplers) == logits.argmax(axis=1).tolist()
    assert sample(logits, samplers)[3] == 10
    assert samplers[0].next_token(logits[0]) == int(logits[0].argmax())


def test_greedy_rows_among_sampled_rows() -> None:
    logits = logits_of(6, 500)
    samplers = [Sampler(SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i)) for i in range(6)]
    tokens = sample(logits, samplers)
    assert [tokens[i] for i in (1, 3, 5)] == logits[[1, 3, 5]].argmax(axis=1).tolist()


PARAMS = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=2),
    SamplingParams(temperature=1.0, top_p=0.9, seed=3),
    SamplingParams(temperature=1.5, top_k=5, seed=4),
    SamplingParams(temperature=0.7, top_p=0.99, seed=5),
]


def test_seeded_rows_give_the_same_tokens_alone_and_in_any_batch() -> None:
    steps, vocab = 12, 3000
    step_logits = [logits_of(len(PARAMS), vocab, spread=1.0, seed=step) for step in range(steps)]
    alone = []
    for i, params in enumerate(PARAMS):
        sampler = Sampler(params)
        alone.append([sampler.next_token(logits[i]) for logits in step_logits])
    shuffle = np.random.default_rng(7)
    for _ in range(3):
        samplers = [Sampler(p) for p in PARAMS]
        mates = [Sampler(SamplingParams(temperature=t, top_p=0.5)) for t in (0.0, 2.0, 1.0)]
        together: list[list[int]] = [[] for _ in PARAMS]
        for logits in step_logits:
            order = shuffle.permutation(len(PARAMS) + len(mates))
            rows = np.concatenate([logits, logits_of(len(mates), vocab, seed=int(order[0]))])
            everyone = samplers + mates
            tokens = sample(rows[order], [everyone[i] for i in order])
            for position, i in enumerate(order):
                if i < len(PARAMS):
                    together[i].append(tokens[position])
        assert together == alone


def test_an_unseeded_sampler_draws_from_its_own_generator() -> None:
    logits = logits_of(1, 1000, spread=0.1)
    tokens = {Sampler(SamplingParams(temperature=1.0)).next_token(logits[0]) for _ in range(20)}
    assert len(tokens) > 1


def test_top_k_returns_only_the_k_largest() -> None:
    logits = logits_of(1, 5000, spread=1.0)[0]
    params = SamplingParams(temperature=5.0, top_k=7)
    largest = set(np.argsort(-logits)[:7].tolist())
    tokens = draws(logits, params, 2000)
    assert set(tokens.tolist()) <= largest
    assert len(set(tokens.tolist())) == 7
    assert_distribution(tokens, reference(logits, params))


def test_top_k_ties_are_broken_by_token_id() -> None:
    logits = np.zeros(1000, np.float32)
    logits[500] = 1.0
    tokens = draws(logits, SamplingParams(temperature=1.0, top_k=3), 500)
    assert set(tokens.tolist()) <= {0, 1, 500}


@pytest.mark.parametrize(
    ("vocab", "spread", "top_p"),
    [(2000, 2.0, 0.8), (2000, 3.0, 0.95), (600, 0.3, 0.9)],  # the last nucleus is wider than CANDIDATES
)
def test_top_p_draws_the_reference_nucleus(vocab: int, spread: float, top_p: float) -> None:
    logits = logits_of(1, vocab, spread=spread, seed=11)[0]
    params = SamplingParams(temperature=1.0, top_p=top_p)
    expected = reference(logits, params)
    assert len(expected) > CANDIDATES if spread < 1 else 5 < len(expected) <= CANDIDATES
    assert_distribution(draws(logits, params, 10000), expected)


def test_top_k_and_top_p_together() -> None:
    logits = logits_of(1, 4000, spread=0.5, seed=3)[0]
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.6)
    expected = reference(logits, params)
    assert 1 < len(expected) < 50
    assert_distribution(draws(logits, params, 10000), expected)


def test_top_p_on_a_peaked_row_sorts_no_more_than_its_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    sorted_sizes: list[int] = []

    def counting(sort: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def counted(values: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
            sorted_sizes.append(len(values))
            return sort(values, *args, **kwargs)

        return counted

    for name in ("sort", "argsort", "lexsort"):
        monkeypatch.setattr(sampling.np, name, counting(getattr(np, name)))
    logits = logits_of(4, 152_064, spread=3.0)
    sample(logits, [Sampler(SamplingParams(temperature=0.8, top_p=0.95, seed=i)) for i in range(4)])
    sample(logits, [Sampler(SamplingParams(temperature=0.8, top_k=50, seed=i)) for i in range(4)])
    assert sorted_sizes and max(sorted_sizes) < 152_064 // 8, sorted_sizes


def test_top_k_on_a_large_vocabulary_sorts_a_few_hundred_and_draws_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sorted_sizes: list[int] = []
    sort = np.sort

    def counted(values: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        sorted_sizes.append(len(values))
        return sort(values, *args, **kwargs)

    logits = logits_of(1, 152_064, spread=2.5, seed=4)[0]
    logits[::7] = -np.inf
    logits[np.argsort(-logits)[40:60]] = np.sort(logits)[-50]  # ties across the 50th place
    params = SamplingParams(temperature=1.0, top_k=50)
    expected = reference(logits, params)
    assert len(expected) == 50
    monkeypatch.setattr(sampling.np, "sort", counted)
    tokens = draws(logits, params, 5000)
    assert max(sorted_sizes) < 2000, max(sorted_sizes)
    monkeypatch.undo()
    assert_distribution(tokens, expected)


def test_a_wide_nucleus_sorts_only_the_buckets_it_ends_and_draws_in(monkeypatch: pytest.MonkeyPatch) -> None:
    sorted_sizes: list[int] = []
    sort = np.sort

    def counted(values: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        sorted_sizes.append(len(values))
        return sort(values, *args, **kwargs)

    monkeypatch.setattr(sampling.np, "sort", counted)
    logits = logits_of(4, 128_256, spread=0.1)  # a random model's logits: nearly flat
    samplers = [Sampler(SamplingParams(temperature=0.8, top_p=0.95, seed=i)) for i in range(4)]
    tokens = sample(logits, samplers)
    assert all(0 <= token < 128_256 for token in tokens)
    assert sorted_sizes and max(sorted_sizes) < 128_256 // 50, sorted_sizes


def test_a_wide_nucleus_with_ties_and_masked_tokens_draws_the_reference() -> None:
    logits = np.round(logits_of(1, 3000, spread=0.5, seed=5)[0], 1)  # many logits tie
    logits[::6] = -np.inf
    params = SamplingParams(temperature=1.0, top_p=0.9)
    expected = reference(logits, params)
    assert len(expected) > CANDIDATES
    assert_distribution(draws(logits, params, 20000), expected)


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (0, 0.9), (40, 1.0), (40, 0.5)])
def test_a_tiny_temperature_picks_the_argmax(temperature: float, top_k: int, top_p: float) -> None:
    logits = logits_of(8, 3000)
    samplers = [Sampler(SamplingParams(temperature, top_k, top_p, seed=i)) for i in range(8)]
    with np.errstate(invalid="raise", divide="raise"):  # no NaN on the way
        assert sample(logits, samplers) == logits.argmax(axis=1).tolist()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=0.999),
        SamplingParams(temperature=1.0, top_k=100),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.999),
        SamplingParams(temperature=50.0, top_k=2000, top_p=0.999),
    ],
)
def test_masked_tokens_are_never_chosen(params: SamplingParams) -> None:
    logits = logits_of(1, 1000, spread=0.1)[0]
    allowed = np.arange(0, 1000, 37)
    masked = np.full_like(logits, -np.inf)
    masked[allowed] = logits[allowed]
    tokens = draws(masked, params, 3000)
    assert set(tokens.tolist()) <= set(allowed.tolist())
    only = np.full_like(logits, -np.inf)
    only[777] = 0.0
    assert set(draws(only, params, 200).tolist()) == {777}


def test_every_token_masked_gives_a_token_and_no_error() -> None:
    logits = np.full((2, 100), -np.inf, np.float32)
    samplers = [Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=0)), Sampler(SamplingParams())]
    assert sample(logits, samplers) == [0, 0]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=5, top_p=0.5)],
)
def test_a_vocabulary_of_one(params: SamplingParams) -> None:
    logits = np.array([[3.0], [-1.0]], np.float32)
    assert sample(logits, [Sampler(params), Sampler(params)]) == [0, 0]


def test_a_vocabulary_of_152k() -> None:
    logits = logits_of(3, 152_064, spread=3.0)
    for params in (
        SamplingParams(temperature=0.8, top_k=50, top_p=0.95, seed=0),
        SamplingParams(temperature=1.0, top_p=0.95, seed=0),
        SamplingParams(temperature=1.0, seed=0),
    ):
        tokens = sample(logits, [Sampler(params) for _ in range(3)])
        for row, token in zip(logits, tokens, strict=True):
            assert token in reference(row, params)


def test_float16_logits() -> None:
    logits = logits_of(4, 2000).astype(np.float16)
    samplers = [Sampler(SamplingParams()), Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=1))]
    tokens = sample(logits[:2], samplers)
    assert tokens[0] == int(logits[0].astype(np.float32).argmax())
    assert tokens[1] in reference(logits[1].astype(np.float32), samplers[1].params)
    again = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=1))
    assert again.next_token(logits[1].astype(np.float32)) == tokens[1]


def test_a_stand_in_sampler_is_asked_for_its_row() -> None:
    class Fixed:
        def next_token(self, logits: np.ndarray) -> int:
            return len(logits) - 1

    logits = logits_of(2, 10)
    assert sample(logits, [Fixed(), Sampler(SamplingParams())]) == [9, int(logits[1].argmax())]  # type: ignore[list-item]


def test_logits_must_have_a_row_per_sampler() -> None:
    with pytest.raises(ValueError):
        sample(logits_of(2, 10), [Sampler(SamplingParams())])
    with pytest.raises(ValueError):
        sample(np.zeros(10, np.float32), [Sampler(SamplingParams())])
