"""The Open Inference Protocol servicer (KServe v2 gRPC, and the Triton RPCs ortmux serves): a
second thin servicer over the same data plane as the native API. Every method converts, then
delegates; errors leave through the same interceptor and table."""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import grpc

from ortmux.worker.api import convert, oip_convert, oip_generation
from ortmux.worker.api.grpc_runtime import Offload, is_active
from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.api.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from ortmux.worker.api.interceptors import current_identity
from ortmux.worker.dataplane import DataPlane
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.errors import Unimplemented, WorkerError
from ortmux.worker.streaming import Incoming, StreamAnswer

SERVICE = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
# Triton RPCs ortmux does not serve; each answers UNIMPLEMENTED by name.
UNSERVED = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, stream_window: int, requests: Offload, control: Offload) -> None:
        self._dataplane = dataplane
        self._stream_window = stream_window
        self._requests = requests
        self._control = control

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._dataplane.ready())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="ortmux", version=_version(), extensions=EXTENSIONS)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        return await self._control(self._model_ready, request)

    def _model_ready(self, request: oip.ModelReadyRequest) -> oip.ModelReadyResponse:
        base, adapter = oip_convert.split_name(request.name)
        try:
            self._dataplane.get_model(base)
            if adapter:
                self._dataplane.get_adapter(current_identity(), base, adapter)
        except WorkerError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=True)

    def _described(self, name: str) -> BaseModel:
        """The base model a (possibly adapter-qualified) name describes; the adapter must exist."""
        base, adapter = oip_convert.split_name(name)
        model = self._dataplane.get_model(base)
        if adapter:
            self._dataplane.get_adapter(current_identity(), base, adapter)
        return model

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        return await self._control(self._model_metadata, request)

    def _model_metadata(self, request: oip.ModelMetadataRequest) -> oip.ModelMetadataResponse:
        model = self._described(request.name)
        if self._generates(model):
            inputs, outputs = oip_generation.model_io()
            return oip.ModelMetadataResponse(
                name=request.name,
                versions=["1"],
                platform=PLATFORM,
                inputs=[_metadata(*entry) for entry in inputs],
                outputs=[_metadata(*entry) for entry in outputs],
            )
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform=PLATFORM,
            inputs=[oip_convert.tensor_metadata(spec) for spec in model.inputs],
            outputs=[oip_convert.tensor_metadata(spec) for spec in model.outputs],
        )

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        return await self._control(self._model_config, request)

    def _model_config(self, request: oip.ModelConfigRequest) -> oip.ModelConfigResponse:
        model = self._described(request.name)
        if self._generates(model):
            return oip.ModelConfigResponse(config=_generation_config(request.name))
        batched = model.batchable
        skip = 1 if batched else 0  # with max_batch_size > 0, dims leave out the batch dimension
        config = oip.ModelConfig(
            name=request.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=self._dataplane.max_batch_rows if batched else 0,
        )
        for spec in model.inputs:
            config.input.add(name=spec.name, data_type=_config_type(spec.dtype), dims=spec.shape[skip:])
        for spec in model.outputs:
            config.output.add(name=spec.name, data_type=_config_type(spec.dtype), dims=spec.shape[skip:])
        return oip.ModelConfigResponse(config=config)

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        deadline = convert.call_deadline(context)
        tenant = current_identity().tenant
        if oip_generation.is_generation(request):
            generation = oip_generation.parse(request, deadline, is_active(context), tenant)
            whole = dataclasses.replace(generation, stream=False)
            stream = await self._requests(self._dataplane.generate, generation.request)
            context.add_done_callback(lambda _context: stream.close())
            try:
                return await anext(aiter(oip_generation.responses(whole, stream)))
            finally:
                stream.close()
        inference = oip_convert.request_from_proto(request, deadline, is_active(context), tenant)
        result = await convert.submitted(self._dataplane, self._requests, inference)
        return oip_convert.response_to_proto(result, request.model_name, request.id)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        deadline = convert.call_deadline(context)
        tenant = current_identity().tenant
        active = is_active(context)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            return
        if oip_generation.is_generation(first):
            async for response in self._generation_stream(
                _chained(first, messages), deadline, tenant, context
            ):
                yield response
            return
        # request id -> the model names sent with it, in order (a client may repeat an id)
        names: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)

        async def incoming() -> AsyncIterator[Incoming]:
            number = 0
            async for message in _chained(first, messages):
                key = message.id or f"#{number}"
                number += 1
                names[key].append(message.model_name)
                yield (key, partial(oip_convert.request_from_proto, message, deadline, active, tenant))

        answers = convert.answer_stream(
            self._dataplane, self._requests, incoming(), self._stream_window, context
        )
        async for answer in answers:
            sent = names.get(answer.request_id)
            yield _stream_answer(answer, sent.popleft() if sent else "")
            if sent is not None and not sent:
                del names[answer.request_id]

    async def _generation_stream(
        self,
        messages: AsyncIterator[oip.ModelInferRequest],
        deadline: float | None,
        tenant: str,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Generations on a stream, one after the other: each request's responses (one per chunk
        when it streams), its errors in ``error_message`` with the stream going on."""
        async for message in messages:
            try:
                generation = oip_generation.parse(message, deadline, is_active(context), tenant)
                stream = await self._requests(self._dataplane.generate, generation.request)
                context.add_done_callback(lambda _context, stream=stream: stream.close())
                try:
                    async for response in oip_generation.responses(generation, stream):
                        yield oip.ModelStreamInferResponse(infer_response=response)
                finally:
                    stream.close()
            except WorkerError as error:
                yield oip.ModelStreamInferResponse(
                    error_message=f"{error.code.name}: {error.message}",
                    infer_response=oip.ModelInferResponse(model_name=message.model_name, id=message.id),
                )

    def _generates(self, model: BaseModel) -> bool:
        return self._dataplane.describe_generation(model).decoder is not None

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelStatisticsResponse:
        return await self._control(self._model_statistics, request)

    def _model_statistics(self, request: oip.ModelStatisticsRequest) -> oip.ModelStatisticsResponse:
        if request.name:
            models = [self._described(request.name).name]
        else:
            models = sorted(model.name for model in self._dataplane.list_models())
        response = oip.ModelStatisticsResponse()
        for name in models:
            stats = self._dataplane.model_stats(name)
            entry = response.model_stats.add(
                name=name,
                version="1",
                last_inference=stats.last_inference_ms,
                inference_count=stats.rows,
                execution_count=stats.compute_count,
            )
            entry.inference_stats.success.CopyFrom(
                oip.StatisticDuration(count=stats.success_count, ns=stats.success_ns)
            )
            entry.inference_stats.fail.CopyFrom(
                oip.StatisticDuration(count=stats.fail_count, ns=stats.fail_ns)
            )
            entry.inference_stats.queue.CopyFrom(
                oip.StatisticDuration(count=stats.queue_count, ns=stats.queue_ns)
            )
            entry.inference_stats.compute_infer.CopyFrom(
                oip.StatisticDuration(count=stats.compute_count, ns=stats.compute_ns)
            )
        return response

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        return await self._control(self._repository_index, request)

    def _repository_index(self, request: oip.RepositoryIndexRequest) -> oip.RepositoryIndexResponse:
        response = oip.RepositoryIndexResponse()
        for model in sorted(self._dataplane.list_models(), key=lambda m: m.name):
            response.models.add(name=model.name, version="1", state="READY")
        if not request.ready:
            for name in sorted(self._dataplane.loading_models()):
                response.models.add(name=name, version="1", state="LOADING", reason="loading")
        for info in self._dataplane.list_adapters(current_identity()):
            response.models.add(name=f"{info.model}:{info.adapter_id}", version="1", state="READY")
        return response

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        return await self._control(self._repository_model_load, request)

    def _repository_model_load(
        self, request: oip.RepositoryModelLoadRequest
    ) -> oip.RepositoryModelLoadResponse:
        path = oip_convert.load_path(request.parameters)
        self._dataplane.load_model(current_identity(), request.model_name, Path(path))
        return oip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        return await self._control(self._repository_model_unload, request)

    def _repository_model_unload(
        self, request: oip.RepositoryModelUnloadRequest
    ) -> oip.RepositoryModelUnloadResponse:
        self._dataplane.unload_model(current_identity(), request.model_name)
        return oip.RepositoryModelUnloadResponse()


def _metadata(name: str, datatype: str, shape: list[int]) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def _generation_config(name: str) -> oip.ModelConfig:
    """What Triton's LLM clients read: the generation inputs and outputs, decoupled."""
    config = oip.ModelConfig(name=name, platform=PLATFORM, backend="onnxruntime", max_batch_size=0)
    inputs, outputs = oip_generation.model_io()
    for name, datatype, dims in inputs:
        config.input.add(name=name, data_type=oip_convert.CONFIG_TYPE_BY_DATATYPE[datatype], dims=dims)
    for name, datatype, dims in outputs:
        config.output.add(name=name, data_type=oip_convert.CONFIG_TYPE_BY_DATATYPE[datatype], dims=dims)
    config.model_transaction_policy.decoupled = True
    return config


