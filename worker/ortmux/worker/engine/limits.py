"""What one request may ask of a model, checked before it runs: the sequence length, the range of
ids that index a table, and its size in tokens.

A request past these would not fail fast: ONNX Gather wraps negative ids (id -1 reads the table's
last row), and a sequence of a million tokens asks attention for terabytes, which either fails
after seconds of work or, spread over concurrent requests, takes the pod down. Each limit is
found once, when the model loads:

- **sequence**: the ``max_sequence_length`` setting; else ``config.json`` beside the model
  (``max_position_embeddings``, ``n_positions``, ``max_seq_len``, ``seq_length``), as Optimum
  writes it; else the rows of a position-embedding table (``position_embeddings``, ``wpe``). It
  bounds dimension 1 of every integer ``[batch, sequence]`` input (ids, masks, positions);
- **id ranges**: integer inputs that a Gather reads as indices into a constant table (an embedding)
  take ids in ``[0, rows)``;
- **tokens**: a request's rows times the sizes of its dynamic dimensions (``[batch, sequence]``:
  batch x sequence), which the batcher bounds per run (``max_batch_tokens``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from ortmux.worker.engine.specs import TensorSpec
from ortmux.worker.errors import InvalidArgument

log = logging.getLogger(__name__)

CONFIG_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
_POSITION_TABLE = re.compile(r"(position_embeddings|\bwpe\b|pos_emb|embed_positions)", re.IGNORECASE)
_INTEGER = ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64")
# Nodes an id passes through unchanged on its way to a Gather.
_PASS_THROUGH = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"})


@dataclasses.dataclass(frozen=True)
class IdRange:
    """Integer input ``input`` indexes ``table``: its values must lie in [0, size)."""

    input: str
    size: int
    table: str

    def check(self, model: str, array: np.ndarray, label: str = "", field: str = "") -> None:
        """InvalidArgument naming the first id outside [0, size), where it is and the range
        (``label`` and ``field`` name the input as the caller's protocol does)."""
        if not array.size:
            return
        low, high = array.min(), array.max()
        if low < 0 or high >= self.size:
            bad = low if low < 0 else high
            where = np.argwhere(array == bad)[0].tolist()
            raise InvalidArgument(
                f"{label or f'input {self.input!r}'} holds {int(bad)} at {where}; model '{model}' takes "
                f"ids in [0, {self.size}) (rows of '{self.table}')",
                field=field or f"inputs[{self.input}]",
            )


@dataclasses.dataclass(frozen=True)
class InputLimits:
    sequence: int = 0  # longest dimension 1 of integer [batch, sequence] inputs; 0: no limit
    sequence_from: str = ""  # where the limit comes from, for messages and GetModel
    id_ranges: tuple[IdRange, ...] = ()

    def check(self, model: str, specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
        """InvalidArgument naming the input, the value and the limit it breaks."""
        if self.sequence:
            for spec in specs:
                array = inputs[spec.name]
                if spec.dtype in _INTEGER and array.ndim == 2 and array.shape[1] > self.sequence:
                    raise InvalidArgument(
                        f"input '{spec.name}' has sequence length {array.shape[1]}, over model "
                        f"'{model}''s limit of {self.sequence} ({self.sequence_from})",
                        field=f"inputs[{spec.name}]",
                    )
        for limit in self.id_ranges:
            limit.check(model, inputs[limit.input])


def find_limits(model: onnx.ModelProto, path: Path, configured: int = 0) -> InputLimits:
    """The limits of ``model`` (loaded from ``path``, weights need not be): ``configured`` > 0 is
    the sequence limit set for it."""
    sequence, source = configured, "max_sequence_length setting"
    if not sequence:
        sequence, source = _from_config(path)
    if not sequence:
        sequence, source = _from_position_table(model)
    return InputLimits(sequence, source if sequence else "", _id_ranges(model))


def request_tokens(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> int:
    """A request's size in tokens: over its inputs, the largest product of the dimensions the
    model leaves dynamic (the batch among them); a [batch, sequence] request is batch x sequence,
    a fixed-size image one row each."""
    tokens = 1
    for spec in specs:
        array = inputs.get(spec.name)
        if array is not None and array.ndim == len(spec.shape):
            dynamic = [size for size, want in zip(array.shape, spec.shape, strict=True) if want < 0]
            tokens = max(tokens, math.prod(dynamic))
    return tokens


def _from_config(path: Path) -> tuple[int, str]:
    config = path.parent / "config.json"
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return 0, ""
    if not isinstance(values, dict):
        return 0, ""
    for key in CONFIG_KEYS:
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, f"{key} in {config.name}"
    return 0, ""


def _from_position_table(model: onnx.ModelProto) -> tuple[int, str]:
    for tensor in model.graph.initializer:
        if len(tensor.dims) == 2 and _POSITION_TABLE.search(tensor.name):
            return int(tensor.dims[0]), f"rows of the position embeddings '{tensor.name}'"
    return 0, ""


def _id_ranges(model: onnx.ModelProto) -> tuple[IdRange, ...]:
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    integer_inputs = [
        value.name
        for value in graph.input
        if value.name not in initializers
        and value.type.tensor_type.elem_type
        in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8)
    ]
    ranges = []
    for name in integer_inputs:
        found: list[tuple[int, str]] = []
        stack, seen = [name], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            for node in consumers.get(current, []):
                if node.op_type in _PASS_THROUGH and node.input[0] == current:
                    stack.append(node.output[0])
                elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == current:
                    table = _constant(node.input[0], initializers, producers)
                    axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
                    if table is not None and axis == 0 and table.dims:
                        found.append((int(table.dims[0]), table.name))
        if found:
            size, table = min(found)
            ranges.append(IdRange(name, size, table))
    return tuple(ranges)


def _constant(
    name: str, initializers: Mapping[str, onnx.TensorProto], producers: Mapping[str, onnx.NodeProto]
) -> onnx.TensorProto | None:
    for _ in range(4):
        if name in initializers:
            return initializers[name]
        producer = producers.get(name)
        if producer is None or producer.op_type not in ("Identity", "DequantizeLinear", "Cast"):
            return None
        name = producer.input[0]
    return None
