"""Per-run LoRA inputs: each row of a batch gets its adapter's A and B, or zeros.

With the LoRA kernel (graph.py) a run is fed, per site, only a table of each row's factor
addresses (:func:`address_rows`, computed once per adapter and model): no factor is copied. What
follows describes the MatMul branch, which copies them.

For site ``s`` and a batch of ``batch`` rows the run feeds A_rows [batch, in, R] and
B_rows [batch, R, out]. R is the largest rank among the batch's adapters on that site, rounded
up to a power of two so that run shapes repeat; padding with zeros is exact. A site no adapter in
the batch touches gets R = 0 and costs next to nothing.

Feed memory is bounded by bytes for the whole process (:class:`FeedPool`): each batcher keeps one
flat buffer per LoRA input, as large as the largest run it has fed, and every run uses a view of
its first bytes. So what a model holds does not depend on how many batch sizes and rank buckets
occur, and all models together hold at most the pool's limit.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from ortmux.worker.engine.lora.graph import LoraInput


@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One adapter's factors on one module's calls, ready to feed (scale folded into b), and the
    change it makes to the projection's bias, if it trained one."""

    a: np.ndarray  # [in, r]
    b: np.ndarray  # [r, out]
    bias: np.ndarray | None = None  # [out]

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + (self.bias.nbytes if self.bias is not None else 0)


class Factors(dict):
    """One adapter's :class:`LoraWeights` on one model, by call group; it also keeps the
    kernel's address rows for that model (:func:`address_rows`), valid while it lives."""

    address_cache: tuple[object, np.ndarray] | None = None


def address_rows(weights: Mapping[str, LoraWeights], inputs: Sequence[LoraInput]) -> np.ndarray:
    """[sites, 4] int64: for each kernel site, the addresses of the adapter's A [in, R] and
    B [R, out], R and the address of its bias delta (0 where none); zeros where it has no factors.

    The addresses stay valid as long as ``weights`` lives: a run holds its rows' factors."""
    cached = weights.address_cache if isinstance(weights, Factors) else None
    if cached is not None and cached[0] is inputs:
        return cached[1]
    rows = np.zeros((len(inputs), 4), np.int64)
    for index, lora in enumerate(inputs):
        factors = weights.get(lora.site.call_group)
        if factors is None:
            continue
        arrays = [factors.a, factors.b, *([factors.bias] if factors.bias is not None else [])]
        if any(array.dtype != np.float32 or not array.flags.c_contiguous for array in arrays):
            raise ValueError(f"the LoRA kernel reads contiguous float32 factors ({lora.site.weight})")
        bias = factors.bias.ctypes.data if factors.bias is not None else 0
        rows[index] = (factors.a.ctypes.data, factors.b.ctypes.data, factors.rank, bias)
    if isinstance(weights, Factors):
        weights.address_cache = (inputs, rows)
    return rows


def _shared_activation_error(lora: LoraInput) -> ValueError:
    return ValueError(
        f"the activation of '{lora.site.node}' is shared by every row: its adapter must have the "
        "run to itself"
    )


def kernel_feeds(inputs: Sequence[LoraInput], batch: int, spans: Sequence[RowSpan]) -> dict[str, np.ndarray]:
    """The kernel's address tables of one run, for the sites its adapters touch (the others keep
    the graph's default: no branch). Building them copies 32 bytes per row and site."""
    spans = merge_spans(sorted(spans, key=lambda span: span.start))
    addressed = [(span, address_rows(span.weights, inputs)) for span in spans]
    if not addressed:
        return {}
    tables = np.zeros((len(inputs), batch, 4), np.int64)
    touched = np.zeros(len(inputs), bool)
    for span, rows in addressed:
        tables[:, span.start : span.stop] = rows[:, None, :]
        touched |= rows[:, 0] != 0
    feeds = {}
    for index in np.flatnonzero(touched):
        lora = inputs[index]
        if lora.site.per_row:
            feeds[lora.table] = tables[index]
            continue
        users = [span for span, rows in addressed if rows[index, 0]]
        if len(users) != 1 or (users[0].start, users[0].stop) != (0, batch):
            raise _shared_activation_error(lora)
        feeds[lora.table] = tables[index, :1]
    return feeds


