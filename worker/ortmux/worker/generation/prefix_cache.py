"""Automatic prefix caching: the KV of prompts' full blocks of ``BLOCK_TOKENS`` tokens, kept after
their prefill, so a later prompt that starts with the same tokens, in the same scope, prefills
only what follows.

A block's key chains its scope and every token up to its end (sha256 over the previous key and
its tokens), so equal keys mean equal prefixes; a generation's keys are computed once, when it is
made (:func:`block_keys`), off the decode loop's thread. The scope is what may share: the adapter's
content (its sha256, never its name, so a replaced adapter never reuses the old blocks) and the
tenant (base rows may share across tenants by a setting). One cache per decode loop, so per
loaded base model.

Cached blocks take room in the KV pool (``kv_cache_bytes``); the least recently used go when
generations need the room. A hit copies the blocks into the generation's own cache.

Not thread-safe: the decode loop's thread alone uses it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from ortmux.worker.generation.kv import KvPool

BLOCK_TOKENS = 16


def scope_of(adapter_sha256: str, tenant: str, share_base: bool) -> bytes:
    """The scope of a generation's blocks: its adapter's content, and its tenant unless it runs
    the base model with sharing across tenants on."""
    shared = share_base and not adapter_sha256
    return hashlib.sha256(f"{'' if shared else tenant}\0{adapter_sha256}".encode()).digest()


@dataclasses.dataclass(eq=False)
class Block:
    parts: list[np.ndarray]  # per (layer, key|value): [kv_heads, BLOCK_TOKENS, head_dim]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Hit:
    tokens: int  # prompt tokens whose KV the hit holds (whole blocks)
    cache: list[np.ndarray]  # per (layer, key|value): [1, kv_heads, tokens, head_dim]


class PrefixCache:
    def __init__(self, kv: KvPool) -> None:
        self.kv = kv
        self._blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()  # LRU first
        self.held_bytes = 0

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def cached_tokens(self, keys: Sequence[bytes], prompt_tokens: int) -> int:
        """How many of a prompt's tokens :meth:`lookup` would give now (nothing is touched)."""
        return sum(1 for _block in self._cached(keys, prompt_tokens)) * BLOCK_TOKENS

    def lookup(self, keys: Sequence[bytes], prompt_tokens: int) -> Hit | None:
        """The longest cached prefix of a prompt of ``prompt_tokens`` whose blocks have ``keys``
        (:func:`block_keys`), short of its last token (a run must compute its logits), or None."""
        found = list(self._cached(keys, prompt_tokens))
        if not found:
            return None
        for key in keys[: len(found)]:
            self._blocks.move_to_end(key)
        parts = zip(*(block.parts for block in found), strict=True)
        cache = [np.concatenate(layer, axis=1)[np.newaxis] for layer in parts]
        return Hit(len(found) * BLOCK_TOKENS, cache)

    def insert(self, keys: Sequence[bytes], cache: Sequence[np.ndarray]) -> None:
        """Keep a prompt's full blocks (``keys``), whose KV ``cache`` holds (per part
        ``[kv_heads, >= the prompt's length, head_dim]``, the prompt's tokens first), as far as
        room allows."""
        for index, key in enumerate(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            window = slice(index * BLOCK_TOKENS, (index + 1) * BLOCK_TOKENS)
            parts = [np.ascontiguousarray(part[:, window]) for part in cache]
            nbytes = sum(part.nbytes for part in parts)
            if not self._room(nbytes):
                return
            self._blocks[key] = Block(parts, nbytes)
            self.held_bytes += nbytes

    def _cached(self, keys: Sequence[bytes], prompt_tokens: int) -> Iterator[Block]:
        """The cached blocks a prompt starts with, short of its last token."""
        for key in keys[: (prompt_tokens - 1) // BLOCK_TOKENS]:
            block = self._blocks.get(key)
            if block is None:
                return
            yield block

    def evict(self, nbytes: int) -> int:
        """Give back at least ``nbytes`` of the least recently used blocks (or all); the bytes freed."""
        freed = 0
        while self._blocks and freed < nbytes:
            _key, block = self._blocks.popitem(last=False)
            freed += block.nbytes
        self._release(freed)
        return freed

    def clear(self) -> None:
        self.evict(self.held_bytes)

    def _room(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` in the pool, taking it from this cache's oldest blocks if need be
        (never more than half the pool: the cache is not to crowd out generations)."""
        if self.held_bytes + nbytes > self.kv.limit_bytes // 2:
            self.evict(self.held_bytes + nbytes - self.kv.limit_bytes // 2)
        return self.kv.reserve(nbytes)

    def _release(self, nbytes: int) -> None:
        if nbytes:
            self.held_bytes -= nbytes
            self.kv.release(nbytes)


def block_keys(scope: bytes, prompt: Sequence[int]) -> tuple[bytes, ...]:
    """The keys of ``prompt``'s full blocks in ``scope``: each the sha256 of the previous key (the
    scope's, first) and the block's tokens."""
    keys, previous = [], scope
    blocks = len(prompt) // BLOCK_TOKENS
    ids = np.asarray(prompt[: blocks * BLOCK_TOKENS], np.int64)
    for block in ids.reshape(blocks, BLOCK_TOKENS):
        previous = hashlib.sha256(previous + block.tobytes()).digest()
        keys.append(previous)
    return tuple(keys)
