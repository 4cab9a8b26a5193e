"""Dynamic batching through the real server: mixed adapters, queue limits, deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import scrape, worker_settings
from .test_peft_adapters import ADAPTER_BASES, EXPECTED, FIXTURES

BERT_ADAPTERS = sorted(a for a, b in ADAPTER_BASES.items() if b == "bert")


def _worker(data_dir: Path, *flags: str) -> Worker:
    running = start_worker(worker_settings(data_dir, "--model", f"bert={FIXTURES / 'bert.onnx'}", *flags))
    with Client(running.address) as client:
        for adapter in BERT_ADAPTERS:
            client.register_adapter("bert", adapter, FIXTURES / adapter)
    return running


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Worker]]:
    batched = _worker(
        tmp_path_factory.mktemp("batched"), "--max-batch-size", "64", "--max-queue-delay-ms", "30"
    )
    unbatched = _worker(tmp_path_factory.mktemp("unbatched"), "--max-batch-size", "1")
    yield batched, unbatched
    batched.stop(0)
    unbatched.stop(0)


def test_mixed_batches_equal_unbatched_results_for_every_request(workers: tuple[Worker, Worker]) -> None:
    batched, unbatched = workers
    rng = np.random.default_rng(0)
    plan = [(rng.integers(1, 100, size=(1 + i % 2, 7)), [None, *BERT_ADAPTERS][i % 3]) for i in range(24)]

    def run(worker: Worker) -> list[np.ndarray]:
        with Client(worker.address) as client, ThreadPoolExecutor(24) as pool:
            calls = [pool.submit(client.infer, "bert", {"input_ids": ids}, adapter) for ids, adapter in plan]
            return [call.result()["last_hidden_state"] for call in calls]

    before = batched.dataplane.batcher(batched.dataplane.get_model("bert")).counters.batches
    together = run(batched)
    alone = run(unbatched)
    counters = batched.dataplane.batcher(batched.dataplane.get_model("bert")).counters
    assert counters.batches - before < len(plan)  # requests really shared runs
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_array_equal(got, want)
    # and they are PEFT's results
    ids = EXPECTED["input_ids"]
    with Client(batched.address) as client, ThreadPoolExecutor(4) as pool:
        calls = {a: pool.submit(client.infer, "bert", {"input_ids": ids}, a) for a in BERT_ADAPTERS}
        for adapter, call in calls.items():
            got = call.result()["last_hidden_state"]
            assert np.abs(got - EXPECTED[adapter]).max() / np.abs(EXPECTED[adapter]).max() <= 1e-4


def test_a_bad_row_fails_alone_and_its_batch_mates_succeed(workers: tuple[Worker, Worker]) -> None:
    batched, _ = workers
    good = EXPECTED["input_ids"]
    bad = np.array([[5, 500, 7, 8, 9, 10, 11]], dtype=np.int64)  # id 500 is past the 100-word vocabulary
    with Client(batched.address) as client, ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(client.infer, "bert", {"input_ids": ids}) for ids in (good, bad, good, good)]
        assert calls[0].result()["last_hidden_state"].shape == (2, 7, 32)
        with pytest.raises(OrtmuxError) as caught:
            calls[1].result()
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [c.result()["last_hidden_state"].shape for c in calls[2:]] == [(2, 7, 32)] * 2


def test_full_queue_answers_resource_exhausted_at_once(tmp_path: Path) -> None:
    running = start_worker(
        worker_settings(
            tmp_path, "--max-queue-size", "1", "--max-batch-size", "64", "--max-queue-delay-ms", "1000"
        )
    )
    ids = {"input_ids": np.zeros((1, 3), np.int64)}
    try:
        with Client(running.address) as client:
            first = threading.Thread(target=client.infer, args=("demo", ids))
            first.start()
            batcher = running.dataplane.batcher(running.dataplane.get_model("demo"))
            deadline = time.monotonic() + 10
            while batcher.depth < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            started = time.monotonic()
            with pytest.raises(OrtmuxError) as caught:
                client.infer("demo", ids)
            assert time.monotonic() - started < 0.5  # refused at once, not after the batch delay
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.message == "the queue of model 'demo' is full (1 requests); retry shortly"
            assert caught.value.retry_after is not None and caught.value.retry_after > 0
            first.join(10)
            assert client.infer("demo", ids)["logits"].shape == (1, 3, 1000)  # recovered
        samples = scrape(running)
        assert samples[("ortmux_requests_dropped_total", (("model", "demo"), ("reason", "queue_full")))] == 1
    finally:
        running.stop(0)


def test_an_expired_request_never_runs(tmp_path: Path) -> None:
    running = start_worker(worker_settings(tmp_path, "--max-batch-size", "64", "--max-queue-delay-ms", "600"))
    ids = {"input_ids": np.zeros((1, 3), np.int64)}
    try:
        with Client(running.address) as client:
            with pytest.raises(OrtmuxError) as caught:
                client.infer("demo", ids, timeout=0.1)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            batcher = running.dataplane.batcher(running.dataplane.get_model("demo"))
            deadline = time.monotonic() + 5
            while batcher.counters.expired < 1:
                assert time.monotonic() < deadline, "the expired request was not dropped"
                time.sleep(0.01)
            assert batcher.counters.batches == 0  # nothing ran
    finally:
        running.stop(0)


def test_calls_past_the_concurrency_limit_are_refused(tmp_path: Path) -> None:
    running = start_worker(
        worker_settings(
            tmp_path, "--max-concurrent-rpcs", "2", "--max-batch-size", "64", "--max-queue-delay-ms", "800"
        )
    )
    ids = {"input_ids": np.zeros((1, 3), np.int64)}
    try:
        with Client(running.address) as client, ThreadPoolExecutor(3) as pool:
            held = [pool.submit(client.infer, "demo", ids) for _ in range(2)]
            batcher = running.dataplane.batcher(running.dataplane.get_model("demo"))
            deadline = time.monotonic() + 10
            while batcher.depth < 2:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            with pytest.raises(OrtmuxError) as caught:
                client.infer("demo", ids)
            assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert [call.result()["logits"].shape for call in held] == [(1, 3, 1000)] * 2
    finally:
        running.stop(0)


def test_the_client_priority_puts_a_request_ahead_of_those_queued(tmp_path: Path) -> None:
    """One row per run: a high-priority request sent after a queue of low-priority ones finishes
    before most of them."""
    running = start_worker(worker_settings(tmp_path, "--max-batch-size", "1"))
    try:
        with Client(running.address, timeout=120) as client:
            ids = np.ones((1, 2048), dtype=np.int64)
            client.infer("demo", {"input_ids": ids})  # warm
            order: list[str] = []
            lock = threading.Lock()

            def send(name: str, priority: int) -> None:
                client.infer("demo", {"input_ids": ids}, priority=priority)
                with lock:
                    order.append(name)

            low = [threading.Thread(target=send, args=(f"low{i}", 0)) for i in range(24)]
            for thread in low:
                thread.start()
            time.sleep(0.2)  # the low ones are queued behind the first run
            high = threading.Thread(target=send, args=("high", 7))
            high.start()
            for thread in [*low, high]:
                thread.join()
        assert order.index("high") < len(order) // 2, order
    finally:
        running.stop(0)
