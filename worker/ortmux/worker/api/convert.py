"""The native API's protobuf <-> core types, the checks on request fields that only the wire
format has (name lengths, counts), the streaming answers' plumbing over a gRPC context, and the
call deadline."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future

import grpc
from google.protobuf import timestamp_pb2

from ortmux.common import tensors
from ortmux.v1 import adapters_pb2, inference_pb2, models_pb2, tensor_pb2
from ortmux.worker.adapters import formats
from ortmux.worker.adapters.manager import AdapterInfo, UploadHeader, UploadTrailer
from ortmux.worker.api.errors import to_rpc_status
from ortmux.worker.api.grpc_runtime import Offload, result_of
from ortmux.worker.dataplane import DataPlane, InferenceRequest, InferenceResult
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.specs import TensorSpec
from ortmux.worker.errors import DeadlineExceeded, InvalidArgument
from ortmux.worker.request_bounds import check_length
from ortmux.worker.streaming import AnswerStream, Incoming, StreamAnswer


def spec_to_proto(spec: TensorSpec) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(
        name=spec.name,
        dtype=tensors.dtype_code(spec.dtype),
        shape=spec.shape,
        dim_names=spec.dim_names,
    )


def model_to_proto(model: BaseModel, adapters: int = 0, resident_adapters: int = 0) -> models_pb2.ModelInfo:
    targets = [
        models_pb2.AdapterTarget(
            weight=site.weight,
            module=site.module,
            shape=[site.in_features, site.out_features],
            kind=models_pb2.ADAPTER_TARGET_KIND_LORA,
            in_features=site.in_features,
            out_features=site.out_features,
            rule=site.rule,
            node=site.node,
            layout=site.layout,
            aliases=site.aliases,
            quantized_op=site.quantized,
            per_row=site.per_row,
            group=site.call_group,
            bias=site.bias,
        )
        for site in model.lora_sites
    ]
    specs = model.feedable_specs()
    targets += [
        models_pb2.AdapterTarget(
            weight=name, shape=specs[name][1], kind=models_pb2.ADAPTER_TARGET_KIND_OVERRIDE
        )
        for name in model.overridable
        if name in specs
    ]
    return models_pb2.ModelInfo(
        adapter_targets=targets,
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
            adapters=adapters,
            resident_adapters=resident_adapters,
        ),
        sha256=model.sha256,
        providers=model.providers,
        unadaptable=[
            models_pb2.UnadaptableProjection(
                node=item.node,
                op_type=item.op_type,
                weight=item.weight,
                module=item.module,
                reason=item.reason,
            )
            for item in model.unadaptable
        ],
        fused_nodes=model.fused,
        max_sequence_length=model.limits.sequence,
        max_sequence_length_from=model.limits.sequence_from,
    )


def loading_model_to_proto(name: str) -> models_pb2.ModelInfo:
    return models_pb2.ModelInfo(name=name, state=models_pb2.MODEL_STATE_LOADING)


MAX_NAMES = 256  # inputs or output names per request


NO_DEADLINE_SECONDS = 10**7  # what gRPC reports as time remaining for a call without a deadline


def call_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` value; None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + remaining


async def submitted(dataplane: DataPlane, requests: Offload, request: InferenceRequest) -> InferenceResult:
    """A request's result: admitted off the event loop, its batch's result awaited on it."""
    future = await requests(dataplane.submit, request)
    timeout = None if request.deadline is None else max(request.deadline - time.monotonic(), 0) + 1.0
    try:
        return await result_of(future, timeout)
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed before its batch ran") from None


async def answer_stream(
    dataplane: DataPlane,
    requests: Offload,
    incoming: AsyncIterator[Incoming],
    window: int,
    context: grpc.aio.ServicerContext,
    unique_ids: bool = False,
) -> AsyncIterator[StreamAnswer]:
    """The answers of a streaming call's requests, through the data plane with at most ``window``
    unanswered: reading stops when the call ends, and the stream drains with the worker.
    ``unique_ids``: requests need ids unique among the unanswered ones (the native API's rule)."""

    async def take(build: Callable[[], InferenceRequest]) -> Future[InferenceResult]:
        return await requests(lambda: dataplane.submit(build()))

    answers = AnswerStream(incoming, take, window, unique_ids)
    context.add_done_callback(lambda _context: answers.stop())
    forget = dataplane.on_drain(answers.drain)
    try:
        async for answer in answers:
            yield answer
    finally:
        forget()


def request_from_proto(
    message: inference_pb2.InferRequest,
    deadline: float | None = None,
    is_active: Callable[[], bool] = lambda: True,
    tenant: str = "",
) -> InferenceRequest:
    check_length(message.model, "model")
    check_length(message.adapter, "adapter")
    check_length(message.request_id, "request_id")
    for field, names in (
        ("inputs", [t.name for t in message.inputs]),
        ("output_names", message.output_names),
    ):
        if len(names) > MAX_NAMES:
            raise InvalidArgument(
                f"{field} has {len(names)} entries, over the limit of {MAX_NAMES}", field=field
            )
        for name in names:
            check_length(name, field)
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
        deadline=deadline,
        is_active=is_active,
        tenant=tenant,
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


FORMAT_TO_PROTO = {
    formats.PEFT_LORA: adapters_pb2.ADAPTER_FORMAT_PEFT_LORA,
    formats.ORT_ADAPTER: adapters_pb2.ADAPTER_FORMAT_ORT_ADAPTER,
    formats.WEIGHT_OVERRIDE: adapters_pb2.ADAPTER_FORMAT_WEIGHT_OVERRIDE,
}
FORMAT_FROM_PROTO = {code: name for name, code in FORMAT_TO_PROTO.items()}


def _format_from_proto(code: int) -> str:
    if code == adapters_pb2.ADAPTER_FORMAT_UNSPECIFIED:
        return ""
    if code not in FORMAT_FROM_PROTO:
        raise InvalidArgument(f"unknown adapter format code {code}", field="format")
    return FORMAT_FROM_PROTO[code]


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def adapter_to_proto(info: AdapterInfo) -> adapters_pb2.AdapterInfo:
    return adapters_pb2.AdapterInfo(
        model=info.model,
        adapter_id=info.adapter_id,
        format=FORMAT_TO_PROTO[info.format],
        rank=info.rank,
        targets=info.targets,
        size_bytes=info.size_bytes,
        resident=info.resident,
        resident_bytes=info.resident_bytes,
        pinned=info.pinned,
        created_at=_timestamp(info.created_at),
        last_used_at=_timestamp(info.last_used_at),
        sha256=info.sha256,
    )


def upload_from_proto(
    messages: Iterator[adapters_pb2.RegisterAdapterRequest],
) -> tuple[UploadHeader, Iterator[bytes | UploadTrailer]]:
    """The header (first message), then the chunks and the optional trailer of an upload stream."""
    first = next(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("an adapter upload must start with a header message", field="header")
    header = first.header
    upload = UploadHeader(
        model=header.model,
        adapter_id=header.adapter_id,
        format=_format_from_proto(header.format),
        total_bytes=header.total_bytes,
        sha256=header.sha256,
        files=tuple((f.name, f.size_bytes) for f in header.files),
        pinned=header.pinned,
        replace=header.replace,
        module_mapping_json=header.module_mapping_json,
    )

    def parts() -> Iterator[bytes | UploadTrailer]:
        for message in messages:
            kind = message.WhichOneof("part")
            if kind == "chunk":
                yield message.chunk
            elif kind == "trailer":
                yield UploadTrailer(sha256=message.trailer.sha256)
            else:
                raise InvalidArgument("only the first message of an upload may be a header", field="header")

    return upload, parts()


def path_upload_from_proto(request: adapters_pb2.RegisterAdapterFromPathRequest) -> UploadHeader:
    return UploadHeader(
        model=request.model,
        adapter_id=request.adapter_id,
        format=_format_from_proto(request.format),
        pinned=request.pinned,
        replace=request.replace,
        module_mapping_json=request.module_mapping_json,
    )


def stream_answer_to_proto(answer: StreamAnswer) -> inference_pb2.InferStreamResponse:
    """One answer of a stream: its response, or its error as a google.rpc.Status, in-band."""
    if answer.error is not None:
        return inference_pb2.InferStreamResponse(
            request_id=answer.request_id, error=to_rpc_status(answer.error)
        )
    assert answer.result is not None
    response = result_to_proto(answer.result)
    response.request_id = answer.request_id
    return inference_pb2.InferStreamResponse(request_id=answer.request_id, response=response)
