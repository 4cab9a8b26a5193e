"""Protobuf <-> core types. Nothing else happens here."""

from __future__ import annotations

from ortmux.common import tensors
from ortmux.v1 import inference_pb2, models_pb2, tensor_pb2
from ortmux.worker.dataplane import InferenceRequest, InferenceResult
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.specs import TensorSpec
from ortmux.worker.errors import InvalidArgument


def spec_to_proto(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name,
        dtype=tensors.dtype_code(spec.dtype),
        shape=spec.shape,
        dim_names=spec.dim_names,
    )


def model_to_proto(model: BaseModel) -> models_pb2.ModelInfo:
    return models_pb2.ModelInfo(
        name=model.name,
        state=models_pb2.MODEL_STATE_READY,
        inputs=[spec_to_proto(spec) for spec in model.inputs],
        outputs=[spec_to_proto(spec) for spec in model.outputs],
        stats=models_pb2.ModelStats(
            arena_bytes=model.arena.total_bytes,
            cache_bytes=model.entry.total_bytes,
            sessions=model.sessions,
            load_seconds=model.load_seconds,
            cache_hit=model.cache_hit,
        ),
        sha256=model.sha256,
        providers=model.providers,
    )


def loading_model_to_proto(name: str) -> models_pb2.ModelInfo:
    return models_pb2.ModelInfo(name=name, state=models_pb2.MODEL_STATE_LOADING)


def request_from_proto(message: inference_pb2.InferRequest) -> InferenceRequest:
    try:
        inputs = tensors.decode_many(message.inputs)
    except tensors.TensorCodecError as exc:
        field = f"inputs[{exc.tensor}]" if exc.tensor else "inputs"
        raise InvalidArgument(str(exc), field=field) from None
    return InferenceRequest(
        model=message.model,
        inputs=inputs,
        adapter=message.adapter,
        output_names=tuple(message.output_names),
        request_id=message.request_id,
        priority=message.priority,
    )


def result_to_proto(result: InferenceResult) -> inference_pb2.InferResponse:
    response = inference_pb2.InferResponse(
        model=result.model,
        adapter=result.adapter,
        request_id=result.request_id,
        timing=inference_pb2.InferTiming(
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
            batch_rows=result.batch_rows,
        ),
    )
    tensors.encode_many(result.outputs, response.outputs)
    return response
