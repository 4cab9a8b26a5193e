"""Hostile tenants on the generation surfaces, on a real worker with two tenants and all three
front ends (the native API, the Open Inference Protocol, the HTTP API): priority that orders a
tenant's own generations only, no busy wait while the KV pool is held, the worker's own deadline,
adapters that cannot replace request inputs, models that cannot bring the worker's own operators,
a broken chat template that stays its model's problem, ids checked on every lookup, and the same
per-request bounds whichever front end carries the request."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.inference_v2 import grpc_service_pb2 as oip
from ortmux.worker.api.inference_v2 import grpc_service_pb2_grpc as oip_grpc
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.auth import key_digest
from ortmux.worker.scheduler.decode_loop import DecodeLoop

from ..conftest import worker_settings
from .generation_cases import FIXTURES

ADMIN, ACME, RIVAL = "ops-secret-key", "acme-secret-key", "rival-secret-key"
BROKEN_TEMPLATE = "{% for message in messages %}{{ message['content'] }"  # never closed
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MAX_GENERATION_SECONDS = 2.0


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("hostile-tenants")
    models = []
    for name, template in (("qwen2", TEMPLATE), ("broken", BROKEN_TEMPLATE)):
        shutil.copytree(FIXTURES / "qwen2", root / name)
        (root / name / "chat_template.jinja").write_text(template)
        models += ["--model", f"{name}={root / name / 'model.onnx'}"]
    keys = root / "keys.toml"
    keys.write_text(
        "".join(
            f'[[key]]\nsha256 = "{key_digest(key)}"\ntenant = "{tenant}"\nrole = "{role}"\n\n'
            for key, tenant, role in (
                (ADMIN, "ops", "admin"),
                (ACME, "acme", "tenant"),
                (RIVAL, "rival", "tenant"),
            )
        )
    )
    settings = worker_settings(
        root / "data",
        *models,
        "--api-keys-file",
        str(keys),
        "--http-port",
        "0",
        "--max-running-sequences",
        "1",
        "--max-generation-seconds",
        str(MAX_GENERATION_SECONDS),
    )
    running = start_worker(settings)
    yield running
    running.stop(0)


def client(worker: Worker, key: str = ACME) -> Client:
    return Client(worker.address, timeout=60, api_key=key)


def loop_of(worker: Worker, model: str) -> DecodeLoop:
    return next(loop for loop in worker.dataplane.generation.loops() if loop.name == model)


@contextmanager
def kv_held(worker: Worker) -> Iterator[None]:
    """All the KV pool taken, as another model's long generations would hold it."""
    kv = worker.dataplane.generation.kv
    held = kv.limit_bytes - kv.reserved_bytes
    assert kv.reserve(held)
    try:
        yield
    finally:
        kv.release(held)


def wait_for(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """User + system CPU time of one thread of this process, from /proc."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http(worker: Worker, path: str, body: dict | None = None, key: str = ACME) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{worker.http_port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def triton_llm(
    worker: Worker, model: str, prompt: str, sampling: dict, key: str = ACME
) -> oip.ModelInferResponse:
    """A generation through Triton's LLM protocol on the Open Inference Protocol."""
    request = oip.ModelInferRequest(model_name=model, id="t")
    for name, value in (("text_input", prompt), ("sampling_parameters", json.dumps(sampling))):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(value.encode())
    with grpc.insecure_channel(worker.address) as channel:
        return oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=60, metadata=[("authorization", f"Bearer {key}")]
        )


def triton_error(worker: Worker, model: str, prompt: str, sampling: dict) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        triton_llm(worker, model, prompt, sampling)
    return caught.value


# -- scheduling ----------------------------------------------------------------------------------


