"""Property-based fuzzing of a real worker with random and malformed requests and uploads.

Every answer must be a deliberate status (never UNKNOWN or INTERNAL), the data dir must hold
nothing but whole adapters in their places, and the worker must still answer a valid request.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ortmux.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc, tensor_pb2
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.engine.memory import resident_bytes

from ..conftest import worker_settings

Fuzzed = tuple[Worker, Path, grpc.Channel]
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
EXAMPLES = 400
CASES = {"infer": 0, "stream": 0, "upload": 0, "ids": 0, "bytes": 0}
METHODS = [
    "/ortmux.v1.InferenceService/Infer",
    "/ortmux.v1.ModelService/GetModel",
    "/ortmux.v1.AdapterService/ListAdapters",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelMetadata",
]

names = st.one_of(
    st.sampled_from(["demo", "input_ids", "logits", "", "..", "../../etc/passwd", "a/b", "x" * 300]),
    st.text(max_size=40),
)
shapes = st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=5) | st.sampled_from(
    [[1, 8], [2, 4]]
)
tensors = st.builds(
    tensor_pb2.Tensor,
    name=names,
    dtype=st.integers(min_value=0, max_value=20),
    shape=shapes,
    data=st.binary(max_size=256) | st.sampled_from([np.arange(8, dtype=np.int64).tobytes()]),
)
infer_requests = st.builds(
    inference_pb2.InferRequest,
    model=names,
    adapter=names,
    inputs=st.lists(tensors, max_size=3),
    output_names=st.lists(names, max_size=3),
    request_id=names,
    priority=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)


def _archive(kind: str, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
            warnings.simplefilter("ignore")  # duplicate member names are part of the fuzzing
            for name, data in members:
                archive.writestr(name or "x", data)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for name, data in members:
                info = tarfile.TarInfo(name or "x")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


member_names = st.sampled_from(
    ["adapter_config.json", "adapter_model.safetensors", "../../escape", "/abs/path", "a/../../b", ".hidden"]
) | st.text(min_size=1, max_size=20)
config_json = st.builds(
    lambda r, modules, extra: json.dumps(
        {"peft_type": "LORA", "r": r, "target_modules": modules, **extra}
    ).encode(),
    st.integers(min_value=-2, max_value=1 << 20),
    st.lists(st.text(max_size=10), max_size=3),
    st.dictionaries(
        st.sampled_from(["use_dora", "bias", "lora_alpha", "fan_in_fan_out"]),
        st.integers() | st.text(max_size=5),
    ),
)
safetensors_like = st.builds(
    lambda header, body: len(header).to_bytes(8, "little") + header + body,
    st.binary(max_size=64)
    | st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=8), st.integers())),
    st.binary(max_size=128),
)
payloads = st.one_of(
    st.binary(max_size=512),
    safetensors_like,
    st.builds(
        _archive,
        st.sampled_from(["zip", "tar"]),
        st.lists(
            st.tuples(member_names, config_json | safetensors_like | st.binary(max_size=64)), max_size=4
        ),
    ),
)


@st.composite
def uploads(draw: st.DrawFn) -> list[adapters_pb2.RegisterAdapterRequest]:
    payload = draw(payloads)
    honest = draw(st.booleans())
    header = adapters_pb2.AdapterUploadHeader(
        model=draw(st.sampled_from(["demo", "nope", ""]) | names),
        adapter_id=draw(st.sampled_from(["ok-1", "../up", "a/b", "..", ".hidden", "x" * 200, ""]) | names),
        format=draw(st.integers(min_value=0, max_value=9)),
        total_bytes=len(payload) if honest else draw(st.integers(min_value=0, max_value=1 << 40)),
        sha256=hashlib.sha256(payload).hexdigest() if honest else draw(st.text(max_size=70)),
    )
    if draw(st.booleans()):
        header.files.extend(
            adapters_pb2.UploadFile(
                name=draw(member_names), size_bytes=draw(st.integers(min_value=0, max_value=1 << 33))
            )
            for _ in range(draw(st.integers(min_value=0, max_value=3)))
        )
    cut = draw(st.integers(min_value=1, max_value=max(1, len(payload))))
    chunks = [payload[i : i + cut] for i in range(0, len(payload), cut)]
    messages = (
        [adapters_pb2.RegisterAdapterRequest(header=header)] if draw(st.booleans()) or not chunks else []
    )
    messages += [adapters_pb2.RegisterAdapterRequest(chunk=chunk) for chunk in chunks]
    if draw(st.booleans()):
        messages.append(adapters_pb2.RegisterAdapterRequest(header=header))  # a second header
    return messages


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    data = tmp_path_factory.mktemp("fuzz-data")
    running = start_worker(worker_settings(data, "--max-adapter-bytes", "4096", "--max-upload-chunks", "64"))
    channel = grpc.insecure_channel(running.address)
    yield running, data, channel
    channel.close()
    running.stop(0)
    print(f"\nfuzz cases run: {CASES}")


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _assert_data_dir_clean(data: Path) -> None:
    adapters = data / "adapters"
    for path in adapters.rglob("*"):
        relative = path.relative_to(adapters).parts
        if relative[0] in (".staging", ".trash"):
            assert len(relative) == 1, f"left behind: {path}"
            continue
        # <model>/<tenant>/<id>/{payload,meta.json}, nothing else
        assert len(relative) <= 4, path
        if len(relative) == 4:
            assert relative[3] in ("payload", "meta.json"), path
    outside = {p.name for p in data.iterdir()} - {"adapters", "cache", "models"}
    assert not outside, outside


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=infer_requests, streamed=st.booleans())
def test_fuzzed_inference_requests_get_deliberate_statuses(
    fuzzed: Fuzzed, request: inference_pb2.InferRequest, streamed: bool
) -> None:
    _worker, _data, channel = fuzzed
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    if streamed:
        CASES["stream"] += 1
        request.request_id = "r"
        replies = []
        code = _code(lambda: replies.extend(stub.InferStream(iter([request, request]), timeout=20)))
        assert code not in FORBIDDEN
        for reply in replies:
            if reply.WhichOneof("result") == "error":
                assert reply.error.code not in {s.value[0] for s in FORBIDDEN}, reply.error.message
    else:
        CASES["infer"] += 1
        assert _code(lambda: stub.Infer(request, timeout=20)) not in FORBIDDEN


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(messages=uploads())
def test_fuzzed_uploads_get_deliberate_statuses_and_leave_no_files(
    fuzzed: Fuzzed, messages: list[adapters_pb2.RegisterAdapterRequest]
) -> None:
    _worker, data, channel = fuzzed
    CASES["upload"] += 1
    stub = adapters_pb2_grpc.AdapterServiceStub(channel)
    assert _code(lambda: stub.RegisterAdapter(iter(messages), timeout=20)) not in FORBIDDEN
    _assert_data_dir_clean(data)


@settings(
    max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(
    rows=st.integers(min_value=0, max_value=40),
    length=st.integers(min_value=0, max_value=5000),
    low=st.integers(min_value=-(1 << 62), max_value=1100),
    dtype=st.sampled_from([np.int64, np.int32]),
)
def test_fuzzed_token_ids_and_sizes_get_deliberate_statuses(
    fuzzed: Fuzzed, rows: int, length: int, low: int, dtype: type
) -> None:
    """Well-formed demo requests of any size and id range: served, or refused on the sequence,
    token or id bounds; never INTERNAL."""
    _worker, _data, channel = fuzzed
    CASES["ids"] += 1
    rng = np.random.default_rng(rows * 7919 + length)
    low = max(low, np.iinfo(dtype).min)
    high = min(low + 2000, np.iinfo(dtype).max)
    ids = rng.integers(low, high, size=(rows, length), dtype=dtype, endpoint=True)
    request = inference_pb2.InferRequest(model="demo")
    request.inputs.add(
        name="input_ids",
        dtype=tensor_pb2.DATA_TYPE_INT64 if dtype is np.int64 else tensor_pb2.DATA_TYPE_INT32,
        shape=list(ids.shape),
        data=ids.tobytes(),
    )
    code = _code(lambda: inference_pb2_grpc.InferenceServiceStub(channel).Infer(request, timeout=60))
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, code


@settings(
    max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=200))
def test_fuzzed_bytes_get_deliberate_statuses(fuzzed: Fuzzed, method: str, payload: bytes) -> None:
    _worker, _data, channel = fuzzed
    CASES["bytes"] += 1
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    assert _code(lambda: call(payload, timeout=20)) not in FORBIDDEN


def test_the_worker_still_serves_after_the_fuzzing(fuzzed: Fuzzed) -> None:
    _worker, data, channel = fuzzed
    request = inference_pb2.InferRequest(model="demo")
    request.inputs.add(
        name="input_ids",
        dtype=tensor_pb2.DATA_TYPE_INT64,
        shape=[1, 8],
        data=np.arange(8, dtype=np.int64).tobytes(),
    )
    reply = inference_pb2_grpc.InferenceServiceStub(channel).Infer(request, timeout=20)
    assert list(reply.outputs[0].shape) == [1, 8, 1000]
    _assert_data_dir_clean(data)
    assert sum(CASES.values()) >= EXAMPLES  # the properties ran
    assert resident_bytes() < 3 << 30  # the test process, worker included, stayed bounded
