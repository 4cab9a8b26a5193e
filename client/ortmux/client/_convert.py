"""Protobuf <-> the client's Python types, shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from ortmux.client._errors import OrtmuxError
from ortmux.client._types import (
    AdapterInfo,
    AdapterTargetInfo,
    GenerationChunk,
    GenerationUsage,
    ModelInfo,
    ModelStats,
    TensorInfo,
    UnadaptableInfo,
)
from ortmux.common import tensors
from ortmux.v1 import adapters_pb2, inference_pb2, models_pb2


def infer_request(
    model: str,
    inputs: Mapping[str, Any],
    adapter: str | None,
    output_names: Sequence[str] | None,
    request_id: str | None = None,
    priority: int = 0,
) -> inference_pb2.InferRequest:
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of name to array, got {type(inputs).__name__}")
    request = inference_pb2.InferRequest(
        model=model,
        adapter=adapter or "",
        output_names=list(output_names or ()),
        request_id=request_id or "",
        priority=priority,
    )
    try:
        tensors.encode_many({name: np.asarray(value) for name, value in inputs.items()}, request.inputs)
    except tensors.TensorCodecError as exc:
        raise OrtmuxError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    return request


def infer_outputs(response: inference_pb2.InferResponse) -> dict[str, np.ndarray]:
    try:
        return tensors.decode_many(response.outputs)
    except tensors.TensorCodecError as exc:
        raise OrtmuxError(grpc.StatusCode.INTERNAL, f"the worker sent a malformed output: {exc}") from None


def _tensor_info(spec: Any) -> TensorInfo:
    return TensorInfo(
        name=spec.name,
        dtype=tensors.dtype_name(spec.dtype),
        shape=tuple(spec.shape),
        dim_names=tuple(spec.dim_names),
    )


def model_info(message: models_pb2.ModelInfo) -> ModelInfo:
    stats = message.stats
    return ModelInfo(
        name=message.name,
        state=models_pb2.ModelState.Name(message.state).removeprefix("MODEL_STATE_").lower(),
        inputs=tuple(_tensor_info(spec) for spec in message.inputs),
        outputs=tuple(_tensor_info(spec) for spec in message.outputs),
        adapter_targets=tuple(
            AdapterTargetInfo(
                weight=target.weight,
                module=target.module,
                shape=tuple(target.shape),
                kind=models_pb2.AdapterTargetKind.Name(target.kind)
                .removeprefix("ADAPTER_TARGET_KIND_")
                .lower(),
                rule=target.rule,
                node=target.node,
                layout=target.layout,
                aliases=tuple(target.aliases),
                quantized_op=target.quantized_op,
                per_row=target.per_row,
                group=target.group,
                bias=target.bias,
            )
            for target in message.adapter_targets
        ),
        stats=ModelStats(
            arena_bytes=stats.arena_bytes,
            cache_bytes=stats.cache_bytes,
            sessions=stats.sessions,
            load_seconds=stats.load_seconds,
            cache_hit=stats.cache_hit,
            adapters=stats.adapters,
            resident_adapters=stats.resident_adapters,
        ),
        sha256=message.sha256,
        providers=tuple(message.providers),
        unadaptable=tuple(
            UnadaptableInfo(
                node=item.node,
                op_type=item.op_type,
                weight=item.weight,
                module=item.module,
                reason=item.reason,
            )
            for item in message.unadaptable
        ),
        fused_nodes=tuple(message.fused_nodes),
        max_sequence_length=message.max_sequence_length,
        max_sequence_length_from=message.max_sequence_length_from,
        generates=message.generates,
        generation_problem=message.generation_problem,
        context_length=message.context_length,
        has_tokenizer=message.has_tokenizer,
        kv_cache=message.kv_cache,
        kv_cache_reason=message.kv_cache_reason,
    )


def adapter_info(message: adapters_pb2.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(
        model=message.model,
        adapter_id=message.adapter_id,
        format=adapters_pb2.AdapterFormat.Name(message.format).removeprefix("ADAPTER_FORMAT_").lower(),
        rank=message.rank,
        targets=tuple(message.targets),
        size_bytes=message.size_bytes,
        resident=message.resident,
        resident_bytes=message.resident_bytes,
        pinned=message.pinned,
        created_at=message.created_at.ToNanoseconds() / 1e9,
        last_used_at=message.last_used_at.ToNanoseconds() / 1e9,
        sha256=message.sha256,
    )


def generate_request(
    model: str,
    prompt: str | None,
    input_ids: Sequence[int] | None,
    adapter: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    stop_token_ids: Sequence[int],
    priority: int,
    request_id: str,
) -> inference_pb2.GenerateRequest:
    """The request of one generation; exactly one of ``prompt`` and ``input_ids``."""
    if (prompt is None) == (input_ids is None):
        raise OrtmuxError(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of prompt or input_ids")
    if isinstance(stop, str):
        raise TypeError("stop is a sequence of strings, not one string")
    request = inference_pb2.GenerateRequest(
        model=model,
        adapter=adapter or "",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=list(stop),
        stop_token_ids=[int(i) for i in stop_token_ids],
        priority=priority,
        request_id=request_id,
    )
    if seed is not None:
        request.seed = seed
    if prompt is not None:
        request.prompt = prompt
    else:
        request.input_ids.ids.extend(int(i) for i in input_ids or ())
    return request


def generation_chunk(message: inference_pb2.GenerateResponse) -> GenerationChunk:
    last = bool(message.finish_reason)
    return GenerationChunk(
        token_ids=tuple(message.token_ids),
        text=message.text,
        finish_reason=message.finish_reason,
        usage=GenerationUsage(message.usage.prompt_tokens, message.usage.completion_tokens) if last else None,
        queue_seconds=message.timing.queue_seconds,
        time_to_first_token_seconds=message.timing.time_to_first_token_seconds,
    )
