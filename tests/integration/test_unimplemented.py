"""RPCs of the v1 contract that this worker version does not serve answer UNIMPLEMENTED, saying so."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)
from ortmux.worker.api.server import Worker

ADAPTERS = "adapter management is not available in this worker version"

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
    "RegisterAdapter": (
        lambda ch: adapters_pb2_grpc.AdapterServiceStub(ch).RegisterAdapter(
            iter(
                [
                    adapters_pb2.RegisterAdapterRequest(
                        header=adapters_pb2.AdapterUploadHeader(model="demo", adapter_id="a", total_bytes=3)
                    ),
                    adapters_pb2.RegisterAdapterRequest(chunk=b"abc"),
                ]
            ),
            timeout=10,
        ),
        ADAPTERS,
    ),
    "RegisterAdapterFromPath": (
        lambda ch: adapters_pb2_grpc.AdapterServiceStub(ch).RegisterAdapterFromPath(
            adapters_pb2.RegisterAdapterFromPathRequest(model="demo", adapter_id="a", path="/x"), timeout=10
        ),
        ADAPTERS,
    ),
    "GetAdapter": (
        lambda ch: adapters_pb2_grpc.AdapterServiceStub(ch).GetAdapter(
            adapters_pb2.GetAdapterRequest(model="demo", adapter_id="a"), timeout=10
        ),
        ADAPTERS,
    ),
    "ListAdapters": (
        lambda ch: adapters_pb2_grpc.AdapterServiceStub(ch).ListAdapters(
            adapters_pb2.ListAdaptersRequest(), timeout=10
        ),
        ADAPTERS,
    ),
    "DeleteAdapter": (
        lambda ch: adapters_pb2_grpc.AdapterServiceStub(ch).DeleteAdapter(
            adapters_pb2.DeleteAdapterRequest(model="demo", adapter_id="a"), timeout=10
        ),
        ADAPTERS,
    ),
    "InferStream": (
        lambda ch: list(
            inference_pb2_grpc.InferenceServiceStub(ch).InferStream(
                iter([inference_pb2.InferRequest(model="demo", request_id="1")]), timeout=10
            )
        ),
        "streaming inference is not available in this worker version; use Infer",
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
    served = {"ListModels", "GetModel", "Infer"}
    declared = {
        method.name
        for module in (models_pb2, adapters_pb2, inference_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert declared == served | set(CALLS)


def test_infer_with_an_adapter_is_unimplemented(client: Client, token_ids: np.ndarray) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.infer("demo", {"input_ids": token_ids}, adapter="customer-1")
    assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "adapter 'customer-1' was asked for, but this worker version serves base models only" in (
        caught.value.message
    )
