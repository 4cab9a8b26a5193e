"""InferStream and the client's stream_infer / infer_batch, through real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import AsyncClient, Client, InferRequest, InferResult, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import worker_settings
from ..demo_adapters import write_peft


def _inputs(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"input_ids": rng.integers(0, 1000, size=(1 + index % 3, 4 + index % 5), dtype=np.int64)}
        for index in range(count)
    ]


@pytest.fixture(scope="module")
def lora_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    data = tmp_path_factory.mktemp("stream-data")
    running = start_worker(worker_settings(data, "--stream-window", "8"))
    with Client(running.address) as client:
        for seed in range(3):
            client.register_adapter(
                "demo", f"lora-{seed}", write_peft(data.parent / f"peft-{seed}", seed=seed)
            )
    yield running
    running.stop(0)


def test_streamed_results_equal_unary_results_in_any_order(lora_worker: Worker) -> None:
    inputs = _inputs(40)
    adapters = [None, "lora-0", "lora-1", "lora-2"]
    requests = [
        InferRequest("demo", item, adapter=adapters[index % 4], request_id=f"r{index}")
        for index, item in enumerate(inputs)
    ]
    with Client(lora_worker.address) as client:
        streamed = {result.request_id: result for result in client.stream_infer(requests, window=16)}
        assert sorted(streamed) == sorted(request.request_id for request in requests)
        for request in requests:
            expected = client.infer("demo", request.inputs, adapter=request.adapter)
            result = streamed[request.request_id]
            assert result.ok and result.error is None
            np.testing.assert_array_equal(result.unwrap()["logits"], expected["logits"])


def test_ordered_mode_yields_in_input_order_and_ids_default_to_positions(lora_worker: Worker) -> None:
    inputs = _inputs(30, seed=1)
    with Client(lora_worker.address) as client:
        results = list(client.stream_infer((InferRequest("demo", x) for x in inputs), window=5, ordered=True))
        batch = client.infer_batch("demo", inputs, adapter="lora-1")
        expected = [client.infer("demo", x, adapter="lora-1")["logits"] for x in inputs]
    assert [result.request_id for result in results] == [str(index) for index in range(30)]
    assert all(result.ok for result in results)
    for got, want in zip(batch, expected, strict=True):
        np.testing.assert_array_equal(got["logits"], want)


def test_a_bad_request_mid_stream_gets_its_own_error_and_the_others_succeed(lora_worker: Worker) -> None:
    good = _inputs(6, seed=2)
    requests = [InferRequest("demo", item) for item in good[:2]]
    requests += [
        InferRequest(
            "demo", {"input_ids": good[2]["input_ids"].astype(np.float32)}, request_id="wrong-dtype"
        ),
        InferRequest("nope", good[3], request_id="unknown-model"),
        InferRequest("demo", good[3], adapter="ghost", request_id="unknown-adapter"),
        InferRequest("demo", {"input_ids": np.array([["a"]], dtype=object)}, request_id="unencodable"),
    ]
    requests += [InferRequest("demo", item) for item in good[4:]]
    with Client(lora_worker.address) as client:
        results = list(client.stream_infer(requests, ordered=True))
        with pytest.raises(OrtmuxError) as caught:
            client.infer_batch("demo", [good[0], {"input_ids": good[1]["input_ids"].astype(np.int32)}])
    codes = {result.request_id: result.error.code if result.error else None for result in results}
    assert codes == {
        "0": None,
        "1": None,
        "wrong-dtype": grpc.StatusCode.INVALID_ARGUMENT,
        "unknown-model": grpc.StatusCode.NOT_FOUND,
        "unknown-adapter": grpc.StatusCode.NOT_FOUND,
        "unencodable": grpc.StatusCode.INVALID_ARGUMENT,
        "6": None,
        "7": None,
    }
    wrong = next(result for result in results if result.request_id == "wrong-dtype").error
    assert wrong is not None and [v.field for v in wrong.field_violations] == ["inputs[input_ids]"]
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_raise_errors_raises_the_first_failed_request(lora_worker: Worker) -> None:
    requests = [InferRequest("demo", _inputs(1)[0]), InferRequest("nope", _inputs(1)[0])]
    with Client(lora_worker.address) as client, pytest.raises(OrtmuxError) as caught:
        list(client.stream_infer(requests, ordered=True, raise_errors=True))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_cancelling_a_stream_drops_its_queued_requests(tmp_path: Path) -> None:
    running = start_worker(worker_settings(tmp_path, "--max-batch-size", "1", "--stream-window", "512"))
    try:
        heavy = {"input_ids": np.ones((8, 256), dtype=np.int64)}
        with Client(running.address) as client:
            stream = client.stream_infer((InferRequest("demo", heavy) for _ in range(400)), window=400)
            assert next(stream).ok
            stream.close()  # cancels the call
        (batcher,) = running.dataplane.batchers()
        deadline = time.monotonic() + 10
        while batcher.counters.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.counters.cancelled > 0
        assert batcher.counters.batches < 400
    finally:
        running.stop(0)


def test_async_client_streams_from_an_async_iterable(lora_worker: Worker) -> None:
    inputs = _inputs(12, seed=3)

    async def produce() -> AsyncIterator[InferRequest]:
        for index, item in enumerate(inputs):
            await asyncio.sleep(0)
            yield InferRequest("demo", item, adapter="lora-2", request_id=f"a{index}")

    async def scenario() -> tuple[list[InferResult], list[dict[str, np.ndarray]]]:
        async with AsyncClient(lora_worker.address) as client:
            results = [result async for result in client.stream_infer(produce(), window=4, ordered=True)]
            batch = await client.infer_batch("demo", inputs[:3])
            return results, batch

    results, batch = asyncio.run(scenario())
    assert [result.request_id for result in results] == [f"a{index}" for index in range(12)]
    with Client(lora_worker.address) as client:
        for item, result in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(
                result.unwrap()["logits"], client.infer("demo", item, adapter="lora-2")["logits"]
            )
        np.testing.assert_array_equal(batch[2]["logits"], client.infer("demo", inputs[2])["logits"])


def test_a_list_of_targets_spreads_calls_round_robin(tmp_path: Path) -> None:
    workers = [start_worker(worker_settings(tmp_path / str(index))) for index in range(2)]
    try:
        item = _inputs(1)[0]
        with Client([worker.address for worker in workers]) as client:
            for _ in range(20):
                client.infer("demo", item)
            list(client.stream_infer(InferRequest("demo", item) for _ in range(4)))
        served = [sum(b.counters.rows for b in worker.dataplane.batchers()) for worker in workers]
        assert all(rows > 0 for rows in served), served
    finally:
        for worker in workers:
            worker.stop(0)


def test_target_lists_must_be_host_and_port() -> None:
    with pytest.raises(ValueError, match="not host:port"):
        Client(["localhost"])
    with pytest.raises(ValueError, match="empty"):
        Client([])


def test_one_client_streams_from_many_threads_at_once(lora_worker: Worker) -> None:
    inputs = _inputs(10, seed=4)
    with Client(lora_worker.address) as client:
        expected = [client.infer("demo", item)["logits"] for item in inputs]

        def stream(adapter_index: int) -> list[np.ndarray]:
            results = client.stream_infer(
                (InferRequest("demo", item) for item in inputs), window=3, ordered=True
            )
            return [result.unwrap()["logits"] for result in results]

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(stream, range(4)))
    for outcome in outcomes:
        for got, want in zip(outcome, expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_stream_past_its_deadline_raises_deadline_exceeded(lora_worker: Worker) -> None:
    heavy = {"input_ids": np.ones((8, 256), dtype=np.int64)}
    with Client(lora_worker.address, stream_timeout=0.05) as client, pytest.raises(OrtmuxError) as caught:
        list(client.stream_infer(InferRequest("demo", heavy) for _ in range(500)))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with Client(lora_worker.address, stream_timeout=0.05) as client:  # a per-call timeout overrides it
        assert (
            len(list(client.stream_infer((InferRequest("demo", heavy) for _ in range(20)), timeout=60))) == 20
        )
