"""The Open Inference Protocol servicer (KServe v2 gRPC, and the Triton RPCs ortmux serves): a
second thin servicer over the same data plane as the native API. Every method converts, then
delegates; errors leave through the same interceptor and table."""

from __future__ import annotations

import collections
import importlib.metadata
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc

from ortmux.worker.api import convert, oip_convert
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
    def __init__(self, dataplane: DataPlane, stream_window: int) -> None:
        self._dataplane = dataplane
        self._stream_window = stream_window

    def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._dataplane.ready())

    def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="ortmux", version=_version(), extensions=EXTENSIONS)

    def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.ServicerContext
    ) -> oip.ModelReadyResponse:
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

    def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip.ModelMetadataResponse:
        model = self._described(request.name)
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform=PLATFORM,
            inputs=[oip_convert.tensor_metadata(spec) for spec in model.inputs],
            outputs=[oip_convert.tensor_metadata(spec) for spec in model.outputs],
        )

    def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.ServicerContext
    ) -> oip.ModelConfigResponse:
        model = self._described(request.name)
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

    def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.ServicerContext
    ) -> oip.ModelInferResponse:
        deadline = convert.call_deadline(context)
        inference = oip_convert.request_from_proto(
            request, deadline, context.is_active, current_identity().tenant
        )
        result = self._dataplane.infer(inference)
        return oip_convert.response_to_proto(result, request.model_name, request.id)

    def ModelStreamInfer(
        self, request_iterator: Iterator[oip.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[oip.ModelStreamInferResponse]:
        deadline = convert.call_deadline(context)
        tenant = current_identity().tenant  # read here: the stream's reader runs on its own thread
        # request id -> the model names sent with it, in order (a client may repeat an id)
        names: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)

        def incoming() -> Iterator[Incoming]:
            for number, message in enumerate(request_iterator):
                key = message.id or f"#{number}"
                names[key].append(message.model_name)
                yield (
                    key,
                    partial(oip_convert.request_from_proto, message, deadline, context.is_active, tenant),
                )

        for answer in convert.answer_stream(self._dataplane, incoming(), self._stream_window, context):
            sent = names.get(answer.request_id)
            yield _stream_answer(answer, sent.popleft() if sent else "")
            if sent is not None and not sent:
                del names[answer.request_id]

    def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> oip.ModelStatisticsResponse:
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

    def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        response = oip.RepositoryIndexResponse()
        for model in sorted(self._dataplane.list_models(), key=lambda m: m.name):
            response.models.add(name=model.name, version="1", state="READY")
        if not request.ready:
            for name in sorted(self._dataplane.loading_models()):
                response.models.add(name=name, version="1", state="LOADING", reason="loading")
        for info in self._dataplane.list_adapters(current_identity()):
            response.models.add(name=f"{info.model}:{info.adapter_id}", version="1", state="READY")
        return response

    def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryModelLoadResponse:
        path = oip_convert.load_path(request.parameters)
        self._dataplane.load_model(current_identity(), request.model_name, Path(path))
        return oip.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> oip.RepositoryModelUnloadResponse:
        self._dataplane.unload_model(current_identity(), request.model_name)
        return oip.RepositoryModelUnloadResponse()


def _version() -> str:
    try:
        return importlib.metadata.version("ortmux")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _config_type(numpy_name: str) -> int:
    return oip_convert.CONFIG_TYPE_BY_DATATYPE[oip_convert.datatype_of(numpy_name)]


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

        def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
            raise Unimplemented(
                f"{SERVICE}/{method} is not served by ortmux (no shared-memory, trace or log settings "
                "RPCs); send tensors in the request"
            )

        return grpc.unary_unary_rpc_method_handler(refuse)
