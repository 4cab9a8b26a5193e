"""gRPC servicers (``grpc.aio``): each method converts protobuf to core types, delegates,
converts back.

The data plane is synchronous: what may block (admission, management, uploads) runs on the
executors of :mod:`~ortmux.worker.api.grpc_runtime`; waiting for a batch's result or for the
next token happens on the event loop, so an open call holds no thread. Errors are raised as
ortmux errors and turned into statuses by the interceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
from ortmux.worker.api.grpc_runtime import Offload, is_active
from ortmux.worker.api.interceptors import current_identity
from ortmux.worker.api.pages import paginate
from ortmux.worker.dataplane import DataPlane
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.streaming import Incoming


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane, control: Offload) -> None:
        self._dataplane = dataplane
        self._control = control

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        return await self._control(self._list_models)

    def _list_models(self) -> models_pb2.ListModelsResponse:
        ready = [self._model_info(model) for model in self._dataplane.list_models()]
        loading = [convert.loading_model_to_proto(name) for name in self._dataplane.loading_models()]
        return models_pb2.ListModelsResponse(models=sorted(ready + loading, key=lambda info: info.name))

    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelInfo:
        return await self._control(lambda: self._model_info(self._dataplane.get_model(request.name)))

    def _model_info(self, model: BaseModel) -> models_pb2.ModelInfo:
        info = convert.model_to_proto(model, *self._dataplane.count_adapters(model.name))
        return generation_convert.describe(info, self._dataplane.describe_generation(model))

    async def LoadModel(
        self, request: models_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ModelInfo:
        identity = current_identity()
        return await self._control(
            lambda: self._model_info(self._dataplane.load_model(identity, request.name, Path(request.path)))
        )

    async def UnloadModel(
        self, request: models_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.UnloadModelResponse:
        await self._control(self._dataplane.unload_model, current_identity(), request.name)
        return models_pb2.UnloadModelResponse()


class AdapterServicer(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, dataplane: DataPlane, control: Offload, uploads: Offload) -> None:
        self._dataplane = dataplane
        self._control = control
        self._uploads = uploads

    async def RegisterAdapter(
        self,
        request_iterator: AsyncIterator[adapters_pb2.RegisterAdapterRequest],
        context: grpc.aio.ServicerContext,
    ) -> adapters_pb2.AdapterInfo:
        # The upload's messages are read on the loop and handed over one at a time to the thread
        # that receives them (the data plane's upload reads a plain iterator).
        loop = asyncio.get_running_loop()
        messages = aiter(request_iterator)

        def blocking_messages():
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(anext(messages), loop).result()
                except StopAsyncIteration:
                    return

        def register() -> adapters_pb2.AdapterInfo:
            header, chunks = convert.upload_from_proto(blocking_messages())
            return convert.adapter_to_proto(self._dataplane.register_adapter(identity, header, chunks))

        identity = current_identity()
        return await self._uploads(register)

    async def RegisterAdapterFromPath(
        self, request: adapters_pb2.RegisterAdapterFromPathRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        header = convert.path_upload_from_proto(request)
        identity = current_identity()
        info = await self._uploads(
            self._dataplane.register_adapter_from_path, identity, header, Path(request.path)
        )
        return convert.adapter_to_proto(info)

    async def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.AdapterInfo:
        info = await self._control(
            self._dataplane.get_adapter, current_identity(), request.model, request.adapter_id
        )
        return convert.adapter_to_proto(info)

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.ListAdaptersResponse:
        listed = await self._control(self._dataplane.list_adapters, current_identity(), request.model)
        page, next_token = paginate(listed, request.page_size, request.page_token)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_to_proto(info) for info in page], next_page_token=next_token
        )

    async def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext
    ) -> adapters_pb2.DeleteAdapterResponse:
        await self._control(
            self._dataplane.delete_adapter, current_identity(), request.model, request.adapter_id
        )
        return adapters_pb2.DeleteAdapterResponse()


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, stream_window: int, requests: Offload) -> None:
        self._dataplane = dataplane
        self._stream_window = stream_window
        self._requests = requests

    async def Infer(
        self, request: inference_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.InferResponse:
        deadline = convert.call_deadline(context)
        inference = convert.request_from_proto(
            request, deadline, is_active(context), current_identity().tenant
        )
        result = await convert.submitted(self._dataplane, self._requests, inference)
        return convert.result_to_proto(result)

    async def InferStream(
        self, request_iterator: AsyncIterator[inference_pb2.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.InferStreamResponse]:
        deadline = convert.call_deadline(context)
        tenant = current_identity().tenant
        active = is_active(context)

        async def incoming() -> AsyncIterator[Incoming]:
            async for message in request_iterator:
                yield (
                    message.request_id,
                    partial(convert.request_from_proto, message, deadline, active, tenant),
                )

        answers = convert.answer_stream(
            self._dataplane, self._requests, incoming(), self._stream_window, context, unique_ids=True
        )
        async for answer in answers:
            yield convert.stream_answer_to_proto(answer)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        generation = generation_convert.request_from_proto(
            request, convert.call_deadline(context), is_active(context), current_identity().tenant
        )
        stream = await self._requests(self._dataplane.generate, generation)
        context.add_done_callback(lambda _context: stream.close())  # the sequence leaves within a step
        try:
            async for chunk in stream:
                yield generation_convert.chunk_to_proto(chunk, request.request_id)
        finally:
            stream.close()