def test_priority_orders_a_tenants_own_generations_never_one_tenant_against_another(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client(worker) as warm:  # the model's loop exists before the pool is taken
        list(warm.generate("qwen2", prompt="hello", max_new_tokens=1))
    loop = loop_of(worker, "qwen2")
    labels = {3: "acme0", 4: "acme1", 5: "acme2", 6: "rival"}  # told apart by their lengths
    admitted: list[str] = []  # the order the scheduler admits them in (one sequence runs at a time)
    admit = loop.scheduler.admit

    def recorded() -> list:
        jobs = admit()
        admitted.extend(labels[job.max_new_tokens] for job in jobs)
        return jobs

    monkeypatch.setattr(loop.scheduler, "admit", recorded)

    def generate(key: str, new: int, priority: int) -> None:
        with client(worker, key) as connected:
            list(connected.generate("qwen2", prompt="hello", max_new_tokens=new, priority=priority))

    threads = []
    with kv_held(worker):
        for number in range(3):  # acme marks every generation urgent
            threads.append(threading.Thread(target=generate, args=(ACME, 3 + number, 1000)))
            threads[-1].start()
            wait_for(lambda n=number: loop.waiting == n + 1, "acme's generations never queued")
        threads.append(threading.Thread(target=generate, args=(RIVAL, 6, 0)))
        threads[-1].start()
        wait_for(lambda: loop.waiting == 4, "rival's generation never queued")
    for thread in threads:
        thread.join(60)
    # tenants in turn: rival's runs second, not after all of acme's
    assert admitted == ["acme0", "rival", "acme1", "acme2"]


def test_a_loop_whose_generations_wait_for_kv_room_sleeps_until_room_is_given_back(worker: Worker) -> None:
    with client(worker) as connected:
        list(connected.generate("qwen2", prompt="hello", max_new_tokens=1))
        loop = loop_of(worker, "qwen2")
        got: list[int] = []
        with kv_held(worker):
            waiting = threading.Thread(
                target=lambda: got.extend(
                    len(c.token_ids) for c in connected.generate("qwen2", prompt="hi", max_new_tokens=4)
                )
            )
            waiting.start()
            wait_for(lambda: loop.waiting == 1, "the generation never queued")
            before = thread_cpu_seconds(loop._thread)
            time.sleep(1.0)
            spent = thread_cpu_seconds(loop._thread) - before
        waiting.join(30)
    # a loop polling for room spins a whole core; a sleeping one wakes ten times a second
    assert spent < 0.2, f"the decode loop spent {spent:.2f} s of CPU in 1 s waiting for KV room"
    assert got == [1, 1, 1, 1]  # room given back: it ran at once


def test_the_worker_bounds_every_generation_whichever_front_end_sent_it(worker: Worker) -> None:
    with kv_held(worker), client(worker) as connected:
        started = time.monotonic()
        with pytest.raises(OrtmuxError) as native:
            list(connected.generate("qwen2", prompt="hello", max_new_tokens=4, timeout=None))
        waited = time.monotonic() - started
        status, body = http(worker, "/v1/completions", {"model": "qwen2", "prompt": "hello", "max_tokens": 4})
    assert native.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, native.value
    assert MAX_GENERATION_SECONDS - 0.1 <= waited < MAX_GENERATION_SECONDS + 10
    assert status == 504 and "deadline" in body["error"]["message"], body


# -- what tenants may bring ------------------------------------------------------------------------


def test_an_onnx_adapter_cannot_replace_the_inputs_requests_give(worker: Worker, tmp_path: Path) -> None:
    with client(worker) as connected:
        names = [spec.name for spec in connected.model_info("qwen2").inputs]
        past = next(name for name in names if name.startswith("past_key_values"))
        for name, value in (
            ("input_ids", np.zeros((1, 1), np.int64)),
            ("attention_mask", np.ones((1, 70), np.int64)),
            (past, np.zeros((1, 2, 0, 16), np.float32)),
        ):
            adapter = ort.AdapterFormat()
            adapter.set_adapter_version(1)
            adapter.set_model_version(1)
            adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value)})
            path = tmp_path / f"{name}.onnx_adapter"
            adapter.export_adapter(str(path))
            with pytest.raises(OrtmuxError) as caught:
                connected.register_adapter("qwen2", "sneaky", path)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert f"adapter tensor '{name}' is an input of model 'qwen2'" in caught.value.message
        assert connected.list_adapters("qwen2") == []


