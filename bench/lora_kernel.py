"""Where a mixed-adapter run's time goes, per LoRA branch candidate, against its physical floor.

    python bench/lora_kernel.py [--rows 32] [--runs 9]

In this process, on the bench base, a batch of ``--rows`` 1 x 8-token requests whose every row has
its own rank-16 adapter on the 48 attention projections (as the batcher runs it), once per branch
candidate, each on a model of its own:

- ``matmul``: ONNX Runtime's batched MatMul on per-run copies of each row's factors
  ([rows, in, R] feeds);
- ``kernel``: the worker's LoraBranch operator reading each row's factors where the adapter keeps
  them (a per-run table of addresses).

(``com.microsoft.MoE`` was measured earlier on one projection, 0.65 ms against 0.43 ms for gathered
factors + batched MatMul, and needs equal input and output widths: not pursued.)

The floor of a run's branches is their compute at the base run's speed (the branches' multiply-adds
over the adaptable projections' multiply-adds, times the base run) plus reading each distinct
adapter's factors once at the machine's measured memory bandwidth. Medians of ``--runs``
interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from batching import distinct_adapters
from common import OUT, bench_model, median, table, timed

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile")


def cpu() -> tuple[str, str]:
    """The CPU's model name and which of the flags that matter here it has."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, " ".join(flag for flag in FLAGS if flag in flags) or "none of " + ", ".join(FLAGS)


def read_bandwidth(megabytes: int = 512, runs: int = 5) -> float:
    """Bytes per second one thread reads from memory (a sum over an array beyond the caches)."""
    array = np.ones(megabytes * (1 << 20) // 4, np.float32)
    seconds = min(timed(array.sum)[0] for _ in range(runs))
    return array.nbytes / seconds


def measure(branch: str, rows: int, runs: int, bandwidth: float) -> list[object]:
    from ortmux.worker.engine.cache import ModelCache
    from ortmux.worker.engine.lora.feeds import FeedBuffers, build_feeds
    from ortmux.worker.engine.registry import ModelRegistry
    from ortmux.worker.engine.runtime import RuntimeOptions

    runtime = RuntimeOptions(providers=("CPUExecutionProvider",), lora_branch=branch)
    registry = ModelRegistry(runtime, ModelCache(OUT / "lora-kernel" / branch))
    model = registry.load("bench", bench_model())
    assert runtime.lora_branch_in_force() == branch, f"{branch} is not available here"
    spans, inputs = distinct_adapters(model, rows)
    buffers = FeedBuffers()

    feeds = build_feeds(model.lora_inputs, rows, spans, buffers)
    factor_names = {name for lora in model.lora_inputs for name in (lora.a, lora.b, lora.bias) if name}
    copied = sum(array.nbytes for name, array in feeds.items() if name in factor_names)
    tables = sum(array.nbytes for name, array in feeds.items() if name not in factor_names)
    one = [type(span)(span.start, span.stop, spans[0].weights) for span in spans]
    parts = {
        "base": lambda: model.run(inputs),
        "build": lambda: build_feeds(model.lora_inputs, rows, spans, buffers),
        "mixed": lambda: model.run(inputs, lora_spans=spans, buffers=buffers),
        "one": lambda: model.run(inputs, lora_spans=one, buffers=buffers),
    }
    times: dict[str, list[float]] = {part: [] for part in parts}
    for part in parts.values():
        part()  # warm: buffers allocated, shapes seen
    for _ in range(runs):  # interleaved, so drifts of the machine touch every part alike
        for part, function in parts.items():
            times[part].append(timed(function)[0] * 1000)
    base, build, mixed, single = (median(times[part]) for part in parts)
    targeted = {lora.site.call_group: lora.site for lora in model.lora_inputs}
    touched = [targeted[group] for group in spans[0].weights]
    rank = next(iter(spans[0].weights.values())).rank
    branch_macs = sum(rank * (site.in_features + site.out_features) for site in touched)
    base_macs = sum(site.in_features * site.out_features for site in targeted.values())
    factor_bytes = sum(weights.nbytes for span in spans for weights in span.weights.values())
    floor = base * branch_macs / base_macs + factor_bytes / bandwidth * 1000
    return [
        branch,
        base,
        mixed,
        mixed - base,
        floor,
        (mixed - base) / floor,
        mixed / base,
        single / base,
        build,
        copied / 1e6,
        tables / 1e3,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    from ortmux.worker.engine.runtime import configure_process

    configure_process(0)
    name, flags = cpu()
    bandwidth = read_bandwidth()
    print(f"CPU: {name}, {os.cpu_count()} cores; flags: {flags}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows = [measure(branch, args.rows, args.runs, bandwidth) for branch in ("matmul", "kernel")]
    print(
        f"\nOne batch of {args.rows} requests (1 x 8 tokens), every row its own rank-16 adapter on the "
        f"48 attention projections, in-process, medians of {args.runs}"
    )
    print(
        table(
            [
                "branch",
                "base-only ms",
                "mixed ms",
                "branches ms",
                "floor ms",
                "x floor",
                "mixed x base",
                "one adapter x base",
                "feed build ms",
                "factors copied MB/run",
                "tables kB/run",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
