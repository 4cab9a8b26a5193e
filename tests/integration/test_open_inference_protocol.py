"""The Open Inference Protocol (KServe v2 / Triton gRPC) on the worker's port, through real gRPC
stubs of the protocol: names with adapters, every datatype both ways, streams, repository,
statistics, probes without keys, and a status for every wrong input."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest

from ortmux.client import Client
from ortmux.worker.api import oip_convert
from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.api.server import Worker

from .oip_models import ADMIN_KEY, IDS, TENANT_KEY, TYPES, sample, types_model

AUTH = (("authorization", f"Bearer {TENANT_KEY}"),)


def infer_request(model: str, ids: np.ndarray = IDS, **parameters: str) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="r")
    request.inputs.add(name="input_ids", datatype="INT64", shape=ids.shape)
    request.raw_input_contents.append(ids.tobytes())
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


def logits(response: oip.ModelInferResponse) -> np.ndarray:
    output = response.outputs[0]
    assert (output.name, output.datatype) == ("logits", "FP32")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(output.shape)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_adapters_by_name_and_by_lora_name_equal_the_native_client(oip_worker: Worker, stub) -> None:
    with Client(oip_worker.address, api_key=TENANT_KEY) as native:
        base = native.infer("demo", {"input_ids": IDS})["logits"]
        adapted = native.infer("demo", {"input_ids": IDS}, adapter="acme-a")["logits"]
    assert np.array_equal(logits(stub.ModelInfer(infer_request("demo"), metadata=AUTH)), base)
    by_name = stub.ModelInfer(infer_request("demo:acme-a"), metadata=AUTH)
    assert (by_name.model_name, by_name.id, by_name.model_version) == ("demo:acme-a", "r", "1")
    assert np.array_equal(logits(by_name), adapted)
    assert np.array_equal(
        logits(stub.ModelInfer(infer_request("demo", lora_name="acme-a"), metadata=AUTH)), adapted
    )
    assert np.array_equal(
        logits(stub.ModelInfer(infer_request("demo:acme-a", lora_name="acme-a"), metadata=AUTH)), adapted
    )
    assert not np.array_equal(adapted, base)


def test_every_datatype_goes_raw_and_typed_and_comes_back_raw(stub) -> None:
    raw = oip.ModelInferRequest(model_name="types")
    typed = oip.ModelInferRequest(model_name="typed")  # FP16 has no typed field: not in this model
    for datatype in TYPES:
        array = sample(datatype)
        raw.inputs.add(name=f"in_{datatype.lower()}", datatype=datatype, shape=array.shape)
        raw.raw_input_contents.append(array.tobytes())
        tensor = typed.inputs.add(name=f"in_{datatype.lower()}", datatype=datatype, shape=array.shape)
        field = oip_convert.TYPED_FIELD.get(datatype)
        if field is None:  # FP16: no typed field; such a request goes raw
            typed.inputs.pop()
            continue
        getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
    for request in (raw, typed):
        response = stub.ModelInfer(request, metadata=AUTH)
        outputs = {
            o.name: (o, data) for o, data in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        sent = {t.name.removeprefix("in_") for t in request.inputs}
        assert {name.removeprefix("out_") for name in outputs} == sent
        for datatype in TYPES:
            if datatype.lower() not in sent:
                continue
            output, data = outputs[f"out_{datatype.lower()}"]
            assert output.datatype == datatype and list(output.shape) == [2, 3]
            got = np.frombuffer(data, dtype=oip_convert.DTYPE_BY_DATATYPE[datatype].newbyteorder("<"))
            assert np.array_equal(got.reshape(2, 3), sample(datatype)), datatype
    # Requested outputs are honoured.
    raw.outputs.add(name="out_fp32")
    response = stub.ModelInfer(raw, metadata=AUTH)
    assert [o.name for o in response.outputs] == ["out_fp32"]


def test_bytes_and_bf16_decode_to_their_arrays() -> None:
    request = oip.ModelInferRequest(model_name="m")
    words = [b"ortmux", b"", "grüße".encode()]
    request.inputs.add(name="text", datatype="BYTES", shape=[3])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(w)) + w for w in words))
    halves = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    request.inputs.add(name="half", datatype="BF16", shape=[3])
    request.raw_input_contents.append(halves.tobytes())
    arrays = oip_convert.decode_inputs(request)
    assert arrays["text"].tolist() == words and arrays["text"].dtype == object
    assert arrays["half"].dtype.name == "bfloat16" and np.array_equal(arrays["half"], halves)
    assert oip_convert.encode_tensor(arrays["text"]) == request.raw_input_contents[0]
    typed = oip.ModelInferRequest(model_name="m")
    typed.inputs.add(name="text", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(words)
    assert oip_convert.decode_inputs(typed)["text"].tolist() == words


@pytest.mark.parametrize(
    ("mutate", "code", "text"),
    [
        (lambda r: setattr(r, "model_name", "nothing"), grpc.StatusCode.NOT_FOUND, "not served"),
        (
            lambda r: setattr(r, "model_name", "demo:nope"),
            grpc.StatusCode.NOT_FOUND,
            "'nope' is not registered",
        ),
        (
            lambda r: (
                r.parameters["lora_name"].CopyFrom(oip.InferParameter(string_param="other"))
                or setattr(r, "model_name", "demo:acme-a")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "give one of them",
        ),
        (lambda r: setattr(r, "model_name", ":acme-a"), grpc.StatusCode.INVALID_ARGUMENT, "no base model"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP8"), grpc.StatusCode.INVALID_ARGUMENT, "not one of"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT32"), grpc.StatusCode.INVALID_ARGUMENT, "raw bytes"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 3), grpc.StatusCode.INVALID_ARGUMENT, "needs 192"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -1), grpc.StatusCode.INVALID_ARGUMENT, "negative"),
        (lambda r: setattr(r.inputs[0], "name", "tokens"), grpc.StatusCode.INVALID_ARGUMENT, "tokens"),
        (
            lambda r: r.inputs[0].contents.int64_contents.append(1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "send every input one way",
        ),
        (
            lambda r: r.raw_input_contents.append(b"x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "2 entries for 1 inputs",
        ),
        (lambda r: r.outputs.add(name="nope"), grpc.StatusCode.INVALID_ARGUMENT, "nope"),
    ],
    ids=[
        "unknown-base",
        "unknown-adapter",
        "two-adapters",
        "no-base",
        "datatype",
        "wrong-datatype",
        "size",
        "negative",
        "input-name",
        "mixed",
        "raw-count",
        "output-name",
    ],
)
def test_wrong_requests_get_their_status_and_the_worker_keeps_serving(stub, mutate, code, text) -> None:
    request = infer_request("demo")
    mutate(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=AUTH)
    assert caught.value.code() == code and text in caught.value.details(), caught.value.details()
    assert logits(stub.ModelInfer(infer_request("demo"), metadata=AUTH)).shape == (2, 8, 1000)


def test_typed_contents_for_fp16_are_refused() -> None:
    request = oip.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(Exception, match="no typed contents"):
        oip_convert.decode_inputs(request)


def test_a_stream_answers_each_request_with_its_result_or_its_error(stub) -> None:
    requests = [
        infer_request("demo:acme-a"),
        infer_request("demo:nope"),
        infer_request("demo", lora_name="acme-a"),
    ]
    for index, request in enumerate(requests):
        request.id = f"s{index}"
    answers = {a.infer_response.id: a for a in stub.ModelStreamInfer(iter(requests), metadata=AUTH)}
    assert set(answers) == {"s0", "s1", "s2"}
    assert answers["s1"].error_message.startswith("NOT_FOUND") and not answers["s0"].error_message
    assert np.array_equal(logits(answers["s0"].infer_response), logits(answers["s2"].infer_response))
    assert answers["s0"].infer_response.model_name == "demo:acme-a"


def test_a_stream_that_repeats_a_request_id_echoes_the_model_name_on_every_answer(stub) -> None:
    requests = [infer_request("demo:acme-a") for _ in range(3)]
    for request in requests:
        request.id = "same"
    answers = list(stub.ModelStreamInfer(iter(requests), metadata=AUTH))
    assert [a.infer_response.id for a in answers] == ["same"] * 3
    assert [a.infer_response.model_name for a in answers] == ["demo:acme-a"] * 3


def test_probes_need_no_key_and_everything_else_does(stub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert (
        code_of(lambda: stub.ServerMetadata(oip.ServerMetadataRequest())) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(lambda: stub.ModelInfer(infer_request("demo"))) == grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer not-a-key"),)
    assert (
        code_of(lambda: stub.ModelInfer(infer_request("demo"), metadata=wrong))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest(), metadata=AUTH)
    assert metadata.name == "ortmux" and "model_repository" in metadata.extensions


def test_metadata_config_readiness_and_the_repository(stub) -> None:
    for name in ("demo", "demo:acme-a"):
        meta = stub.ModelMetadata(oip.ModelMetadataRequest(name=name), metadata=AUTH)
        assert meta.platform == "onnxruntime_onnx" and meta.versions == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("input_ids", "INT64", [-1, -1])
        ]
        config = stub.ModelConfig(oip.ModelConfigRequest(name=name), metadata=AUTH).config
        assert config.max_batch_size == 32 and config.backend == "onnxruntime"
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
            ("input_ids", oip.TYPE_INT64, [-1])
        ]
        assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [-1, 1000])]
        assert stub.ModelReady(oip.ModelReadyRequest(name=name), metadata=AUTH).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="demo:nope"), metadata=AUTH).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="nothing"), metadata=AUTH).ready
    assert code_of(lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name="demo:nope"), metadata=AUTH)) == (
        grpc.StatusCode.NOT_FOUND
    )
    index = stub.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=AUTH)
    assert {(m.name, m.state) for m in index.models} == {
        ("demo", "READY"),
        ("types", "READY"),
        ("typed", "READY"),
        ("faulty", "READY"),
        ("demo:acme-a", "READY"),
    }
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    assert "demo:acme-a" not in {
        m.name for m in stub.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=admin).models
    }


def test_repository_load_and_unload_are_for_admins(oip_worker: Worker, stub, tmp_path: Path) -> None:
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    path = types_model(tmp_path / "more.onnx")
    load = oip.RepositoryModelLoadRequest(model_name="more")
    load.parameters["path"].string_param = str(path)
    assert code_of(lambda: stub.RepositoryModelLoad(load, metadata=AUTH)) == grpc.StatusCode.PERMISSION_DENIED
    stub.RepositoryModelLoad(load, metadata=admin)
    assert stub.ModelReady(oip.ModelReadyRequest(name="more"), metadata=admin).ready
    stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="more"), metadata=admin)
    assert not stub.ModelReady(oip.ModelReadyRequest(name="more"), metadata=admin).ready
    missing = oip.RepositoryModelLoadRequest(model_name="more")
    assert (
        code_of(lambda: stub.RepositoryModelLoad(missing, metadata=admin)) == grpc.StatusCode.INVALID_ARGUMENT
    )
    missing.parameters["config"].string_param = '{"path": "/nowhere/model.onnx"}'
    assert code_of(lambda: stub.RepositoryModelLoad(missing, metadata=admin)) == grpc.StatusCode.NOT_FOUND


def test_statistics_count_what_the_model_served(stub) -> None:
    before = stub.ModelStatistics(oip.ModelStatisticsRequest(name="demo"), metadata=AUTH).model_stats[0]
    for _ in range(3):
        stub.ModelInfer(infer_request("demo"), metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("demo:nope"), metadata=AUTH)
    after = stub.ModelStatistics(oip.ModelStatisticsRequest(name="demo"), metadata=AUTH).model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_count - before.inference_count == 6  # rows
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference >= before.last_inference
    every = stub.ModelStatistics(oip.ModelStatisticsRequest(), metadata=AUTH)
    assert [entry.name for entry in every.model_stats] == ["demo", "faulty", "typed", "types"]


@pytest.mark.parametrize(
    "rpc", ["SystemSharedMemoryRegister", "CudaSharedMemoryStatus", "TraceSetting", "LogSettings"]
)
def test_unserved_triton_rpcs_are_unimplemented_by_name(oip_worker: Worker, rpc: str) -> None:
    with grpc.insecure_channel(oip_worker.address) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{rpc}")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"", metadata=AUTH)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED and rpc in caught.value.details()


def _loading_status(stub, tmp_path: Path) -> grpc.StatusCode:
    """The status of a request on a model while it loads (its first load optimizes it)."""
    import threading

    from ortmux.worker.demo import ensure_demo_model

    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    load = oip.RepositoryModelLoadRequest(model_name="later")
    load.parameters["path"].string_param = str(ensure_demo_model(tmp_path))
    loader = threading.Thread(target=lambda: stub.RepositoryModelLoad(load, metadata=admin))
    loader.start()
    try:
        while True:
            try:
                stub.ModelInfer(infer_request("later"), metadata=AUTH)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:  # not reserved yet
                    return error.code()
                continue
            return grpc.StatusCode.OK  # loaded before any request saw it loading
    finally:
        loader.join(60)
        stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="later"), metadata=admin)


def test_the_protocols_status_table(stub, tmp_path: Path) -> None:
    bad_name = infer_request("demo:acme-a", lora_name="other")
    bad_type = infer_request("demo")
    bad_type.inputs[0].datatype = "FP8"
    bad_shape = infer_request("demo")
    bad_shape.inputs[0].shape[0] = 5
    odd = oip.ModelInferRequest(model_name="faulty")
    odd.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    odd.raw_input_contents.append(np.ones(3, dtype="<f4").tobytes())
    rows = {
        "unknown base": (
            lambda: stub.ModelInfer(infer_request("nothing"), metadata=AUTH),
            grpc.StatusCode.NOT_FOUND,
        ),
        "unknown adapter": (
            lambda: stub.ModelInfer(infer_request("demo:nope"), metadata=AUTH),
            grpc.StatusCode.NOT_FOUND,
        ),
        "bad name": (lambda: stub.ModelInfer(bad_name, metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT),
        "bad datatype": (lambda: stub.ModelInfer(bad_type, metadata=AUTH), grpc.StatusCode.INVALID_ARGUMENT),
        "bad shape or size": (
            lambda: stub.ModelInfer(bad_shape, metadata=AUTH),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "a fault": (lambda: stub.ModelInfer(odd, metadata=AUTH), grpc.StatusCode.INTERNAL),
    }
    for row, (call, expected) in rows.items():
        assert code_of(call) == expected, row
    assert _loading_status(stub, tmp_path) == grpc.StatusCode.UNAVAILABLE
    # UNIMPLEMENTED: test_unserved_triton_rpcs_are_unimplemented_by_name.