def _own_domain_model(path: Path) -> Path:
    """A graph holding the worker's own LoraBranch operator with its address table as an input."""
    node = helper.make_node("LoraBranch", ["x", "x", "table"], ["y"], domain="ortmux")
    graph = helper.make_graph(
        [node],
        "reads-anything",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("table", TensorProto.INT64, [1, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ortmux", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_model_holding_the_workers_own_operators_is_refused_at_load(worker: Worker, tmp_path: Path) -> None:
    with client(worker, ADMIN) as admin:
        with pytest.raises(OrtmuxError) as caught:
            admin.load_model("evil", str(_own_domain_model(tmp_path / "evil.onnx")))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert "operator domain 'ortmux', which is the worker's own" in caught.value.message
        assert "evil" not in [model.name for model in admin.list_models()]
        assert len(list(admin.generate("qwen2", prompt="hello", max_new_tokens=2))) == 2


def test_a_chat_template_that_does_not_compile_is_its_models_problem_alone(worker: Worker) -> None:
    status, listed = http(worker, "/v1/models")
    assert status == 200, listed
    assert {"qwen2", "broken"} <= {entry["id"] for entry in listed["data"]}
    messages = [{"role": "user", "content": "hello"}]
    status, body = http(
        worker, "/v1/chat/completions", {"model": "broken", "messages": messages, "max_tokens": 2}
    )
    assert status == 400 and "chat template does not compile" in body["error"]["message"], body
    status, body = http(worker, "/v1/completions", {"model": "broken", "prompt": "hello", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body
    status, body = http(
        worker, "/v1/chat/completions", {"model": "qwen2", "messages": messages, "max_tokens": 2}
    )
    assert status == 200, body
    with client(worker) as connected:
        assert {"qwen2", "broken"} <= {model.name for model in connected.list_models()}


# -- bounds every front end shares -----------------------------------------------------------------

BAD_IDS = ["../../etc/passwd", "a/b", "-dash-first", "x" * 129, "sp ace"]


@pytest.mark.parametrize("adapter_id", BAD_IDS)
def test_adapter_ids_are_checked_on_every_lookup(worker: Worker, adapter_id: str) -> None:
    with client(worker) as connected:
        for call in (
            lambda: list(connected.generate("qwen2", prompt="hi", adapter=adapter_id, max_new_tokens=1)),
            lambda: connected.get_adapter("qwen2", adapter_id),
            lambda: connected.delete_adapter("qwen2", adapter_id),
        ):
            with pytest.raises(OrtmuxError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert "is invalid: use 1-128 letters" in caught.value.message
    body = {"model": f"qwen2:{adapter_id}", "prompt": "hi", "max_tokens": 1}
    status, answer = http(worker, "/v1/completions", body)
    assert status == 400 and "is invalid" in answer["error"]["message"], answer
    error = triton_error(worker, "qwen2", "hi", {"max_tokens": 1, "lora_name": adapter_id})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error


def test_stop_strings_are_bounded_on_every_front_end(worker: Worker) -> None:
    long_stop = "s" * 257
    with client(worker) as connected, pytest.raises(OrtmuxError) as native:
        list(connected.generate("qwen2", prompt="hi", stop=[long_stop], max_new_tokens=1))
    assert native.value.code == grpc.StatusCode.INVALID_ARGUMENT
    status, body = http(worker, "/v1/completions", {"model": "qwen2", "prompt": "hi", "stop": [long_stop]})
    assert status == 400 and "longer than 256 characters" in body["error"]["message"], body
    error = triton_error(worker, "qwen2", "hi", {"max_tokens": 1, "stop": [long_stop]})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "longer than 256" in error.details()
    many = [f"stop{i}" for i in range(17)]
    status, body = http(worker, "/v1/completions", {"model": "qwen2", "prompt": "hi", "stop": many})
    assert status == 400 and "at most 16 stop strings" in body["error"]["message"], body
    long_name = "m" * 300
    status, body = http(worker, "/v1/completions", {"model": long_name, "prompt": "hi", "max_tokens": 1})
    assert status == 400 and "over the limit of 256" in body["error"]["message"], body
    for bad in ({"max_tokens": "1e400"}, {"stop_token_ids": ["x"]}, {"stop_token_ids": 5}):
        error = triton_error(worker, "qwen2", "hi", bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad, error)
    assert triton_llm(worker, "qwen2", "hi", {"max_tokens": 2}).outputs