def _version() -> str:
    try:
        return importlib.metadata.version("ortmux")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _config_type(numpy_name: str) -> int:
    return oip_convert.CONFIG_TYPE_BY_DATATYPE[oip_convert.datatype_of(numpy_name)]


async def _chained(first: oip.ModelInferRequest, rest: AsyncIterator[oip.ModelInferRequest]) -> AsyncIterator:
    yield first
    async for message in rest:
        yield message


def _stream_answer(answer: StreamAnswer, model_name: str) -> oip.ModelStreamInferResponse:
    """One answer of a stream: its response, or its error in ``error_message`` (the stream stays
    open); the id always comes back, so callbacks can match answers to requests."""
    request_id = "" if answer.request_id.startswith("#") else answer.request_id
    if answer.error is not None:
        return oip.ModelStreamInferResponse(
            error_message=f"{answer.error.code.name}: {answer.error.message}",
            infer_response=oip.ModelInferResponse(model_name=model_name, id=request_id),
        )
    assert answer.result is not None
    return oip.ModelStreamInferResponse(
        infer_response=oip_convert.response_to_proto(answer.result, model_name, request_id)
    )


class UnservedRpcs(grpc.GenericRpcHandler):
    """Triton's shared-memory, trace and log RPCs: UNIMPLEMENTED, naming the RPC."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if service != SERVICE or method not in UNSERVED:
            return None

        def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise Unimplemented(
                f"{SERVICE}/{method} is not served by ortmux (no shared-memory, trace or log settings "
                "RPCs); send tensors in the request"
            )

        return grpc.unary_unary_rpc_method_handler(refuse)
