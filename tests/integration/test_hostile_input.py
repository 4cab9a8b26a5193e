"""Hostile and oversized input on real workers: no request takes the pod down, every bad request
gets a precise status, and the worker keeps serving at its resting size.

Memory is read from the worker process's own /proc entries (a worker in a process of its own), so
the figures are the worker's, not the test's.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2
from ortmux.worker.adapters import safetensors
from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.errors import InvalidArgument

from ..conftest import scrape, serve_process, worker_settings
from ..demo_adapters import write_peft

IDS = np.array([[5, 17, 300, 999]], dtype=np.int64)


def _status_of(pid: int, key: str) -> int:
    """A /proc/PID/status memory line (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _refused(call) -> OrtmuxError:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value


# -- memory: bounded per request and per run ------------------------------------------------------


def test_concurrent_oversized_requests_are_refused_and_memory_stays_bounded(tmp_path: Path) -> None:
    """Eight concurrent [1, 1310720] requests (10 MB each, under max_request_elements) once drove
    the worker to the OOM killer: now each is refused before it runs, the worker's peak resident
    memory stays within a few hundred MB of its resting size, and it serves after."""
    process, address = serve_process(tmp_path / "data")
    try:
        with Client(address, timeout=60) as client:
            client.infer("demo", {"input_ids": IDS})
            resting = _status_of(process.pid, "VmRSS")
            huge = np.random.default_rng(0).integers(0, 1000, size=(1, 1310720), dtype=np.int64)
            errors: list[OrtmuxError] = []

            def send() -> None:
                errors.append(_refused(lambda: client.infer("demo", {"input_ids": huge})))

            threads = [threading.Thread(target=send) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert [error.code for error in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 8
            assert "sequence length 1310720, over model 'demo''s limit of 2048" in errors[0].message
            assert "max_seq_len in config.json" in errors[0].message
            peak = _status_of(process.pid, "VmHWM")
            assert peak - resting < 400 << 20, (resting >> 20, peak >> 20)
            assert client.infer("demo", {"input_ids": IDS})["logits"].shape == (1, 4, 1000)
    finally:
        process.terminate()
        process.wait(30)


def test_get_model_tells_the_sequence_limit_and_where_it_comes_from(client: Client) -> None:
    info = client.model_info("demo")
    assert (info.max_sequence_length, info.max_sequence_length_from) == (2048, "max_seq_len in config.json")


def test_a_request_over_the_run_token_bound_is_refused_naming_it(client: Client) -> None:
    ids = np.zeros((16, 2048), dtype=np.int64)  # 32768 tokens; each row within the sequence limit
    error = _refused(lambda: client.infer("demo", {"input_ids": ids}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request is 32768 tokens (rows x sequence), over the 16384" in error.message
    assert "max_batch_tokens" in error.message


def test_runs_never_exceed_the_token_bound(tmp_path: Path) -> None:
    """Requests of 3000 tokens each under a 4096-token bound: every run takes one of them."""
    running = start_worker(
        worker_settings(tmp_path, "--max-batch-tokens", "4096", "--max-queue-delay-ms", "200")
    )
    try:
        with Client(running.address, timeout=60) as client:
            ids = np.ones((1, 1500), dtype=np.int64)
            two = np.ones((2, 1500), dtype=np.int64)
            results: list[int] = []
            threads = [
                threading.Thread(target=lambda x=x: results.append(client.infer("demo", {"input_ids": x})))
                for x in (two, two, two, ids)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(results) == 4
        rows = {
            dict(labels)["le"]: value
            for (name, labels), value in scrape(running).items()
            if name == "ortmux_batch_rows_bucket" and dict(labels)["model"] == "demo"
        }
        assert rows["2.0"] == rows["+Inf"]  # no run held more than 2 rows (3000 tokens)
    finally:
        running.stop(0)


def test_the_sequence_limit_setting_applies_per_model(tmp_path: Path) -> None:
    running = start_worker(worker_settings(tmp_path, "--max-sequence-length", "demo=3"))
    try:
        with Client(running.address, timeout=30) as client:
            error = _refused(lambda: client.infer("demo", {"input_ids": IDS}))
    finally:
        running.stop(0)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequence length 4, over model 'demo''s limit of 3 (max_sequence_length setting)" in error.message


def test_past_the_memory_limit_requests_get_resource_exhausted_with_a_retry(tmp_path: Path) -> None:
    running = start_worker(worker_settings(tmp_path, "--memory-limit-bytes", str(64 << 20)))
    try:
        with Client(running.address, timeout=30) as client:
            error = _refused(lambda: client.infer("demo", {"input_ids": IDS}))
        samples = scrape(running)
    finally:
        running.stop(0)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "MEMORY_LIMIT"
    assert error.retry_after == 1.0
    assert "past its memory limit of 64 MiB (memory_limit_bytes)" in error.message
    assert samples[("ortmux_memory_limit_bytes", ())] == 64 << 20
    assert samples[("ortmux_memory_refusals_total", ())] >= 1


def test_an_allocation_failure_is_resource_exhausted_and_the_memory_goes_back(tmp_path: Path) -> None:
    """With the bounds lifted, one [1, 200000] request asks attention for 640 GB: ONNX Runtime's
    allocation fails, the caller gets RESOURCE_EXHAUSTED, and the arena hands back what the run
    took, so the worker returns to its resting size and serves."""
    flags = ("--max-sequence-length", "1000000", "--max-batch-tokens", "1000000")
    process, address = serve_process(tmp_path / "data", *flags)
    try:
        with Client(address, timeout=120) as client:
            client.infer("demo", {"input_ids": IDS})
            resting = _status_of(process.pid, "VmRSS")
            ids = np.ones((1, 200000), dtype=np.int64)
            error = _refused(lambda: client.infer("demo", {"input_ids": ids}))
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert error.reason == "OUT_OF_MEMORY"
            assert "could not allocate the memory this run needs" in error.message
            after = _status_of(process.pid, "VmRSS")
            assert _status_of(process.pid, "VmHWM") - resting > 200 << 20  # the run did take memory
            assert after - resting < 100 << 20, (resting >> 20, after >> 20)
            assert client.infer("demo", {"input_ids": IDS})["logits"].shape == (1, 4, 1000)
    finally:
        process.terminate()
        process.wait(30)


# -- values that were served or answered INTERNAL -------------------------------------------------


@pytest.mark.parametrize("bad", [-1, -1000, 1000, 1 << 40])
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_range(client: Client, bad: int) -> None:
    ids = IDS.copy()
    ids[0, 2] = bad
    error = _refused(lambda: client.infer("demo", {"input_ids": ids}))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"input 'input_ids' holds {bad} at [0, 2]; model 'demo' takes ids in [0, 1000)" in error.message
    assert "'embed_tokens.weight'" in error.message


def _adapter(directory: Path, *, alpha: float = 8.0, poison: float | None = None) -> Path:
    write_peft(directory, rank=4, alpha=8.0, seed=3)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha
    (directory / "adapter_config.json").write_text(json.dumps(config))
    if poison is not None:
        tensors = safetensors.load((directory / "adapter_model.safetensors").read_bytes())
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].copy()
        tensors[name][1, 2] = poison
        (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


@pytest.mark.parametrize(
    ("alpha", "poison", "expected"),
    [
        (float("nan"), None, "lora_alpha must be a finite number, got nan"),
        (float("inf"), None, "lora_alpha must be a finite number, got inf"),
        (8.0, float("nan"), "holds nan at [1, 2]; adapter tensors must be finite"),
        (8.0, float("-inf"), "holds -inf at [1, 2]; adapter tensors must be finite"),
    ],
)
def test_adapters_with_non_finite_values_are_refused(
    client: Client, tmp_path: Path, alpha: float, poison: float | None, expected: str
) -> None:
    adapter = _adapter(tmp_path / "a", alpha=alpha, poison=poison)
    error = _refused(lambda: client.register_adapter("demo", "poisoned", adapter))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.message
    if poison is not None:
        assert "tensor 'base_model.model." in error.message


def test_an_override_with_nan_is_refused(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "override.npz"
    np.savez(path, **{"layers.0.self_attn.q_proj.weight": np.full((128, 128), np.nan, np.float32)})
    error = _refused(lambda: client.register_adapter("demo", "nan-override", path))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "override: tensor 'layers.0.self_attn.q_proj.weight' holds nan at [0, 0]" in error.message


def _raw_infer(worker: Worker, tensor: tensor_pb2.Tensor) -> grpc.RpcError:
    request = inference_pb2.InferRequest(model="demo", inputs=[tensor])
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as caught:
        inference_pb2_grpc.InferenceServiceStub(channel).Infer(request, timeout=30)
    return caught.value


def test_a_shape_whose_size_overflows_is_invalid_argument(worker: Worker) -> None:
    tensor = tensor_pb2.Tensor(name="input_ids", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1 << 32, 1 << 32])
    error = _raw_infer(worker, tensor)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "0 bytes of data, but dtype int64 and shape [4294967296, 4294967296] need" in error.details()


def test_the_open_inference_protocol_refuses_an_overflowing_shape_too(worker: Worker) -> None:
    from ortmux.worker.api.inference_v2 import grpc_service_pb2_grpc as oip_grpc

    request = oip.ModelInferRequest(model_name="demo")
    request.inputs.add(name="input_ids", datatype="INT64", shape=[1 << 32, 1 << 32])
    request.raw_input_contents.append(b"")
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as caught:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "0 raw bytes, but INT64 [4294967296, 4294967296] needs" in caught.value.details()


@pytest.mark.parametrize(
    "method",
    [
        "/ortmux.v1.InferenceService/Infer",
        "/ortmux.v1.ModelService/GetModel",
        "/inference.GRPCInferenceService/ModelInfer",
    ],
)
def test_bytes_that_are_no_message_are_invalid_argument(worker: Worker, method: str) -> None:
    with grpc.insecure_channel(worker.address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff\xff\x0f garbage", timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request is not a valid protobuf message of this method" in caught.value.details()


def test_a_stream_message_that_is_no_message_ends_the_stream_invalid_argument(worker: Worker) -> None:
    good = inference_pb2.InferRequest(model="demo", request_id="good")
    good.inputs.add(name="input_ids", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 4], data=IDS.tobytes())
    with grpc.insecure_channel(worker.address) as channel:
        call = channel.stream_stream(
            "/ortmux.v1.InferenceService/InferStream",
            request_serializer=None,
            response_deserializer=inference_pb2.InferStreamResponse.FromString,
        )
        replies = []
        with pytest.raises(grpc.RpcError) as caught:
            replies.extend(call(iter([good.SerializeToString(), b"\xff\xff\xff\xff\x0f"]), timeout=30))
    assert [reply.response.request_id for reply in replies] == ["good"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("adapter", ["café", "a\x00b", "line\nbreak"])
def test_the_client_refuses_an_adapter_id_metadata_cannot_carry(client: Client, adapter: str) -> None:
    error = _refused(lambda: client.infer("demo", {"input_ids": IDS}, adapter=adapter))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid name: use printable ASCII" in error.message


def test_duplicate_and_empty_stream_request_ids_are_refused_in_band(worker: Worker) -> None:
    def request(request_id: str) -> inference_pb2.InferRequest:
        message = inference_pb2.InferRequest(model="demo", request_id=request_id)
        message.inputs.add(
            name="input_ids", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1, 4], data=IDS.tobytes()
        )
        return message

    messages = [request("dup") for _ in range(64)] + [request(""), request("last")]
    with grpc.insecure_channel(worker.address) as channel:
        replies = list(
            inference_pb2_grpc.InferenceServiceStub(channel).InferStream(iter(messages), timeout=60)
        )
    assert len(replies) == len(messages)  # every request answered, the stream went on
    errors = [reply.error for reply in replies if reply.WhichOneof("result") == "error"]
    answered = [reply.response.request_id for reply in replies if reply.WhichOneof("result") == "response"]
    assert "last" in answered and answered.count("dup") >= 1
    assert all(error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for error in errors)
    assert any("request_id 'dup' is already in flight on this stream" in error.message for error in errors)
    assert any("has no request_id" in error.message for error in errors)


# -- paths ----------------------------------------------------------------------------------------


def test_a_symlinked_file_outside_the_worker_paths_is_permission_denied(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    source = write_peft(outside / "real", rank=2, alpha=2.0, seed=1)
    adapter = allowed / "adapter"
    adapter.mkdir(parents=True)
    shutil.copy(source / "adapter_config.json", adapter / "adapter_config.json")
    os.symlink(source / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    running = start_worker(worker_settings(tmp_path / "data", "--worker-path", str(allowed)))
    try:
        with Client(running.address, timeout=30) as client:
            error = _refused(lambda: client.register_adapter_from_path("demo", "linked", str(adapter)))
            assert client.list_adapters("demo") == []
    finally:
        running.stop(0)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "outside the directories this worker reads from (worker_paths)" in error.message


def test_invalid_argument_is_what_an_undecodable_message_raises() -> None:
    """The interceptor's refusal is an ortmux error, so the one status table maps it."""
    from ortmux.worker.api import interceptors

    with pytest.raises(InvalidArgument):
        interceptors._decoded(interceptors._Undecodable(ValueError("truncated")))
