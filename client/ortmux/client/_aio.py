from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from ortmux.client import _convert
from ortmux.client._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from ortmux.client._errors import OrtmuxError
from ortmux.client._types import ModelInfo
from ortmux.v1 import inference_pb2_grpc, models_pb2, models_pb2_grpc

T = TypeVar("T")


class AsyncClient:
    """The asyncio twin of :class:`Client`: the same methods, awaited.

    Create it inside a running event loop; use ``async with`` or ``await close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        options = channel_options(max_message_bytes)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self.target = target
        self.timeout = timeout
        self._models = models_pb2_grpc.ModelServiceStub(self._channel)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._call(self._models.ListModels, models_pb2.ListModelsRequest(), timeout)
        return [_convert.model_info(model) for model in response.models]

    async def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        response = await self._call(self._models.GetModel, models_pb2.GetModelRequest(name=model), timeout)
        return _convert.model_info(response)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        adapter: str | None = None,
        *,
        output_names: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        request = _convert.infer_request(model, inputs, adapter, output_names)
        return _convert.infer_outputs(await self._call(self._inference.Infer, request, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise OrtmuxError.from_rpc_error(error) from None
