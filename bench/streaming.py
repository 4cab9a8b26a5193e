"""Requests/s through the client on loopback: unary calls, unary from a thread pool, and
stream_infer with several windows, against the same model run in-process with ONNX Runtime; and
the same calls from tritonclient over the Open Inference Protocol, against the same worker.

    python bench/streaming.py [--rounds 3] [--demo-requests 2000] [--bench-requests 160] [--no-triton]

tritonclient runs in a venv of its own under bench/out (made on first use: it pins protobuf < 7).

The worker runs in its own process (``ortmux serve``); the in-process figures come from this
process, timed while the worker is idle, with the same global thread pool a worker has. Every
request is 1 x 8 tokens. Each figure is the median of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, WorkerProcess, bench_model, median, table

WINDOWS = (1, 16, 128)
THREADS = 16
IN_PROCESS_BATCH = 32


def requests_per_second(run: Callable[[], None], count: int, rounds: int) -> float:
    run()  # warm-up, not timed
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - started))
    return median(rates)


def through_worker(address: str, model: str, inputs: list[dict], rounds: int) -> dict[str, float]:
    from ortmux.client import Client, InferRequest

    rates = {}
    with Client(address, timeout=120) as client:

        def unary() -> None:
            for item in inputs:
                client.infer(model, item)

        def pooled() -> None:
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(lambda item: client.infer(model, item), inputs))

        rates["unary, one at a time"] = requests_per_second(unary, len(inputs), rounds)
        rates[f"unary, {THREADS} threads"] = requests_per_second(pooled, len(inputs), rounds)
        for window in WINDOWS:

            def streamed(window: int = window) -> None:
                for result in client.stream_infer(
                    (InferRequest(model, item) for item in inputs), window=window
                ):
                    result.unwrap()

            rates[f"stream_infer, window {window}"] = requests_per_second(streamed, len(inputs), rounds)
    return rates


def in_process(path: Path, inputs: list[dict], rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    from ortmux.worker.engine.runtime import configure_process

    configure_process(0)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    stacked = [
        {
            "input_ids": np.concatenate(
                [item["input_ids"] for item in inputs[start : start + IN_PROCESS_BATCH]]
            )
        }
        for start in range(0, len(inputs), IN_PROCESS_BATCH)
    ]

    def one_by_one() -> None:
        for item in inputs:
            session.run(None, item)

    def batched() -> None:
        for item in stacked:
            session.run(None, item)

    return {
        "in-process ORT, one request per run": requests_per_second(one_by_one, len(inputs), rounds),
        f"in-process ORT, {IN_PROCESS_BATCH} requests per run": requests_per_second(
            batched, len(inputs), rounds
        ),
    }


TRITON_VENV = OUT / "triton-venv"
TRITON_CLIENT = "tritonclient[grpc]==2.73.0"


def triton_python() -> Path:
    """The python of a venv with tritonclient (made once)."""
    python = TRITON_VENV / "bin" / "python"
    if not (TRITON_VENV / ".installed").is_file():
        import venv

        venv.EnvBuilder(with_pip=True, clear=True).create(TRITON_VENV)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", TRITON_CLIENT], check=True, timeout=900
        )
        (TRITON_VENV / ".installed").touch()
    return python


def through_tritonclient(address: str, model: str, vocab: int, count: int, rounds: int) -> dict[str, float]:
    script = Path(__file__).resolve().parent / "triton_load.py"
    args = [
        str(triton_python()),
        str(script),
        address,
        model,
        str(vocab),
        str(count),
        str(rounds),
        str(THREADS),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"triton_load.py failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(
    name: str, path: Path, flags: list[str], vocab: int, count: int, rounds: int, triton: bool
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    inputs = [{"input_ids": rng.integers(0, vocab, (1, 8), dtype=np.int64)} for _ in range(count)]
    data = OUT / "streaming-bench" / name
    shutil.rmtree(data / "adapters", ignore_errors=True)
    worker = WorkerProcess("--data-dir", str(data), *flags)
    try:
        # Round by round, native and tritonclient side by side, so drift hits both alike.
        samples: dict[str, list[float]] = {}
        for _round in range(rounds):
            measured = through_worker(worker.address, name, inputs, 1)
            if triton:
                measured.update(through_tritonclient(worker.address, name, vocab, count, 1))
            for mode, value in measured.items():
                samples.setdefault(mode, []).append(value)
        rates = {mode: median(values) for mode, values in samples.items()}
    finally:
        worker.stop()
    rates.update(in_process(path, inputs, rounds))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo-requests", type=int, default=2000)
    parser.add_argument("--bench-requests", type=int, default=160)
    parser.add_argument("--no-triton", dest="triton", action="store_false", help="leave tritonclient out")
    args = parser.parse_args()

    from ortmux.worker.demo import ensure_demo_model

    demo_path = ensure_demo_model(OUT / "streaming-bench" / "demo")
    bench_path = bench_model()
    results = {
        "demo": measure("demo", demo_path, [], 1000, args.demo_requests, args.rounds, args.triton),
        "bench": measure(
            "bench",
            bench_path,
            ["--model", f"bench={bench_path}"],
            8000,
            args.bench_requests,
            args.rounds,
            args.triton,
        ),
    }
    ceiling = {name: rates["in-process ORT, one request per run"] for name, rates in results.items()}
    batched = {
        name: rates[f"in-process ORT, {IN_PROCESS_BATCH} requests per run"] for name, rates in results.items()
    }
    rows = [
        [
            mode,
            results["demo"][mode],
            results["bench"][mode],
            results["bench"][mode] / ceiling["bench"],
            results["bench"][mode] / batched["bench"],
        ]
        for mode in results["demo"]
    ]
    print(
        f"Requests/s on loopback, 1 x 8 tokens per request, median of {args.rounds} rounds "
        f"({args.demo_requests} requests on demo, {args.bench_requests} on the bench base)"
    )
    print(
        table(
            [
                "mode",
                "demo req/s",
                "bench base req/s",
                "bench x in-process (1/run)",
                f"bench x in-process ({IN_PROCESS_BATCH}/run)",
            ],
            rows,
        )
    )
    if args.triton:
        pairs = [
            ("unary, one at a time", "tritonclient unary, one at a time"),
            (f"unary, {THREADS} threads", f"tritonclient unary, {THREADS} threads"),
            ("stream_infer, window 128", "tritonclient stream"),
        ]
        print("\nOpen Inference Protocol (tritonclient) against the native client, same worker")
        print(
            table(
                ["native mode", "tritonclient mode", "demo OIP x native", "bench OIP x native"],
                [
                    [
                        native,
                        oip,
                        results["demo"][oip] / results["demo"][native],
                        results["bench"][oip] / results["bench"][native],
                    ]
                    for native, oip in pairs
                ],
            )
        )


if __name__ == "__main__":
    main()
