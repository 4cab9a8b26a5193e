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


def build_feeds(inputs: Sequence[LoraInput], batch: int, spans: Sequence[RowSpan]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for lora in inputs:
        site = lora.site
        users = [(span, span.weights[site.weight]) for span in spans if site.weight in span.weights]
        if not users:
            continue  # the graph's rank-0 default applies
        rank = rank_bucket(max(weights.rank for _span, weights in users))
        if batch == 1 and len(users) == 1 and users[0][1].rank == rank:
            weights = users[0][1]  # one row, one adapter, no padding: views, no copies
            feeds[lora.a] = weights.a[np.newaxis]
            feeds[lora.b] = weights.b[np.newaxis]
            continue
        dtype = users[0][1].a.dtype
        a_rows = np.zeros((batch, site.in_features, rank), dtype=dtype)
        b_rows = np.zeros((batch, rank, site.out_features), dtype=dtype)
        for span, weights in users:
            a_rows[span.start : span.stop, :, : weights.rank] = weights.a
            b_rows[span.start : span.stop, : weights.rank, :] = weights.b
        feeds[lora.a] = a_rows
        feeds[lora.b] = b_rows
    return feeds
