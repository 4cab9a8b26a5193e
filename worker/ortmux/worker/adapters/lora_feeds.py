"""Per-run LoRA inputs: each row of a batch gets its adapter's A and B, or zeros.

For site ``s`` and a batch of ``batch`` rows the run feeds A_rows [batch, in, R] and
B_rows [batch, R, out]. R is the largest rank among the batch's adapters on that site, rounded
up to a power of two so that run shapes repeat; padding with zeros is exact. A site no adapter in
the batch touches gets R = 0 and costs next to nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ortmux.worker.adapters.lora_graph import LoraInput


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One adapter's low-rank factors on one base weight, ready to feed (scale folded into b)."""

    a: np.ndarray  # [in, r]
    b: np.ndarray  # [r, out]

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


@dataclasses.dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of a batch and the LoRA factors they use (by weight name; empty: none)."""

    start: int
    stop: int
    weights: Mapping[str, LoraWeights]


def rank_bucket(rank: int) -> int:
    return 0 if rank <= 0 else 1 << (rank - 1).bit_length()


class FeedBuffers:
    """Reusable feed arrays by (name, shape, dtype), for one thread that runs one batch at a time:
    filling warm buffers avoids allocating and faulting in fresh pages for every run."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, bool]:
        """An array of that shape, and whether it is fresh (all zeros)."""
        key = (name, shape, np.dtype(dtype).str)
        array = self._arrays.get(key)
        if array is not None:
            return array, False
        if len(self._arrays) > 4096:  # shapes vary with batch size and rank; keep the cache bounded
            self._arrays.clear()
        array = self._arrays[key] = np.zeros(shape, dtype=dtype)
        return array, True


def build_feeds(
    inputs: Sequence[LoraInput], batch: int, spans: Sequence[RowSpan], buffers: FeedBuffers | None = None
) -> dict[str, np.ndarray]:
    """The feeds of one run. With ``buffers`` the arrays are reused between runs (the caller must
    not start a run before the previous one using them has finished)."""
    feeds: dict[str, np.ndarray] = {}
    for lora in inputs:
        site = lora.site
        users = [(span, span.weights[site.weight]) for span in spans if site.weight in span.weights]
        if not users:
            continue  # the graph's rank-0 default applies
        rank = rank_bucket(max(weights.rank for _span, weights in users))
        if (
            len(users) == 1
            and users[0][1].rank == rank
            and (users[0][0].start, users[0][0].stop) == (0, batch)
        ):
            # One adapter on every row, no padding: [1, in, R] views that MatMul broadcasts over
            # the batch, so no copies and one product for all rows.
            weights = users[0][1]
            feeds[lora.a] = weights.a[np.newaxis]
            feeds[lora.b] = weights.b[np.newaxis]
            continue
        dtype = users[0][1].a.dtype
        a_shape, b_shape = (batch, site.in_features, rank), (batch, rank, site.out_features)
        if buffers is None:
            (a_rows, a_clean), (b_rows, b_clean) = (
                (np.zeros(a_shape, dtype), True),
                (np.zeros(b_shape, dtype), True),
            )
        else:
            (a_rows, a_clean), (b_rows, b_clean) = (
                buffers.get(lora.a, a_shape, dtype),
                buffers.get(lora.b, b_shape, dtype),
            )
        covered = 0
        for span, weights in users:
            a_rows[span.start : span.stop, :, : weights.rank] = weights.a
            b_rows[span.start : span.stop, : weights.rank, :] = weights.b
            if weights.rank < rank and not (a_clean and b_clean):
                a_rows[span.start : span.stop, :, weights.rank :] = 0
                b_rows[span.start : span.stop, weights.rank :, :] = 0
            covered += span.stop - span.start
        if covered < batch and not (a_clean and b_clean):
            _zero_rows_outside(a_rows, b_rows, [span for span, _weights in users], batch)
        feeds[lora.a] = a_rows
        feeds[lora.b] = b_rows
    return feeds


def _zero_rows_outside(a_rows: np.ndarray, b_rows: np.ndarray, spans: Sequence[RowSpan], batch: int) -> None:
    """Zero the rows no span covers (base-only rows of a reused buffer)."""
    mask = np.ones(batch, dtype=bool)
    for span in spans:
        mask[span.start : span.stop] = False
    a_rows[mask] = 0
    b_rows[mask] = 0
