"""What the client returns: plain frozen dataclasses for models, tensors, adapters, inference
results and statistics (no protobuf types in the public API)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ortmux.client._errors import OrtmuxError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A model input or output. ``dtype`` is a numpy dtype name; -1 in ``shape`` is dynamic."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim_names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AdapterTargetInfo:
    """A base weight adapters may change."""

    weight: str
    module: str
    shape: tuple[int, ...]
    kind: str
    rule: str = ""  # which signal of the export named the module
    node: str = ""
    layout: str = ""  # rows, matrix or flattened (LoRA targets)
    aliases: tuple[str, ...] = ()
    quantized_op: str = ""  # on a quantized base: the operator computing the projection
    per_row: bool = True  # rows of one run can take different adapters here (LoRA targets)
    group: str = ""  # the call group: every call of one module shares it (LoRA targets)
    bias: str = ""  # the bias a trained head (modules_to_save) changes (LoRA targets)


@dataclasses.dataclass(frozen=True)
class UnadaptableInfo:
    """A MatMul/Gemm on a weight that no LoRA branch can take, and why."""

    node: str
    op_type: str
    weight: str
    module: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ModelStats:
    arena_bytes: int
    cache_bytes: int
    sessions: int
    load_seconds: float
    cache_hit: bool
    adapters: int
    resident_adapters: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a worker says of one base model."""

    name: str
    state: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    adapter_targets: tuple[AdapterTargetInfo, ...]
    stats: ModelStats
    sha256: str
    providers: tuple[str, ...]
    unadaptable: tuple[UnadaptableInfo, ...] = ()
    fused_nodes: tuple[str, ...] = ()
    max_sequence_length: int = 0  # 0: no limit
    max_sequence_length_from: str = ""  # the setting, config.json, or position embeddings
    generates: bool = False  # a decoder with past: Client.generate serves it
    generation_problem: str = ""  # why it cannot generate, when it cannot
    context_length: int = 0  # prompt + new tokens at most (0: not stated)
    has_tokenizer: bool = False  # it takes text prompts
    kv_cache: str = ""  # a generating model's KV cache: "paged" or "dense"
    kv_cache_reason: str = ""  # why it takes that path


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter. Times are seconds since the epoch."""

    model: str
    adapter_id: str
    format: str
    rank: int
    targets: tuple[str, ...]
    size_bytes: int
    resident: bool
    resident_bytes: int
    pinned: bool
    created_at: float
    last_used_at: float
    sha256: str


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """One request of a stream. ``request_id`` defaults to the request's position in the stream."""

    model: str
    inputs: Mapping[str, Any]
    adapter: str | None = None
    request_id: str | None = None
    output_names: Sequence[str] | None = None
    priority: int = 0  # higher runs first among queued requests of the same tenant (or adapter)


@dataclasses.dataclass(frozen=True)
class InferResult:
    """The answer to one streamed request: ``outputs`` when it succeeded, else ``error``."""

    request_id: str
    outputs: dict[str, np.ndarray] | None = None
    error: OrtmuxError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> dict[str, np.ndarray]:
        """The outputs, or the request's error raised."""
        if self.error is not None:
            raise self.error
        assert self.outputs is not None
        return self.outputs


@dataclasses.dataclass(frozen=True)
class GenerationUsage:
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    """New tokens of a generation: their ids (an eos id included) and the text they add ("" without
    a tokenizer); the last chunk says why it ended ("length", "stop" or "eos") and carries the usage."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""
    usage: GenerationUsage | None = None
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