@dataclasses.dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of a batch and the LoRA factors they use (by the sites' call group,
    :attr:`LoraSite.call_group`; empty: none)."""

    start: int
    stop: int
    weights: Mapping[str, LoraWeights]


DEFAULT_FEED_MEMORY_BYTES = 1 << 30


def rank_bucket(rank: int) -> int:
    return 0 if rank <= 0 else 1 << (rank - 1).bit_length()


def merge_spans(spans: Sequence[RowSpan]) -> list[RowSpan]:
    """Adjacent spans with the same factors (one adapter's requests side by side) as one span."""
    merged: list[RowSpan] = []
    for span in spans:
        last = merged[-1] if merged else None
        if last is not None and last.stop == span.start and last.weights is span.weights:
            merged[-1] = RowSpan(last.start, span.stop, last.weights)
        else:
            merged.append(span)
    return merged


class FeedPool:
    """The process's feed memory: the buffers of every :class:`FeedBuffers` together stay within
    ``limit_bytes``. A user that must grow past it takes the space of the least recently used
    other users' buffers (they allocate again on their next run); a run that alone needs more than
    the limit gets arrays of its own, freed when it ends."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._users: collections.OrderedDict[FeedBuffers, None] = collections.OrderedDict()
        self.held_bytes = 0
        self.transient_runs = 0
        self.evictions = 0

    def _reserve(self, user: FeedBuffers, grow: int) -> bool:
        """Account ``grow`` more bytes to ``user`` if the limit allows it, evicting others."""
        with self._lock:
            self._users[user] = None
            self._users.move_to_end(user)
            if user.held_bytes + grow > self.limit_bytes:
                self.transient_runs += 1
                return False
            for other in list(self._users):
                if self.held_bytes + grow <= self.limit_bytes:
                    break
                if other is not user and other.held_bytes:
                    self.held_bytes -= other._drop()
                    self.evictions += 1
            self.held_bytes += grow
            return True

    def _release(self, user: FeedBuffers) -> None:
        with self._lock:
            self._users.pop(user, None)
            self.held_bytes -= user._drop()


class FeedBuffers:
    """The feed arrays of one thread that runs one batch at a time (a model's batcher): one flat
    buffer per feed name, grown to the largest run and viewed by every smaller one. Filling warm
    buffers avoids allocating and faulting in fresh pages for every run."""

    def __init__(self, pool: FeedPool | None = None) -> None:
        self._pool = pool if pool is not None else FeedPool(1 << 62)
        self._flat: dict[str, np.ndarray] = {}
        self.held_bytes = 0

    def arrays(self, wanted: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
        """Arrays of the given (name, shape, dtype) for one run; their contents are arbitrary.
        They stay valid until the next call (or longer, when the pool took the buffers)."""
        sizes = [(name, int(np.prod(shape)) * np.dtype(dtype).itemsize) for name, shape, dtype in wanted]
        grow = sum(max(0, size - self._held(name)) for name, size in sizes)
        if grow and not self._pool._reserve(self, grow):
            return [np.empty(shape, dtype) for _name, shape, dtype in wanted]
        if grow:
            for name, size in sizes:
                if size > self._held(name):
                    self.held_bytes += size - self._held(name)
                    self._flat[name] = np.empty(size, np.uint8)
        else:
            self._pool._reserve(self, 0)  # marks this user recently used
        return [
            self._flat[name][:size].view(dtype).reshape(shape)
            for (name, size), (_name, shape, dtype) in zip(sizes, wanted, strict=True)
        ]

    def close(self) -> None:
        """Give the buffers back to the pool (the model is unloaded)."""
        self._pool._release(self)

    def _held(self, name: str) -> int:
        flat = self._flat.get(name)
        return 0 if flat is None else flat.nbytes

    def _drop(self) -> int:
        """Forget every buffer (runs still using views keep them alive); returns the bytes."""
        held, self.held_bytes = self.held_bytes, 0
        self._flat.clear()
        return held


def build_feeds(
    inputs: Sequence[LoraInput], batch: int, spans: Sequence[RowSpan], buffers: FeedBuffers | None = None
) -> dict[str, np.ndarray]:
    """The feeds of one run. With ``buffers`` the arrays are reused between runs (the caller must
    not start a run before the previous one using them has finished)."""
    if inputs and inputs[0].table:
        return kernel_feeds(inputs, batch, spans)
    spans = merge_spans(sorted(spans, key=lambda span: span.start))
    feeds: dict[str, np.ndarray] = {}
    plans = []
    for lora in inputs:
        site = lora.site
        users = [(span, span.weights[site.call_group]) for span in spans if site.call_group in span.weights]
        if not users:
            continue  # the graph's rank-0 default applies
        rank = rank_bucket(max(weights.rank for _span, weights in users))
        whole = len(users) == 1 and (users[0][0].start, users[0][0].stop) == (0, batch)
        if not site.per_row and not whole:
            raise _shared_activation_error(lora)
        if whole and users[0][1].rank == rank:
            # One adapter on every row, no padding: [1, in, R] views that MatMul broadcasts over
            # the batch, so no copies and one product for all rows.
            weights = users[0][1]
            lead = (1,) * (1 + lora.middle_dims)
            feeds[lora.a] = weights.a.reshape(lead + weights.a.shape)
            feeds[lora.b] = weights.b.reshape(lead + weights.b.shape)
            if lora.bias and weights.bias is not None:
                feeds[lora.bias] = weights.bias.reshape((1,) * (1 + lora.bias_ones) + weights.bias.shape)
            continue
        plans.append((lora, users, rank, users[0][1].a.dtype))
    wanted = []
    for lora, users, rank, dtype in plans:
        middle = (1,) * lora.middle_dims
        wanted.append((lora.a, (batch, *middle, lora.site.in_features, rank), dtype))
        wanted.append((lora.b, (batch, *middle, rank, lora.site.out_features), dtype))
        if lora.bias and any(weights.bias is not None for _span, weights in users):
            wanted.append((lora.bias, (batch, *(1,) * lora.bias_ones, lora.site.out_features), dtype))
    arrays = buffers.arrays(wanted) if buffers is not None else [np.empty(s, d) for _n, s, d in wanted]
    filled = dict(zip((name for name, _shape, _dtype in wanted), arrays, strict=True))
    for lora, users, rank, _dtype in plans:
        a_rows, b_rows = filled[lora.a], filled[lora.b]
        _fill(a_rows, b_rows, users, rank, batch)
        feeds[lora.a] = a_rows
        feeds[lora.b] = b_rows
        if lora.bias in filled:
            feeds[lora.bias] = _fill_bias(filled[lora.bias], users)
    return feeds


def _fill_bias(rows: np.ndarray, users: Sequence[tuple[RowSpan, LoraWeights]]) -> np.ndarray:
    """Each span's bias delta in its rows, zeros elsewhere."""
    rows[...] = 0
    for span, weights in users:
        if weights.bias is not None:
            rows[span.start : span.stop] = weights.bias
    return rows


def _fill(
    a_rows: np.ndarray,
    b_rows: np.ndarray,
    users: Sequence[tuple[RowSpan, LoraWeights]],
    rank: int,
    batch: int,
) -> None:
    """Write every element of the run's A_rows and B_rows: each span's factors, zeros in the rank
    padding and in rows no span covers (the arrays come with arbitrary contents)."""
    row = 0
    for span, weights in users:
        if row < span.start:
            a_rows[row : span.start] = 0
            b_rows[row : span.start] = 0
        a_rows[span.start : span.stop, ..., : weights.rank] = weights.a
        b_rows[span.start : span.stop, ..., : weights.rank, :] = weights.b
        if weights.rank < rank:
            a_rows[span.start : span.stop, ..., weights.rank :] = 0
            b_rows[span.start : span.stop, ..., weights.rank :, :] = 0
        row = span.stop
    if row < batch:
        a_rows[row:batch] = 0
        b_rows[row:batch] = 0
