"""Served throughput of adapter requests against base-only requests, through a real worker.

    python bench/served.py [--seconds 4] [--clients 32] [--rounds 3] [--lora-branch kernel matmul]
                           [--profile]

One worker in its own process (``ortmux serve``) on the bench base with 64 rank-16 adapters on all
48 projections. ``--clients`` threads send 1 x 8-token requests back to back for ``--seconds`` per
mode: base only, every request on one adapter, a uniformly random adapter of 16, of 64. Rounds
interleave the modes; the table gives each mode's median requests/s and p50/p99 over rounds, and
its ratio to base-only. ``--lora-branch`` runs one worker per LoRA branch (docs/lora-kernel.md),
one after the other, each with its own base-only reference. With ``--profile`` (needs py-spy) the
worker is sampled during one extra round of each mode and the hottest worker functions are
printed: where a served request's time goes besides the model.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import write_peft
from batching import load
from common import OUT, WorkerProcess, bench_model, median, table

ADAPTERS = 64
MODES = {"base only": 0, "one adapter": 1, "16 random adapters": 16, "64 random adapters": 64}


def profile(pid: int, seconds: float, out: Path) -> None:
    """py-spy's flat profile of the worker (own time per function), top entries."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("--profile needs py-spy on PATH")
        return
    subprocess.run(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--format",
            "raw",
            "--output",
            str(out),
            "--threads",
            "--nonblocking",
            "--rate",
            "200",
        ],
        check=False,
        capture_output=True,
    )


def summarize(raw: Path, top: int = 14) -> list[list[object]]:
    """Samples per leaf function (own time), from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0]
        leaf = frames[-1]
        samples = int(count)
        total += samples
        key = f"{leaf.split(' (')[0]} [{'batcher' if 'batcher' in thread else 'grpc/other'}]"
        own[key] = own.get(key, 0) + samples
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return [[name, count, count / max(total, 1)] for name, count in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lora-branch", nargs="+", default=["kernel"], choices=["kernel", "matmul"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for branch in args.lora_branch:
        serve(args, branch)


def single_request(address: str, rounds: int, runs: int = 30) -> None:
    """One 1 x 8 request at a time, through the worker (its batcher, gRPC, the client) against
    a plain optimized ONNX Runtime session in this process on the same inputs, in interleaved
    rounds of ``runs`` requests: what the serving path adds to a run. Medians of the rounds'
    medians."""
    import onnxruntime as ort

    from ortmux.client import Client

    ids = {"input_ids": np.random.default_rng(0).integers(0, 8000, (1, 8), dtype=np.int64)}
    session = ort.InferenceSession(str(bench_model()), providers=["CPUExecutionProvider"])
    served, plain = [], []
    with Client(address) as client:
        for _ in range(3):  # warm both
            client.infer("bench", ids)
            session.run(None, ids)
        for _round in range(rounds):
            for times, call in (
                (served, lambda: client.infer("bench", ids)),
                (plain, lambda: session.run(None, ids)),
            ):
                samples = []
                for _ in range(runs):
                    started = time.perf_counter()
                    call()
                    samples.append((time.perf_counter() - started) * 1000)
                times.append(median(samples))
    print(f"\nOne 1 x 8 request at a time, base only, medians of {rounds} interleaved rounds of {runs}")
    print(
        table(
            ["path", "ms", "x plain session"],
            [
                ["served (worker process, gRPC, client)", median(served), median(served) / median(plain)],
                ["plain ONNX Runtime session, in-process", median(plain), 1.0],
            ],
        )
    )


def serve(args: argparse.Namespace, branch: str) -> None:
    work = OUT / "served"
    shutil.rmtree(work / "data", ignore_errors=True)
    worker = WorkerProcess(
        "--data-dir", str(work / "data"), "--model", f"bench={bench_model()}", "--lora-branch", branch
    )
    try:
        from ortmux.client import Client

        with Client(worker.address, timeout=120) as client:
            for index in range(ADAPTERS):
                client.register_adapter(
                    "bench", f"a{index}", write_peft(work / "files" / f"a{index}", seed=index)
                )
        for adapters in MODES.values():  # warm: every adapter resident, buffers at full size
            load(worker.address, args.clients, 1.0, adapters)
        results: dict[str, list[tuple[float, list[float]]]] = {mode: [] for mode in MODES}
        for _round in range(args.rounds):
            for mode, adapters in MODES.items():
                results[mode].append(load(worker.address, args.clients, args.seconds, adapters))
        rows = []
        base = median([rps for rps, _ in results["base only"]])
        for mode, runs in results.items():
            rps = median([value for value, _ in runs])
            p50 = median([float(np.percentile(lat, 50)) for _, lat in runs])
            p99 = median([float(np.percentile(lat, 99)) for _, lat in runs])
            rows.append([mode, rps, rps / base, p50, p99, ", ".join(f"{value:.0f}" for value, _ in runs)])
        print(
            f"\nServed requests/s, lora_branch={branch}, {args.clients} clients, 1 x 8 tokens, rank-16 "
            f"adapters on 48 projections, medians of {args.rounds} interleaved rounds of {args.seconds:.0f} s"
        )
        print(table(["mode", "req/s", "x base-only", "p50 ms", "p99 ms", "rounds req/s"], rows))
        single_request(worker.address, args.rounds)
        if args.profile:
            for mode, adapters in MODES.items():
                raw = work / f"profile-{adapters}.txt"
                sampler = threading.Thread(target=profile, args=(worker.pid, args.seconds, raw))
                sampler.start()
                load(worker.address, args.clients, args.seconds + 1, adapters)
                sampler.join()
                if raw.is_file():
                    print(f"\nWorker samples by function (own time), {mode}:")
                    print(table(["function [thread]", "samples", "share"], summarize(raw)))
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
