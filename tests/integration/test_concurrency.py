"""More open generations and streams than any thread pool of the worker, on a real worker: every
generation completes with the reference tokens, and health, ListModels and adapter listings keep
answering while they are open (an open stream holds no thread)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ortmux.client import AsyncClient, Client, InferRequest
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import worker_settings
from .generation_cases import FIXTURES, NEW, prompt_ids, reference

STREAMS = 200
WORKERS = 4  # the worker's request executor: far fewer threads than open calls


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    running = start_worker(
        worker_settings(
            tmp_path_factory.mktemp("crowded"),
            "--model",
            f"gpt2={FIXTURES / 'gpt2' / 'model.onnx'}",
            "--grpc-workers",
            str(WORKERS),
        )
    )
    yield running
    running.stop(0)


class Probe:
    """Health checks and ListModels, one after the other on a thread of their own, each with a
    1 s deadline, while ``running`` is set; their latencies and failures."""

    def __init__(self, worker: Worker) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.running = threading.Event()
        self._worker = worker
        self._thread = threading.Thread(target=self._probe)

    def __enter__(self) -> Probe:
        self.running.set()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.running.clear()
        self._thread.join(30)

    def _probe(self) -> None:
        with grpc.insecure_channel(self._worker.address) as channel, Client(self._worker.address) as client:
            health = health_pb2_grpc.HealthStub(channel)
            while self.running.is_set():
                for call in (
                    lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1),
                    lambda: client.list_models(timeout=1),
                    lambda: client.list_adapters("gpt2", timeout=1),
                ):
                    started = time.perf_counter()
                    try:
                        call()
                    except Exception as exc:  # reported by the test
                        self.failures.append(repr(exc))
                    self.latencies.append(time.perf_counter() - started)
                time.sleep(0.02)


def test_more_open_generations_than_threads_all_complete_while_health_answers(crowded: Worker) -> None:
    cases = [number % 4 for number in range(STREAMS)]

    async def generate_all() -> list[list[int]]:
        async with AsyncClient(crowded.address, timeout=300) as client:

            async def one(number: int) -> list[int]:
                return [
                    token
                    async for chunk in client.generate(
                        "gpt2", input_ids=prompt_ids(number), max_new_tokens=NEW
                    )
                    for token in chunk.token_ids
                ]

            return await asyncio.gather(*(one(number) for number in cases))

    with Probe(crowded) as probe:
        results = asyncio.run(generate_all())
    wrong = [
        n
        for n, (got, case) in enumerate(zip(results, cases, strict=True))
        if got != reference("gpt2", "base", case)
    ]
    assert len(results) == STREAMS and not wrong, wrong[:5]
    assert not probe.failures, probe.failures[:3]
    assert len(probe.latencies) >= 3
    print(
        f"\n{STREAMS} generations on {WORKERS} request threads: health/ListModels/ListAdapters "
        f"median {statistics.median(probe.latencies) * 1000:.1f} ms, max {max(probe.latencies) * 1000:.1f} ms"
    )


def test_open_streams_that_send_nothing_hold_no_thread(crowded: Worker) -> None:
    """More idle InferStreams than threads: probes and a request on a further stream are answered."""
    release = threading.Event()
    ended: list[int] = []

    def nothing() -> Iterator[InferRequest]:
        release.wait(30)
        return
        yield

    with Client(crowded.address, timeout=60) as client:
        readers = [
            threading.Thread(target=lambda: ended.append(len(list(client.stream_infer(nothing())))))
            for _ in range(3 * WORKERS)
        ]
        for reader in readers:
            reader.start()
        time.sleep(0.5)
        with Probe(crowded) as probe:
            time.sleep(0.5)
        answers = list(
            client.stream_infer([InferRequest("gpt2-none", {"input_ids": np.zeros((1, 1), np.int64)})])
        )
        release.set()
        for reader in readers:
            reader.join(30)
    assert not probe.failures, probe.failures[:3]
    assert len(answers) == 1 and not answers[0].ok  # answered (no such model), not stuck
    assert ended == [0] * (3 * WORKERS)  # the idle streams ended cleanly once their input did
