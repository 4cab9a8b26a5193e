from __future__ import annotations

import numpy as np

from ortmux.worker.engine.lora.feeds import (
    FeedBuffers,
    FeedPool,
    LoraWeights,
    RowSpan,
    build_feeds,
    rank_bucket,
)
from ortmux.worker.engine.lora.graph import LoraInput
from ortmux.worker.engine.lora.targets import LoraSite

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


def test_one_buffer_per_input_serves_every_batch_size_and_rank() -> None:
    """What a batcher holds is its largest run, however many batch sizes and ranks occur."""
    buffers = FeedBuffers(FeedPool(1 << 30))
    for batch in range(1, 33):
        for rank in (1, 3, 8):
            spans = [
                RowSpan(0, batch // 2, weights(rank, 1.0)),
                RowSpan(batch // 2 + 1, batch, weights(2, 3.0)),
            ]
            reused = build_feeds([INPUT], batch, spans, buffers)
            fresh = build_feeds([INPUT], batch, spans)
            for name in ("a", "b"):
                np.testing.assert_array_equal(reused[name], fresh[name])
    largest = 32 * (3 * 8 + 8 * 5) * 4  # batch 32, rank bucket 8, float32
    assert buffers.held_bytes == largest


def test_the_pool_bounds_all_users_together() -> None:
    pool = FeedPool(limit_bytes=3000)
    first, second = FeedBuffers(pool), FeedBuffers(pool)
    spans = [RowSpan(0, 1, weights(4, 1.0)), RowSpan(2, 4, weights(2, 2.0))]
    build_feeds([INPUT], 4, spans, first)  # 4 x (3*4 + 4*5) x 4 bytes = 512
    assert pool.held_bytes == first.held_bytes == 512
    build_feeds([INPUT], 16, spans, second)  # 2048: both fit
    assert pool.held_bytes == 2560
    build_feeds([INPUT], 20, spans, first)  # 2560 for first: second's buffers make room
    assert pool.evictions == 1 and second.held_bytes == 0
    assert pool.held_bytes == first.held_bytes == 2560 <= pool.limit_bytes
    big = build_feeds([INPUT], 64, spans, second)  # 8192 alone: a run of its own, nothing kept
    assert pool.transient_runs == 1 and second.held_bytes == 0
    np.testing.assert_array_equal(big["a"], build_feeds([INPUT], 64, spans)["a"])
    first.close()
    assert pool.held_bytes == 0


def test_one_adapter_on_every_row_is_fed_views_whatever_the_number_of_requests() -> None:
    """Adjacent spans of one adapter merge, so a batch of many requests on it copies nothing."""
    shared = weights(4, 1.0)
    feeds = build_feeds([INPUT], 3, [RowSpan(0, 1, shared), RowSpan(1, 2, shared), RowSpan(2, 3, shared)])
    assert feeds["a"].shape == (1, 3, 4)
    assert np.shares_memory(feeds["a"], shared["w"].a)
