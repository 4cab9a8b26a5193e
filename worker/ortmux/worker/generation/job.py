"""One generation as the decode loop carries it (its prompt, sampler, text, adapter, the events
its caller reads) and the chunks it sends."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np

from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.lora.feeds import LoraWeights
from ortmux.worker.generation.events import Events
from ortmux.worker.generation.sampling import Sampler
from ortmux.worker.generation.text import TextStream


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one step gave a generation: its new token ids and their text; the last chunk says why
    it ended and carries the usage and timing."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""  # "", "length", "stop" or "eos"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    first_token_seconds: float = 0.0


@dataclasses.dataclass(eq=False)
class GenerationJob:
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    text: TextStream
    stop_ids: frozenset[int]
    eos_ids: frozenset[int]
    kv_bytes: int
    lora: Mapping[str, LoraWeights] = dataclasses.field(default_factory=dict)
    feeds: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    exclusive: bool = False
    # Its prompt's full blocks' keys in the prefix cache (generation/prefix_cache.py); None: not cached
    prefix_keys: tuple[bytes, ...] | None = None
    fairness_key: str = ""
    priority: int = 0
    deadline: float | None = None  # time.monotonic()
    is_active: Callable[[], bool] = lambda: True
    on_done: Callable[[], None] = lambda: None  # the adapter and quotas it holds go back
    events: Events = dataclasses.field(default_factory=Events)
    enqueued_at: float = dataclasses.field(default_factory=time.monotonic)
    generated: list[int] = dataclasses.field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    admitted_at: float = 0.0
    ended: bool = False  # its last event is sent and what it held released
    # On the paged KV cache (scheduler/paged_loop.py): the blocks it holds, the positions they hold
    blocks: list[int] = dataclasses.field(default_factory=list)
    kv_len: int = 0
    preemptions: int = 0

    def context_ids(self) -> list[int]:
        """What its KV must hold before it samples again: its prompt and the tokens it generated
        (all of them after a preemption, to recompute)."""
        return self.prompt_ids + self.generated if self.generated else self.prompt_ids

    def group(self, decoder: DecoderSpec) -> tuple:
        """Jobs of one group share decode steps."""
        if self.feeds or self.exclusive or not decoder.position_ids:
            return ("own", id(self))
        return ("rows",)
