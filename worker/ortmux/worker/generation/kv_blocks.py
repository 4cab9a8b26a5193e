"""One decoder's KV cache as blocks of ``BLOCK_TOKENS`` positions (the paged path,
engine/paged.py): every layer's keys and values of a block id live at that id in the layer's
pools, ``[blocks, kv_heads, BLOCK_TOKENS, head_dim]`` each, read and written in place by the
paged attention kernel.

The pools are one anonymous mapping as large as ``kv_cache_bytes`` allows for this decoder;
memory is committed only where blocks are written, and freed blocks are reused first (the lowest
id), so what the process holds for KV is at most the blocks in use at the busiest moment, within
``kv_cache_bytes``: every block taken is counted in the process-wide pool (generation/kv.py).
When no block is in use the mapping's pages go back to the system.

Not thread-safe: the decode loop's thread alone uses it.
"""

from __future__ import annotations

import heapq
import mmap
from collections.abc import Sequence

import numpy as np

from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.paged import BLOCK_TOKENS
from ortmux.worker.generation.kv import KvPool


def blocks_for(tokens: int) -> int:
    return (tokens + BLOCK_TOKENS - 1) // BLOCK_TOKENS


class BlockPool:
    def __init__(self, decoder: DecoderSpec, kv: KvPool) -> None:
        self.decoder = decoder
        self.kv = kv
        self.block_bytes = decoder.kv_bytes_per_token * BLOCK_TOKENS
        self.capacity = max(1, kv.limit_bytes // self.block_bytes)
        self._map = mmap.mmap(-1, self.capacity * self.block_bytes)
        shape = (decoder.layers, 2, self.capacity, decoder.kv_heads, BLOCK_TOKENS, decoder.head_dim)
        self.pools = np.frombuffer(self._map, np.dtype(decoder.kv_dtype)).reshape(shape)
        self.addresses = np.array(
            [
                [self.pools[i, 0].ctypes.data, self.pools[i, 1].ctypes.data, self.capacity]
                for i in range(decoder.layers)
            ],
            np.int64,
        )
        self._free = list(range(self.capacity))  # a heap: the lowest id first
        self.used = 0

    def allocate(self, count: int) -> list[int] | None:
        """``count`` free blocks, counted in the process-wide pool; None when there is no room."""
        if count > len(self._free) or not self.kv.reserve(count * self.block_bytes):
            return None
        self.used += count
        return [heapq.heappop(self._free) for _ in range(count)]

    def free(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        for block in ids:
            heapq.heappush(self._free, block)
        self.used -= len(ids)
        if self.used == 0:  # nothing held: the pages go back
            self._map.madvise(mmap.MADV_DONTNEED)
        self.kv.release(len(ids) * self.block_bytes)

    def write(self, ids: Sequence[int], parts: Sequence[np.ndarray]) -> None:
        """Positions 0.. of the blocks ``ids`` from a dense cache: ``parts`` per (layer,
        key|value), ``[kv_heads, tokens, head_dim]`` with tokens whole blocks."""
        tokens = len(ids) * BLOCK_TOKENS
        for index, part in enumerate(parts):
            layer, side = divmod(index, 2)
            shaped = part[:, :tokens].reshape(part.shape[0], len(ids), BLOCK_TOKENS, part.shape[2])
            self.pools[layer, side, list(ids)] = shaped.transpose(1, 0, 2, 3)

    def read(self, ids: Sequence[int]) -> list[np.ndarray]:
        """The blocks ``ids`` as a dense cache: per (layer, key|value) ``[kv_heads, tokens,
        head_dim]`` (copies)."""
        parts = []
        for layer in range(self.decoder.layers):
            for side in range(2):
                blocks = self.pools[layer, side, list(ids)]  # [n, kv_heads, BLOCK_TOKENS, head_dim]
                parts.append(
                    np.ascontiguousarray(
                        blocks.transpose(1, 0, 2, 3).reshape(blocks.shape[1], -1, blocks.shape[3])
                    )
                )
        return parts
