"""Infer on the demo model through a real server and the real client."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2
from ortmux.worker.api.server import Worker

from ..conftest import plain_session


def test_list_models_and_model_info(client: Client) -> None:
    assert [model.name for model in client.list_models()] == ["demo"]
    info = client.model_info("demo")
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("input_ids", "int64", (-1, -1))]
    assert [(t.name, t.dtype, t.shape) for t in info.outputs] == [("logits", "float32", (-1, -1, 1000))]
    assert info.inputs[0].dim_names == ("batch", "sequence")
    assert info.state == "ready"
    assert info.providers == ("CPUExecutionProvider",)
    assert len(info.sha256) == 64
    assert info.stats.sessions == 2  # the LoRA graph and the base-only graph over one arena


def test_infer_equals_onnxruntime_in_process(client: Client, worker: Worker, token_ids: np.ndarray) -> None:
    outputs = client.infer("demo", {"input_ids": token_ids})
    model = worker.dataplane.get_model("demo")
    reference = plain_session(model.path)
    (expected,) = reference.run(None, {"input_ids": token_ids})
    assert list(outputs) == ["logits"]
    assert outputs["logits"].dtype == np.float32
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-5, atol=1e-5)


def test_infer_with_output_names(client: Client, token_ids: np.ndarray) -> None:
    assert list(client.infer("demo", {"input_ids": token_ids}, output_names=["logits"])) == ["logits"]


BAD_INPUTS = {
    "wrong dtype": (
        {"input_ids": np.zeros((1, 4), np.float32)},
        "input 'input_ids' has dtype float32, model 'demo' expects int64",
    ),
    "wrong rank": ({"input_ids": np.zeros(4, np.int64)}, "input 'input_ids' has shape [4] (1 dims)"),
    "unknown name": (
        {"input_ids": np.zeros((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)},
        "model 'demo' has no input 'attention_mask'",
    ),
    "missing input": ({}, "input 'input_ids' is missing"),
    "token id out of range": (
        {"input_ids": np.array([[5000]], np.int64)},
        "input 'input_ids' holds 5000 at [0, 0]; model 'demo' takes ids in [0, 1000)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_invalid_argument_naming_the_input(
    client: Client, token_ids: np.ndarray, case: str
) -> None:
    inputs, message = BAD_INPUTS[case]
    with pytest.raises(OrtmuxError) as caught:
        client.infer("demo", inputs)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message
    assert caught.value.reason == "INVALID_ARGUMENT"
    # the worker keeps serving
    assert client.infer("demo", {"input_ids": token_ids})["logits"].shape == (2, 8, 1000)


def test_bad_input_carries_the_field_in_bad_request_details(client: Client) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.infer("demo", {"input_ids": np.zeros((1, 4), np.float32)})
    assert [v.field for v in caught.value.field_violations] == ["inputs[input_ids]"]


def test_unknown_output_name_is_invalid_argument(client: Client, token_ids: np.ndarray) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.infer("demo", {"input_ids": token_ids}, output_names=["hidden"])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'demo' has no output 'hidden'; it gives logits" in caught.value.message


@pytest.mark.parametrize("model", ["nope", "Demo"])
def test_unknown_model_is_not_found(client: Client, token_ids: np.ndarray, model: str) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.infer(model, {"input_ids": token_ids})
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert f"model '{model}' is not served here; served: demo" == caught.value.message
    with pytest.raises(OrtmuxError) as caught:
        client.model_info(model)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_empty_model_name_is_invalid_argument(client: Client, token_ids: np.ndarray) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.infer("", {"input_ids": token_ids})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "model name is empty"


def test_client_refuses_unsendable_dtype_before_calling(client: Client) -> None:
    with pytest.raises(OrtmuxError) as caught:
        client.infer("demo", {"input_ids": np.array([["a", "b"]])})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'input_ids': dtype" in caught.value.message


RAW_BAD_TENSORS = {
    "short data": (
        tensor_pb2.Tensor(name="input_ids", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 4], data=b"\0" * 31),
        "tensor 'input_ids': 31 bytes of data, but dtype int64 and shape [1, 4] need 32",
    ),
    "unspecified dtype": (
        tensor_pb2.Tensor(name="input_ids", shape=[1], data=b"\0" * 8),
        "tensor 'input_ids': dtype DATA_TYPE_UNSPECIFIED is not supported; supported: float32, float16, "
        "float64, int8, int16, int32, int64, uint8, uint16, uint32, uint64, bool",
    ),
    "negative dim": (
        tensor_pb2.Tensor(name="input_ids", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[-1, 1], data=b""),
        "tensor 'input_ids': shape [-1, 1] has a negative dimension",
    ),
    "no name": (
        tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1], data=b"\0" * 8),
        "a tensor has no name",
    ),
}


@pytest.mark.parametrize("case", sorted(RAW_BAD_TENSORS))
def test_malformed_wire_tensor_is_invalid_argument(worker: Worker, case: str) -> None:
    """Bytes a buggy or hostile caller could send; the thin client never builds these."""
    tensor, message = RAW_BAD_TENSORS[case]
    with grpc.insecure_channel(worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(inference_pb2.InferRequest(model="demo", inputs=[tensor]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == message


def test_duplicate_input_is_invalid_argument(worker: Worker) -> None:
    tensor = tensor_pb2.Tensor(name="input_ids", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1], data=b"\0" * 8)
    with grpc.insecure_channel(worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Infer(inference_pb2.InferRequest(model="demo", inputs=[tensor, tensor]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "tensor 'input_ids' appears more than once"


def test_concurrent_requests_from_threads(client: Client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    batches = [np.full((1, 4), i, dtype=np.int64) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ids: client.infer("demo", {"input_ids": ids})["logits"], batches))
    expected = [client.infer("demo", {"input_ids": ids})["logits"] for ids in batches]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_model_info_reports_engine_accounting(client: Client, worker: Worker) -> None:
    stats = client.model_info("demo").stats
    model = worker.dataplane.get_model("demo")
    assert stats.arena_bytes == model.arena.total_bytes > 2_000_000  # the mapped optimized weights
    assert stats.cache_bytes == model.entry.total_bytes >= stats.arena_bytes
    assert stats.sessions == 2
    assert stats.cache_hit is False  # the session's data dir starts empty
    assert 0 < stats.load_seconds < 60
