"""RPCs of the v1 contract that this worker version does not serve answer UNIMPLEMENTED, saying so."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from ortmux.v1 import (
    adapters_pb2,
    inference_pb2,
    models_pb2,
    models_pb2_grpc,
)
from ortmux.worker.api.server import Worker

CALLS: dict[str, tuple[Callable[[grpc.Channel], object], str]] = {
    "LoadModel": (
        lambda ch: models_pb2_grpc.ModelServiceStub(ch).LoadModel(
            models_pb2.LoadModelRequest(name="m", path="/x.onnx"), timeout=10
        ),
        "loading base models at runtime is not available in this worker version; use --model",
    ),
    "UnloadModel": (
        lambda ch: models_pb2_grpc.ModelServiceStub(ch).UnloadModel(
            models_pb2.UnloadModelRequest(name="demo"), timeout=10
        ),
        "unloading base models at runtime is not available in this worker version",
    ),
}


@pytest.mark.parametrize("rpc", sorted(CALLS))
def test_rpc_not_yet_served_answers_unimplemented(worker: Worker, rpc: str) -> None:
    call, message = CALLS[rpc]
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == message


def test_every_rpc_of_the_contract_is_either_served_or_listed_here() -> None:
    served = {
        "ListModels",
        "GetModel",
        "Infer",
        "InferStream",
        "RegisterAdapter",
        "RegisterAdapterFromPath",
        "GetAdapter",
        "ListAdapters",
        "DeleteAdapter",
    }
    declared = {
        method.name
        for module in (models_pb2, adapters_pb2, inference_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert declared == served | set(CALLS)
