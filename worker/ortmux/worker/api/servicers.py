"""gRPC servicers: each method converts protobuf to core types, delegates, converts back.

Errors are raised as ortmux errors and turned into statuses by the interceptor.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc

from ortmux.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from ortmux.worker.api import convert, generation_convert
from ortmux.worker.api.interceptors import current_identity
from ortmux.worker.api.pages import paginate
from ortmux.worker.dataplane import DataPlane
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.streaming import Incoming


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        ready = [self._model_info(model) for model in self._dataplane.list_models()]
        loading = [convert.loading_model_to_proto(name) for name in self._dataplane.loading_models()]
        return models_pb2.ListModelsResponse(models=sorted(ready + loading, key=lambda info: info.name))

    def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.ModelInfo:
        return self._model_info(self._dataplane.get_model(request.name))

    def _model_info(self, model: BaseModel) -> models_pb2.ModelInfo:
        info = convert.model_to_proto(model, *self._dataplane.count_adapters(model.name))
        return generation_convert.describe(info, self._dataplane.describe_generation(model))

    def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.ModelInfo:
        return self._model_info(
            self._dataplane.load_model(current_identity(), request.name, Path(request.path))
        )

    def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        self._dataplane.unload_model(current_identity(), request.name)
        return models_pb2.UnloadModelResponse()


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    def RegisterAdapter(
        self, request_iterator: Iterator[adapters_pb2.RegisterAdapterRequest], context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        header, chunks = convert.upload_from_proto(request_iterator)
        return convert.adapter_to_proto(self._dataplane.register_adapter(current_identity(), header, chunks))

    def RegisterAdapterFromPath(
        self, request: adapters_pb2.RegisterAdapterFromPathRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        header = convert.path_upload_from_proto(request)
        return convert.adapter_to_proto(
            self._dataplane.register_adapter_from_path(current_identity(), header, Path(request.path))
        )

    def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        return convert.adapter_to_proto(
            self._dataplane.get_adapter(current_identity(), request.model, request.adapter_id)
        )

    def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        page, next_token = paginate(
            self._dataplane.list_adapters(current_identity(), request.model),
            request.page_size,
            request.page_token,
        )
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_to_proto(info) for info in page], next_page_token=next_token
        )

    def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.ServicerContext
    ) -> adapters_pb2.DeleteAdapterResponse:
        self._dataplane.delete_adapter(current_identity(), request.model, request.adapter_id)
        return adapters_pb2.DeleteAdapterResponse()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, stream_window: int) -> None:
        self._dataplane = dataplane
        self._stream_window = stream_window

    def Infer(
        self, request: inference_pb2.InferRequest, context: grpc.ServicerContext
    ) -> inference_pb2.InferResponse:
        deadline = convert.call_deadline(context)
        tenant = current_identity().tenant
        result = self._dataplane.infer(
            convert.request_from_proto(request, deadline, context.is_active, tenant)
        )
        return convert.result_to_proto(result)

    def InferStream(
        self, request_iterator: Iterator[inference_pb2.InferRequest], context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.InferStreamResponse]:
        deadline = convert.call_deadline(context)
        tenant = current_identity().tenant  # read here: the stream's reader runs on its own thread

        def incoming() -> Iterator[Incoming]:
            for message in request_iterator:
                yield (
                    message.request_id,
                    partial(convert.request_from_proto, message, deadline, context.is_active, tenant),
                )

        answers = convert.answer_stream(
            self._dataplane, incoming(), self._stream_window, context, unique_ids=True
        )
        for answer in answers:
            yield convert.stream_answer_to_proto(answer)

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        generation = generation_convert.request_from_proto(
            request, convert.call_deadline(context), context.is_active, current_identity().tenant
        )
        stream = self._dataplane.generate(generation)
        context.add_callback(stream.close)  # the caller went away: the sequence leaves within a step
        try:
            for chunk in stream:
                yield generation_convert.chunk_to_proto(chunk, request.request_id)
        finally:
            stream.close()
