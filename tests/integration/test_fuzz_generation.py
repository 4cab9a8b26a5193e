"""Property-based fuzzing of generation on a real worker serving a decoder with an adapter: random
and malformed native Generate requests and Triton LLM protocol requests (text_input,
sampling_parameters as JSON with strings for numbers) get deliberate statuses (never UNKNOWN or
INTERNAL), and the worker goes on generating."""

from __future__ import annotations

import collections
import json
import shutil
from collections.abc import Callable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ortmux.client import Client
from ortmux.v1 import inference_pb2, inference_pb2_grpc
from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.api.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import worker_settings
from .generation_cases import FIXTURES, generations_kv_bytes

FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
EXAMPLES = 150
CASES = {"native": 0, "triton": 0}
CODES: collections.Counter[str] = collections.Counter()
TIMEOUT = 30

names = st.sampled_from(["qwen2", "qwen2-lora0", "", "..", "../../x", "a/b", "x" * 300]) | st.text(
    max_size=20
)
adapters = st.sampled_from(["", "qwen2-lora0", "nope", "../up", "x" * 200]) | st.text(max_size=12)
small = st.integers(min_value=0, max_value=4)
numbers = (
    st.floats(allow_nan=True, allow_infinity=True, width=32)
    | st.integers(min_value=-(2**31), max_value=2**31 - 1)
    | st.sampled_from([0.0, 1.0, 0.5, -1.0])
)
stops = st.lists(st.text(max_size=300) | st.sampled_from(["", "\x00", "s" * 257]), max_size=20)
token_ids = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(0, 400), max_size=80)


@st.composite
def native_requests(draw: st.DrawFn) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=draw(st.sampled_from(["qwen2"]) | names),
        adapter=draw(adapters),
        max_new_tokens=draw(small | st.integers(min_value=0, max_value=2**32 - 1)),
        temperature=draw(st.floats(width=32)),
        top_k=draw(st.integers(min_value=-(2**31), max_value=2**31 - 1) | small),
        stop=draw(stops),
        stop_token_ids=draw(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=20)),
        priority=draw(st.integers(min_value=-(2**31), max_value=2**31 - 1)),
        request_id=draw(st.text(max_size=300)),
    )
    if draw(st.booleans()):
        request.top_p = draw(st.floats(width=32))
    if draw(st.booleans()):
        request.seed = draw(st.integers(min_value=0, max_value=2**64 - 1))
    which = draw(st.sampled_from(["prompt", "ids", "none"]))
    if which == "prompt":
        request.prompt = draw(st.text(max_size=200) | st.sampled_from(["", "hello", "\ud7ff" * 50]))
    elif which == "ids":
        request.input_ids.ids.extend(draw(token_ids))
    if request.max_new_tokens > 4 and draw(st.booleans()):
        request.max_new_tokens = 4  # most valid requests stay short
    return request


json_values = st.recursive(
    st.none()
    | st.booleans()
    | numbers
    | st.text(max_size=10)
    | st.sampled_from(["1e400", "nan", "-inf", "3"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
SAMPLING_KEYS = [
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "seed",
    "stop",
    "stop_token_ids",
    "lora_name",
    "ignore_eos",
    "n",
    "best_of",
    "presence_penalty",
    "unknown_key",
]


@st.composite
def triton_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name=draw(st.sampled_from(["qwen2"]) | names), id=draw(st.text(max_size=40))
    )
    prompt = request.inputs.add(name="text_input", datatype=draw(st.sampled_from(["BYTES", "INT64", ""])))
    prompt.shape.extend(draw(st.sampled_from([[1], [2], [], [1, 1]])))
    prompt.contents.bytes_contents.extend(
        draw(st.lists(st.binary(max_size=40) | st.just(b"hello"), max_size=2))
    )
    if draw(st.booleans()):
        sampling = draw(st.dictionaries(st.sampled_from(SAMPLING_KEYS), json_values, max_size=5))
        if "max_tokens" not in sampling:
            sampling["max_tokens"] = 2
        raw = draw(st.sampled_from([json.dumps(sampling).encode(), b"{not json", b"\xff\xfe", b"[]"]))
        parameters = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        parameters.contents.bytes_contents.append(raw)
    for flag in draw(st.lists(st.sampled_from(["stream", "exclude_input_in_output", "bogus"]), max_size=2)):
        tensor = request.inputs.add(name=flag, datatype=draw(st.sampled_from(["BOOL", "BYTES"])), shape=[1])
        tensor.contents.bool_contents.append(draw(st.booleans()))
    if draw(st.booleans()):
        request.parameters["lora_name"].string_param = draw(adapters)
    return request


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, grpc.Channel]]:
    root = tmp_path_factory.mktemp("fuzz-generation")
    shutil.copytree(FIXTURES / "qwen2", root / "qwen2")
    running = start_worker(
        worker_settings(root / "data", "--model", f"qwen2={root / 'qwen2' / 'model.onnx'}")
    )
    with Client(running.address, timeout=60) as client:
        client.register_adapter("qwen2", "qwen2-lora0", FIXTURES / "qwen2-lora0")
    channel = grpc.insecure_channel(running.address)
    yield running, channel
    channel.close()
    running.stop(0)
    print(f"\ngeneration fuzz cases run: {CASES}; statuses: {dict(CODES)}")


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        assert error.code() not in FORBIDDEN, error.details()
        CODES[error.code().name] += 1
        return error.code()
    CODES["OK"] += 1
    return grpc.StatusCode.OK


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=native_requests())
def test_fuzzed_generate_requests_get_deliberate_statuses(
    fuzzed: tuple[Worker, grpc.Channel], request: inference_pb2.GenerateRequest
) -> None:
    _worker, channel = fuzzed
    CASES["native"] += 1
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    _code(lambda: list(stub.Generate(request, timeout=TIMEOUT)))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=triton_requests())
def test_fuzzed_triton_llm_requests_get_deliberate_statuses(
    fuzzed: tuple[Worker, grpc.Channel], request: oip.ModelInferRequest
) -> None:
    _worker, channel = fuzzed
    CASES["triton"] += 1
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    if any(tensor.name == "stream" for tensor in request.inputs):
        replies: list[oip.ModelStreamInferResponse] = []
        _code(lambda: replies.extend(stub.ModelStreamInfer(iter([request]), timeout=TIMEOUT)))
        for reply in replies:  # a stream's errors come in its responses
            assert not reply.error_message.startswith(("INTERNAL", "UNKNOWN")), reply.error_message
    else:
        _code(lambda: stub.ModelInfer(request, timeout=TIMEOUT))


def test_the_worker_still_generates_after_the_fuzzing(fuzzed: tuple[Worker, grpc.Channel]) -> None:
    worker, _channel = fuzzed
    with Client(worker.address, timeout=60) as client:
        for adapter in ("", "qwen2-lora0"):
            chunks = list(client.generate("qwen2", prompt="hello", adapter=adapter, max_new_tokens=3))
            assert sum(len(chunk.token_ids) for chunk in chunks) == 3
    assert sum(CASES.values()) >= EXAMPLES  # the properties ran
    assert generations_kv_bytes(worker) == 0  # every generation gave its KV back
