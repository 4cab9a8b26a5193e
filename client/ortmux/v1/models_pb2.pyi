from ortmux.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]

class AdapterTargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TARGET_KIND_UNSPECIFIED: _ClassVar[AdapterTargetKind]
    ADAPTER_TARGET_KIND_LORA: _ClassVar[AdapterTargetKind]
    ADAPTER_TARGET_KIND_OVERRIDE: _ClassVar[AdapterTargetKind]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
ADAPTER_TARGET_KIND_UNSPECIFIED: AdapterTargetKind
ADAPTER_TARGET_KIND_LORA: AdapterTargetKind
ADAPTER_TARGET_KIND_OVERRIDE: AdapterTargetKind

class AdapterTarget(_message.Message):
    __slots__ = ("weight", "module", "shape", "kind", "in_features", "out_features", "rule", "node", "layout", "aliases", "quantized_op", "per_row", "group", "bias")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_OP_FIELD_NUMBER: _ClassVar[int]
    PER_ROW_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    weight: str
    module: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    kind: AdapterTargetKind
    in_features: int
    out_features: int
    rule: str
    node: str
    layout: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    quantized_op: str
    per_row: bool
    group: str
    bias: str
    def __init__(self, weight: _Optional[str] = ..., module: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., kind: _Optional[_Union[AdapterTargetKind, str]] = ..., in_features: _Optional[int] = ..., out_features: _Optional[int] = ..., rule: _Optional[str] = ..., node: _Optional[str] = ..., layout: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., quantized_op: _Optional[str] = ..., per_row: bool = ..., group: _Optional[str] = ..., bias: _Optional[str] = ...) -> None: ...

class UnadaptableProjection(_message.Message):
    __slots__ = ("node", "op_type", "weight", "module", "reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    op_type: str
    weight: str
    module: str
    reason: str
    def __init__(self, node: _Optional[str] = ..., op_type: _Optional[str] = ..., weight: _Optional[str] = ..., module: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("arena_bytes", "cache_bytes", "sessions", "load_seconds", "cache_hit", "adapters", "resident_adapters")
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    arena_bytes: int
    cache_bytes: int
    sessions: int
    load_seconds: float
    cache_hit: bool
    adapters: int
    resident_adapters: int
    def __init__(self, arena_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., sessions: _Optional[int] = ..., load_seconds: _Optional[float] = ..., cache_hit: bool = ..., adapters: _Optional[int] = ..., resident_adapters: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "state", "inputs", "outputs", "adapter_targets", "stats", "sha256", "providers", "max_batch_size", "unadaptable", "fused_nodes", "max_sequence_length", "max_sequence_length_from", "generates", "generation_problem", "context_length", "has_tokenizer", "kv_cache", "kv_cache_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_TARGETS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNADAPTABLE_FIELD_NUMBER: _ClassVar[int]
    FUSED_NODES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FROM_FIELD_NUMBER: _ClassVar[int]
    GENERATES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelState
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    adapter_targets: _containers.RepeatedCompositeFieldContainer[AdapterTarget]
    stats: ModelStats
    sha256: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    unadaptable: _containers.RepeatedCompositeFieldContainer[UnadaptableProjection]
    fused_nodes: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    max_sequence_length_from: str
    generates: bool
    generation_problem: str
    context_length: int
    has_tokenizer: bool
    kv_cache: str
    kv_cache_reason: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., adapter_targets: _Optional[_Iterable[_Union[AdapterTarget, _Mapping]]] = ..., stats: _Optional[_Union[ModelStats, _Mapping]] = ..., sha256: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., unadaptable: _Optional[_Iterable[_Union[UnadaptableProjection, _Mapping]]] = ..., fused_nodes: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., max_sequence_length_from: _Optional[str] = ..., generates: bool = ..., generation_problem: _Optional[str] = ..., context_length: _Optional[int] = ..., has_tokenizer: bool = ..., kv_cache: _Optional[str] = ..., kv_cache_reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
