"""tritonclient's side of bench/generation.py, run by it in a venv holding tritonclient[grpc]:
concurrent streams of generations over Triton's LLM protocol (``text_input`` on
``ModelStreamInfer``), each on its own adapter, against a running worker. Prints one JSON line:
tokens/s and the clients' time to first token and inter-token latency.

    python triton_generation_load.py ADDRESS MODEL JOBS.json STREAMS NEW_TOKENS
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

address, model, jobs_file, streams, new = (
    sys.argv[1],
    sys.argv[2],
    sys.argv[3],
    int(sys.argv[4]),
    int(sys.argv[5]),
)
pending = json.loads(Path(jobs_file).read_text())  # [[prompt text, adapter], ...]
lock = threading.Lock()
first: list[float] = []
gaps: list[float] = []
counts: list[int] = []


def inputs_of(prompt: str, adapter: str) -> list:
    sampling = json.dumps({"max_tokens": new, "temperature": 0, "lora_name": adapter})
    tensors = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("stream", "BOOL", np.array([True])),
        ("sampling_parameters", "BYTES", np.array([sampling.encode()], dtype=object)),
    ):
        tensor = triton.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def stream_worker() -> None:
    client = triton.InferenceServerClient(address)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    while True:
        with lock:
            if not pending:
                break
            prompt, adapter = pending.pop()
        started = time.perf_counter()
        times = []
        client.async_stream_infer(model, inputs_of(prompt, adapter))
        while True:
            result, error = answers.get(timeout=600)
            if error is not None:
                raise SystemExit(str(error))
            times.append(time.perf_counter())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        with lock:
            first.append(times[0] - started)
            gaps.extend(np.diff(times).tolist())
            counts.append(len(times))
    client.stop_stream()


threads = [threading.Thread(target=stream_worker) for _ in range(streams)]
began = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
wall = time.perf_counter() - began
print(
    json.dumps(
        {
            "tokens_per_second": sum(counts) / wall,
            "ttft_p50": float(np.percentile(first, 50)) * 1000,
            "ttft_p99": float(np.percentile(first, 99)) * 1000,
            "itl_p50": float(np.percentile(gaps, 50)) * 1000,
            "itl_p99": float(np.percentile(gaps, 99)) * 1000,
        }
    )
)
