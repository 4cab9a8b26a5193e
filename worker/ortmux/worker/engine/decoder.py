"""Decoders with past: the inputs and outputs that let a model generate one token per step.

Optimum's ``text-generation-with-past`` exports (and torch exports with the same I/O) take
``input_ids``, ``attention_mask``, optionally ``position_ids``, and ``past_key_values.N.key`` /
``.value`` (``[batch, kv_heads, past_length, head_dim]``), and give ``logits`` with
``present.N.key`` / ``.value`` (the past with the new positions appended). Found once at load.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from ortmux.worker.engine.specs import TensorSpec

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    layers: int
    kv_heads: int
    head_dim: int
    kv_dtype: str  # numpy dtype name of the cache
    position_ids: bool  # whether the model takes position ids (rows of different lengths can share a step)
    logits: str = "logits"

    @staticmethod
    def past(layer: int, part: str) -> str:
        return f"past_key_values.{layer}.{part}"

    @staticmethod
    def present(layer: int, part: str) -> str:
        return f"present.{layer}.{part}"

    def cache_names(self) -> list[tuple[str, str]]:
        """(past input, present output) for every layer's key and value, in that order."""
        return [
            (self.past(layer, part), self.present(layer, part))
            for layer in range(self.layers)
            for part in ("key", "value")
        ]

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize


def find_decoder(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> DecoderSpec | str:
    """The model's decoder I/O, or what it lacks to generate (for the FAILED_PRECONDITION)."""
    by_input = {spec.name: spec for spec in inputs}
    out_names = {spec.name for spec in outputs}
    pasts = {m.groups(): by_input[name] for name in by_input if (m := _PAST.match(name))}
    if not pasts:
        return (
            "it has no past_key_values.N.key/value inputs (export it with past, e.g. Optimum's "
            "text-generation-with-past)"
        )
    layers = 1 + max(int(layer) for layer, _part in pasts)
    missing = [
        name
        for layer in range(layers)
        for part in ("key", "value")
        for name in (DecoderSpec.past(layer, part), DecoderSpec.present(layer, part))
        if name not in by_input and name not in out_names
    ]
    if missing:
        return f"its cache inputs and outputs do not pair up (missing {', '.join(missing[:4])})"
    for name in ("input_ids", "attention_mask"):
        if name not in by_input:
            return f"it has no '{name}' input"
    if "logits" not in out_names:
        return "it has no 'logits' output"
    first = pasts[("0", "key")]
    if len(first.shape) != 4 or first.shape[1] < 1 or first.shape[3] < 1:
        return f"its past {first.name} is {first.describe()}, not [batch, kv_heads, past, head_dim]"
    extra = (
        set(by_input)
        - {"input_ids", "attention_mask", "position_ids"}
        - {name for name, _present in DecoderSpec(layers, 1, 1, "float32", False).cache_names()}
    )
    if extra:
        return f"it takes inputs a generation step cannot fill ({', '.join(sorted(extra))})"
    return DecoderSpec(
        layers=layers,
        kv_heads=first.shape[1],
        head_dim=first.shape[3],
        kv_dtype=first.dtype,
        position_ids="position_ids" in by_input,
    )
