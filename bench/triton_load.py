"""tritonclient's side of bench/streaming.py, run by it in a venv holding tritonclient[grpc] (the
worker's packages stay out of that venv): requests/s of unary calls one at a time, from a
thread pool, and over Triton's stream, against a running worker.

    python triton_load.py ADDRESS MODEL VOCAB COUNT ROUNDS THREADS
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as triton

address, model = sys.argv[1], sys.argv[2]
vocab, count, rounds, threads = (int(value) for value in sys.argv[3:7])
rng = np.random.default_rng(0)
client = triton.InferenceServerClient(address)


def inputs_of(ids: np.ndarray) -> list:
    tensor = triton.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return [tensor]


requests = [inputs_of(rng.integers(0, vocab, (1, 8), dtype=np.int64)) for _ in range(count)]


def rate(run) -> float:
    run()
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def unary() -> None:
    for inputs in requests:
        client.infer(model, inputs).as_numpy("logits")


def pooled() -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda inputs: client.infer(model, inputs).as_numpy("logits"), requests))


def streamed() -> None:
    done = threading.Semaphore(0)
    failures: list[object] = []

    def answered(result, error) -> None:
        if error is not None:
            failures.append(error)
        else:
            result.as_numpy("logits")
        done.release()

    client.start_stream(answered)
    for index, inputs in enumerate(requests):
        client.async_stream_infer(model, inputs, request_id=str(index))
    for _ in requests:
        done.acquire()
    client.stop_stream()
    if failures:
        raise RuntimeError(failures[0])


print(
    json.dumps(
        {
            "tritonclient unary, one at a time": rate(unary),
            f"tritonclient unary, {threads} threads": rate(pooled),
            "tritonclient stream": rate(streamed),
        }
    )
)
