"""The native Generate RPC's protobuf <-> the generation path's types."""

from __future__ import annotations

from collections.abc import Callable

from ortmux.v1 import inference_pb2, models_pb2
from ortmux.worker.dataplane import GenerationRequest
from ortmux.worker.dataplane.generation import ModelGeneration
from ortmux.worker.errors import InvalidArgument
from ortmux.worker.generation.job import Chunk
from ortmux.worker.generation.sampling import SamplingParams

DEFAULT_NEW_TOKENS = 16


def request_from_proto(
    message: inference_pb2.GenerateRequest,
    deadline: float | None,
    is_active: Callable[[], bool],
    tenant: str,
) -> GenerationRequest:
    which = message.WhichOneof("input")
    if which is None:
        raise InvalidArgument("give a prompt (text) or input_ids", field="prompt")
    return GenerationRequest(
        model=message.model,
        adapter=message.adapter,
        prompt=message.prompt if which == "prompt" else None,
        input_ids=list(message.input_ids.ids) if which == "input_ids" else None,
        max_new_tokens=message.max_new_tokens or DEFAULT_NEW_TOKENS,
        sampling=SamplingParams(
            temperature=message.temperature,
            top_k=message.top_k,
            top_p=message.top_p if message.HasField("top_p") else 1.0,
            seed=message.seed if message.HasField("seed") else None,
        ),
        stop=tuple(message.stop),
        stop_ids=tuple(message.stop_token_ids),
        priority=message.priority,
        request_id=message.request_id,
        tenant=tenant,
        deadline=deadline,
        is_active=is_active,
    )


def chunk_to_proto(chunk: Chunk, request_id: str) -> inference_pb2.GenerateResponse:
    response = inference_pb2.GenerateResponse(
        request_id=request_id,
        token_ids=list(chunk.token_ids),
        text=chunk.text,
        finish_reason=chunk.finish_reason,
    )
    if chunk.finish_reason:
        response.usage.prompt_tokens = chunk.prompt_tokens
        response.usage.completion_tokens = chunk.completion_tokens
        response.timing.queue_seconds = chunk.queue_seconds
        response.timing.time_to_first_token_seconds = chunk.first_token_seconds
    return response


def describe(info: models_pb2.ModelInfo, generation: ModelGeneration) -> models_pb2.ModelInfo:
    """``info`` with what the model can do for generation."""
    info.generates = generation.decoder is not None
    info.generation_problem = generation.problem
    info.context_length = generation.context_length
    info.has_tokenizer = generation.tokenizer is not None
    info.kv_cache = generation.kv_cache
    info.kv_cache_reason = generation.kv_cache_reason
    return info
