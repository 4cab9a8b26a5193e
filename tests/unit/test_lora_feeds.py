from __future__ import annotations

import numpy as np

from ortmux.worker.adapters.lora_feeds import FeedBuffers, LoraWeights, RowSpan, build_feeds, rank_bucket
from ortmux.worker.adapters.lora_graph import LoraInput
from ortmux.worker.adapters.targets import LoraSite

SITE = LoraSite(weight="w", module="m", node="n", activation="x", output="y", in_features=3, out_features=5)
INPUT = LoraInput(SITE, "a", "b", 1)


def weights(rank: int, value: float) -> dict[str, LoraWeights]:
    return {"w": LoraWeights(np.full((3, rank), value, np.float32), np.full((rank, 5), value, np.float32))}


def test_rank_buckets_are_powers_of_two() -> None:
    assert [rank_bucket(r) for r in (0, 1, 2, 3, 5, 16, 17)] == [0, 1, 2, 4, 8, 16, 32]


def test_rows_get_their_factors_padded_with_zeros_and_base_rows_get_zeros() -> None:
    feeds = build_feeds([INPUT], 4, [RowSpan(0, 1, weights(2, 1.0)), RowSpan(2, 4, weights(3, 2.0))])
    a = feeds["a"]
    assert a.shape == (4, 3, 4)
    np.testing.assert_array_equal(a[0, :, :2], 1.0)
    np.testing.assert_array_equal(a[0, :, 2:], 0.0)
    np.testing.assert_array_equal(a[1], 0.0)  # the base row
    np.testing.assert_array_equal(a[2:, :, :3], 2.0)
    np.testing.assert_array_equal(a[2:, :, 3], 0.0)


def test_reused_buffers_give_the_same_feeds_as_fresh_ones() -> None:
    buffers = FeedBuffers()
    plans = [
        [RowSpan(0, 4, weights(4, 9.0))],  # dirties every row and rank slot
        [RowSpan(0, 1, weights(2, 1.0)), RowSpan(2, 4, weights(3, 2.0))],
        [RowSpan(3, 4, weights(1, 5.0))],
    ]
    for spans in plans:
        reused = build_feeds([INPUT], 4, spans, buffers)
        fresh = build_feeds([INPUT], 4, spans)
        for name in ("a", "b"):
            np.testing.assert_array_equal(reused[name], fresh[name])


def test_unused_sites_are_not_fed() -> None:
    assert build_feeds([INPUT], 2, []) == {}
