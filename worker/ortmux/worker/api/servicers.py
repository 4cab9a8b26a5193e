"""gRPC servicers: each method converts protobuf to core types, delegates, converts back.

Errors are raised as ortmux errors and turned into statuses by the interceptor.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from ortmux.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from ortmux.worker.api import convert
from ortmux.worker.dataplane import DataPlane
from ortmux.worker.errors import Unimplemented

_NO_ADAPTERS = "adapter management is not available in this worker version"


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        ready = [convert.model_to_proto(model) for model in self._dataplane.list_models()]
        loading = [convert.loading_model_to_proto(name) for name in self._dataplane.loading_models()]
        return models_pb2.ListModelsResponse(models=sorted(ready + loading, key=lambda info: info.name))

    def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.ModelInfo:
        return convert.model_to_proto(self._dataplane.get_model(request.name))

    def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.ModelInfo:
        raise Unimplemented(
            "loading base models at runtime is not available in this worker version; use --model"
        )

    def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        raise Unimplemented("unloading base models at runtime is not available in this worker version")


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def RegisterAdapter(
        self, request_iterator: Iterator[adapters_pb2.RegisterAdapterRequest], context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        raise Unimplemented(_NO_ADAPTERS)

    def RegisterAdapterFromPath(
        self, request: adapters_pb2.RegisterAdapterFromPathRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        raise Unimplemented(_NO_ADAPTERS)

    def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        raise Unimplemented(_NO_ADAPTERS)

    def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        raise Unimplemented(_NO_ADAPTERS)

    def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.DeleteAdapterResponse:
        raise Unimplemented(_NO_ADAPTERS)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    def Infer(
        self, request: inference_pb2.InferRequest, context: grpc.ServicerContext
    ) -> inference_pb2.InferResponse:
        result = self._dataplane.infer(convert.request_from_proto(request))
        return convert.result_to_proto(result)

    def InferStream(
        self, request_iterator: Iterator[inference_pb2.InferRequest], context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.InferStreamResponse]:
        raise Unimplemented("streaming inference is not available in this worker version; use Infer")
        yield  # a generator, like every stream handler
