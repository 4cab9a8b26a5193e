"""The rows of a decode loop's group and their KV cache, left-padded to one length, and a long
prompt's cache while it is prefilled a chunk at a time (scheduler/decode_loop.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ortmux.worker.engine.lora.feeds import FeedBuffers
from ortmux.worker.generation.job import GenerationJob


class Rows:
    """The rows of one group's decode steps and their cache, left-padded to one length."""

    def __init__(self, jobs: list[GenerationJob], cache: list[np.ndarray], mask: np.ndarray) -> None:
        self.jobs = jobs
        self.cache = cache  # per (layer, key|value): [rows, kv_heads, length, head_dim]
        self.mask = mask  # [rows, length] int64
        self.feeds: dict[str, np.ndarray] | None = None  # LoRA feeds of these rows, kept while they stay
        self.buffers: FeedBuffers | None = None

    def merge(self, other: Rows) -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.cache = [
            np.concatenate([_left_pad(a, length, axis=2), _left_pad(b, length, axis=2)])
            for a, b in zip(self.cache, other.cache, strict=True)
        ]
        self.mask = np.concatenate([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        self.jobs += other.jobs
        self.feeds = None

    def keep(self, kept: list[int]) -> None:
        """Only rows ``kept`` stay; leading columns that are padding in every row go."""
        self.jobs = [self.jobs[i] for i in kept]
        self.mask = self.mask[kept]
        start = int(np.argmax(self.mask.any(axis=0))) if len(kept) else 0
        self.mask = np.ascontiguousarray(self.mask[:, start:])
        self.cache = [np.ascontiguousarray(part[kept][:, :, start:]) for part in self.cache]
        self.feeds = None


@dataclasses.dataclass(eq=False)
class Partial:
    """A long prompt being prefilled a chunk at a time, and its cache so far."""

    job: GenerationJob
    done: int = 0
    cache: list[np.ndarray] = dataclasses.field(default_factory=list)


def _left_pad(array: np.ndarray, length: int, axis: int) -> np.ndarray:
    missing = length - array.shape[axis]
    if not missing:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (missing, 0)
    return np.pad(array, widths)
