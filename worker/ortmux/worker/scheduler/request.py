"""One request waiting in a batcher, and the result it is waiting for."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future

import numpy as np

from ortmux.worker.engine.lora.feeds import LoraWeights
from ortmux.worker.engine.specs import leading_rows

_sequence = itertools.count()


@dataclasses.dataclass(frozen=True)
class BatchResult:
    outputs: dict[str, np.ndarray]
    queue_seconds: float
    compute_seconds: float
    batch_rows: int


@dataclasses.dataclass(eq=False)
class QueuedRequest:
    """A request in a batcher's queue.

    ``lora`` gives its rows LoRA factors (shareable with other rows of a batch); ``feeds`` are
    tensors fed to the whole run (ORT and override adapters), which makes the request run alone.
    ``fairness_key`` is what round-robin draws across (the tenant, or the adapter).
    """

    inputs: Mapping[str, np.ndarray]
    output_names: Sequence[str] = ()
    lora: Mapping[str, LoraWeights] = dataclasses.field(default_factory=dict)
    feeds: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    fairness_key: str = ""
    priority: int = 0
    deadline: float | None = None  # time.monotonic() value
    is_active: Callable[[], bool] = lambda: True
    batchable: bool = True
    group: str = ""  # requests of different groups never share a run (e.g. one adapter per batch)
    # Its adapter changes activations every row shares: it shares runs only with requests of the
    # same adapter.
    exclusive: bool = False
    tokens: int = 1  # its size for the batcher's token bound (rows x dynamic sizes)
    future: Future = dataclasses.field(default_factory=Future)
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    sequence: int = dataclasses.field(default_factory=lambda: next(_sequence))
    _signature: tuple | None = dataclasses.field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return leading_rows(self.inputs)

    def signature(self) -> tuple:
        """Requests with equal signatures can share a run: same inputs, dtypes, outputs, and the
        same sizes in every dimension but the first (computed once: the batcher compares it for
        every queued head while it fills a batch)."""
        if self._signature is None:
            if not self.batchable or self.feeds:
                self._signature = ("alone", self.sequence)
            else:
                shapes = tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in self.inputs.items()))
                group = (self.group, id(self.lora)) if self.exclusive else self.group
                self._signature = (shapes, tuple(self.output_names), group)
        return self._signature

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
