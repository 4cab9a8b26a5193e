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
