"""The prefix cache alone: full blocks kept and found by their whole prefix and scope, never the
prompt's last token, room taken from the KV pool (at most half of it) and given back LRU."""

from __future__ import annotations

import numpy as np

from ortmux.worker.generation.kv import KvPool
from ortmux.worker.generation.prefix_cache import BLOCK_TOKENS, Hit, PrefixCache, block_keys, scope_of

HEADS, DIM, PARTS = 2, 4, 4  # 2 layers x (key, value)
BLOCK_BYTES = PARTS * HEADS * BLOCK_TOKENS * DIM * 4


def kv_of(prompt: list[int]) -> list[np.ndarray]:
    """A cache whose every entry tells the token and part it belongs to."""
    ids = np.asarray(prompt, np.float32)
    shape = (HEADS, len(prompt), DIM)
    return [np.broadcast_to(ids[None, :, None] + 1000 * part, shape).copy() for part in range(PARTS)]


BASE = scope_of("", "acme", share_base=False)


def insert(cache: PrefixCache, scope: bytes, prompt: list[int]) -> None:
    cache.insert(block_keys(scope, prompt), kv_of(prompt))


def lookup(cache: PrefixCache, scope: bytes, prompt: list[int]) -> Hit | None:
    return cache.lookup(block_keys(scope, prompt), len(prompt))


def test_the_longest_cached_prefix_is_found_short_of_the_last_token() -> None:
    cache = PrefixCache(KvPool(1 << 20))
    prompt = list(range(3 * BLOCK_TOKENS + 5))
    insert(cache, BASE, prompt)
    assert cache.blocks == 3 and cache.held_bytes == 3 * BLOCK_BYTES == cache.kv.reserved_bytes
    hit = lookup(cache, BASE, [*prompt, 7, 8])
    assert hit is not None and hit.tokens == 3 * BLOCK_TOKENS
    for part, array in enumerate(hit.cache):
        np.testing.assert_array_equal(array[0, 0, :, 0], np.arange(3 * BLOCK_TOKENS) + 1000 * part)
    exact = prompt[: 2 * BLOCK_TOKENS]  # all in blocks: the last block is left, its last token is to run
    assert lookup(cache, BASE, exact).tokens == BLOCK_TOKENS
    changed = prompt.copy()
    changed[BLOCK_TOKENS + 3] = 999  # a change in block 2 leaves block 1 only
    assert lookup(cache, BASE, changed).tokens == BLOCK_TOKENS
    assert lookup(cache, BASE, [999, *prompt]) is None
    assert lookup(cache, BASE, prompt[:BLOCK_TOKENS]) is None


def test_scopes_never_share() -> None:
    cache = PrefixCache(KvPool(1 << 20))
    prompt = list(range(2 * BLOCK_TOKENS + 1))
    adapter = scope_of("ab" * 32, "acme", share_base=False)
    insert(cache, adapter, prompt)
    assert lookup(cache, scope_of("cd" * 32, "acme", share_base=False), prompt) is None  # other content
    assert lookup(cache, scope_of("ab" * 32, "rival", share_base=False), prompt) is None  # other tenant
    assert lookup(cache, BASE, prompt) is None  # the base model
    assert lookup(cache, adapter, prompt).tokens == 2 * BLOCK_TOKENS
    assert scope_of("", "acme", share_base=True) == scope_of("", "rival", share_base=True)
    assert scope_of("ab" * 32, "acme", share_base=True) != scope_of("ab" * 32, "rival", share_base=True)


def test_blocks_take_at_most_half_the_pool_and_go_least_recently_used_first() -> None:
    pool = KvPool(8 * BLOCK_BYTES)
    cache = PrefixCache(pool)
    first, second = list(range(3 * BLOCK_TOKENS)), list(range(100, 100 + 3 * BLOCK_TOKENS))
    insert(cache, BASE, first)
    lookup(cache, BASE, [*first, 1])  # first is used last... until second comes
    insert(cache, BASE, second)
    assert cache.blocks == 4 and pool.reserved_bytes == 4 * BLOCK_BYTES  # half the pool
    assert lookup(cache, BASE, [*second, 1]).tokens == 3 * BLOCK_TOKENS
    assert lookup(cache, BASE, [*first, 1]) is None  # its oldest blocks went, its first among them
    assert pool.reserve(4 * BLOCK_BYTES) and not pool.reserve(1)
    assert cache.evict(BLOCK_BYTES) == BLOCK_BYTES and pool.reserved_bytes == 7 * BLOCK_BYTES
    insert(cache, BASE, first)  # the pool is full: nothing more is kept
    assert pool.reserved_bytes <= pool.limit_bytes
    cache.clear()
    assert cache.blocks == 0 and cache.held_bytes == 0 and pool.reserved_bytes == 4 * BLOCK_BYTES
