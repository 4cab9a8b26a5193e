"""The bench base in float32, int8 (dynamic) and 4-bit (MatMulNBits), side by side in one run.

    python bench/quantized.py [--seconds 4] [--clients 32] [--rounds 3] [--runs 20]

Each variant is a worker in its own process (``ortmux serve``, ``--quantize none|int8|int4`` on
the float bench base; the worker quantizes it once, when it enters the cache). Measured per
variant: worker PSS with the base alone, each of two worker processes on one model cache (the
second maps the first one's pages: one copy per node), and with 16 rank-16 adapters resident (on
all 48 attention projections), served latency of one client at 1 x 8 and 32 x 8 tokens (medians of
``--runs``), and served requests/s at ``--clients`` clients (1 x 8 tokens each) base-only and on
64 random adapters, in interleaved rounds (medians). Then, in-process, one 32-row batch split as
the batcher runs it: the base-only run, gathering each row's factors, and the run with each row
on its own adapter, so the share the float LoRA branches take of a quantized batch shows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import write_peft
from batching import distinct_adapters, load
from common import OUT, WorkerProcess, bench_model, child, emit, median, pss_of, table, timed

VARIANTS = ("none", "int8", "int4")
LABEL = {"none": "float32", "int8": "int8 dynamic", "int4": "4-bit MatMulNBits"}
ADAPTERS = 64
RESIDENT = 16
WORK = OUT / "quantized"


def _cache(variant: str) -> Path:
    return WORK / variant / "data" / "cache"


def batch_parts(variant: str, rows: int = 32, runs: int = 11) -> dict:
    """In this (child) process: load the variant from its cache (building it if needed) and time
    one batch of ``rows`` base-only, and with each row on its own rank-16 adapter."""
    from ortmux.worker.engine.cache import ModelCache
    from ortmux.worker.engine.lora.feeds import FeedBuffers, build_feeds
    from ortmux.worker.engine.registry import ModelRegistry
    from ortmux.worker.engine.runtime import RuntimeOptions, configure_process

    configure_process(0)
    runtime = RuntimeOptions(providers=("CPUExecutionProvider",), quantize=variant)
    started = time.perf_counter()
    model = ModelRegistry(runtime, ModelCache(_cache(variant))).load("bench", bench_model())
    load_seconds = time.perf_counter() - started
    spans, inputs = distinct_adapters(model, rows)
    buffers = FeedBuffers()

    def mixed() -> None:
        model.run(inputs, lora_spans=spans, buffers=buffers)

    def gather() -> None:
        build_feeds(model.lora_inputs, rows, spans, buffers)

    samples: dict[str, list[float]] = {"base": [], "gather": [], "mixed": []}
    calls = {"base": lambda: model.run(inputs), "gather": gather, "mixed": mixed}
    for function in calls.values():
        function()  # warm: buffers allocated, shapes seen
    for _ in range(runs):  # interleaved, so drifts of a shared machine hit all three alike
        for part, function in calls.items():
            samples[part].append(timed(function)[0] * 1000)
    base, gather_ms, mixed_ms = (median(samples[part]) for part in ("base", "gather", "mixed"))
    return {
        "base_ms": base,
        "gather_ms": gather_ms,
        "mixed_ms": mixed_ms,
        "built": not model.cache_hit,
        "load_seconds": load_seconds,
        "cache_mib": model.entry.total_bytes / (1 << 20),
        "sites": len(model.lora_sites),
        "ops": sorted({site.quantized for site in model.lora_sites if site.quantized}),
    }


def _latency_ms(address: str, rows: int, runs: int) -> float:
    from ortmux.client import Client

    ids = {"input_ids": np.random.default_rng(rows).integers(0, 8000, (rows, 8), dtype=np.int64)}
    with Client(address, timeout=120) as client:
        client.infer("bench", ids)
        return median([timed(client.infer, "bench", ids)[0] * 1000 for _ in range(runs)])


def _start(variant: str, second: bool = False) -> WorkerProcess:
    """The variant's worker; ``second``: another worker process of the same node, on the first
    one's model cache with a data dir of its own."""
    data = WORK / variant / ("data-second" if second else "data")
    shutil.rmtree(data / "adapters", ignore_errors=True)
    flags = ["--cache-dir", str(_cache(variant))] if second else []
    return WorkerProcess(
        "--data-dir", str(data), *flags, "--quantize", variant, "--model", f"bench={bench_model()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--child", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(batch_parts(args.child[0]))
        return
    parts = {variant: child(__file__, variant) for variant in VARIANTS}  # also builds the caches
    from ortmux.client import Client

    workers = {variant: _start(variant) for variant in VARIANTS}
    try:
        memory: dict[str, tuple[float, float]] = {}
        latency: dict[str, tuple[float, float]] = {}
        pair: dict[str, float] = {}
        for variant, worker in workers.items():
            _latency_ms(worker.address, 1, 3)  # the base has run
            alone = pss_of(worker.pid)
            second = _start(variant, second=True)  # one copy per node: the pages are shared
            try:
                _latency_ms(second.address, 1, 3)
                pair[variant] = (pss_of(worker.pid) + pss_of(second.pid)) / 2
            finally:
                second.stop()
            with Client(worker.address, timeout=120) as client:
                ids = {"input_ids": np.zeros((1, 8), dtype=np.int64)}
                for index in range(ADAPTERS):
                    client.register_adapter(
                        "bench", f"a{index}", write_peft(WORK / "files" / f"a{index}", seed=index)
                    )
                    if index < RESIDENT:
                        client.infer("bench", ids, adapter=f"a{index}")
                    if index == RESIDENT - 1:
                        memory[variant] = (alone, pss_of(worker.pid))
            latency[variant] = (
                _latency_ms(worker.address, 1, args.runs),
                _latency_ms(worker.address, 32, max(args.runs // 4, 5)),
            )
        for worker in workers.values():  # warm: every adapter resident, buffers at full size
            for adapters in (0, ADAPTERS):
                load(worker.address, args.clients, 1.0, adapters)
        served: dict[tuple[str, int], list[float]] = {}
        for _round in range(args.rounds):
            for variant, worker in workers.items():
                for adapters in (0, ADAPTERS):
                    rps, _latencies = load(worker.address, args.clients, args.seconds, adapters)
                    served.setdefault((variant, adapters), []).append(rps)
    finally:
        for worker in workers.values():
            worker.stop()

    float_pss = memory["none"][0]
    float_mixed = median(served[("none", ADAPTERS)])
    rows = []
    for variant in VARIANTS:
        base_rps, mixed_rps = median(served[(variant, 0)]), median(served[(variant, ADAPTERS)])
        rows.append(
            [
                LABEL[variant],
                parts[variant]["cache_mib"],
                memory[variant][0],
                memory[variant][0] / float_pss,
                pair[variant],
                memory[variant][1],
                latency[variant][0],
                latency[variant][1],
                base_rps,
                mixed_rps,
                mixed_rps / float_mixed,
            ]
        )
    print(
        f"\nBench base (97 M parameters), one worker per variant; served req/s at {args.clients} clients "
        f"(1 x 8 tokens), medians of {args.rounds} interleaved rounds of {args.seconds:.0f} s; latency: one "
        f"client, medians of {args.runs} (1 x 8) and {max(args.runs // 4, 5)} (32 x 8)"
    )
    print(
        table(
            [
                "base",
                "cache entry MiB",
                "PSS base MiB",
                "x float",
                "PSS each of 2 workers MiB",
                f"PSS {RESIDENT} adapters MiB",
                "1x8 ms",
                "32x8 ms",
                "base-only req/s",
                f"{ADAPTERS} mixed req/s",
                "mixed x float mixed",
            ],
            rows,
        )
    )
    print(
        "\nOne batch of 32 requests (1 x 8 tokens), in-process, medians of 11 interleaved runs; "
        "mixed: every row its own adapter"
    )
    breakdown = []
    for variant in VARIANTS:
        part = parts[variant]
        run = part["mixed_ms"] - part["gather_ms"]
        branches = run - part["base_ms"]
        breakdown.append(
            [
                LABEL[variant],
                part["base_ms"],
                part["gather_ms"],
                run,
                branches,
                branches / part["mixed_ms"],
                part["mixed_ms"] / part["base_ms"],
            ]
        )
    print(
        table(
            [
                "base",
                "base-only run ms",
                "gather factors ms",
                "mixed run ms",
                "of which branches ms",
                "branches share of mixed",
                "mixed x base-only",
            ],
            breakdown,
        )
    )
    for variant in VARIANTS:
        part = parts[variant]
        print(
            f"{LABEL[variant]}: {part['sites']} LoRA sites through {', '.join(part['ops']) or 'MatMul'}; "
            f"cache {'built (quantize, rewrite, optimize)' if part['built'] else 'hit'}: "
            f"{part['load_seconds']:.1f} s to load"
        )


if __name__ == "__main__":
    main()
