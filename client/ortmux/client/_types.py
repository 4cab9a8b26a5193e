from __future__ import annotations

import dataclasses


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
