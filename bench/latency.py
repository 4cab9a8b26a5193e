"""Inference latency of an ortmux session vs a plain optimized ONNX Runtime session.

    python bench/latency.py [--runs 5] [--iterations 50]

Both run the same inputs on the bench base, each in its own fresh process, alternating; each
process reports the median of ``--iterations`` timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, bench_model, child, emit, median, table

SHAPES = {"1x8 tokens": (1, 8), "4x32 tokens": (4, 32)}


def measure(kind: str, rows: int, tokens: int, iterations: int, cache_dir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    path = bench_model()
    ids = {"input_ids": np.random.default_rng(0).integers(0, 8000, (rows, tokens), dtype=np.int64)}
    if kind == "plain":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run() -> None:
            session.run(None, ids)
    else:
        from ortmux.worker.engine.base_model import BaseModel
        from ortmux.worker.engine.cache import ModelCache
        from ortmux.worker.engine.runtime import RuntimeOptions, configure_process

        configure_process(0)
        base = BaseModel(
            "bench", path, RuntimeOptions(providers=("CPUExecutionProvider",)), ModelCache(cache_dir)
        )

        def run() -> None:
            base.run(ids)

    for _ in range(5):
        run()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return {"ms": median(samples) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--child", nargs=5, metavar=("KIND", "ROWS", "TOKENS", "ITERATIONS", "CACHE_DIR"))
    args = parser.parse_args()
    if args.child:
        kind, rows, tokens, iterations, cache_dir = args.child
        emit(measure(kind, int(rows), int(tokens), int(iterations), Path(cache_dir)))
        return
    bench_model()
    cache_dir = OUT / "latency-cache"
    table_rows = []
    for label, (rows, tokens) in SHAPES.items():
        samples: dict[str, list[float]] = {"plain": [], "ortmux": []}
        for _ in range(args.runs):
            for kind in samples:
                result = child(__file__, kind, str(rows), str(tokens), str(args.iterations), str(cache_dir))
                samples[kind].append(result["ms"])
        plain, ortmux = median(samples["plain"]), median(samples["ortmux"])
        table_rows.append([label, plain, ortmux, plain / ortmux])
    print(f"Latency (ms), bench base, median over {args.runs} processes x {args.iterations} runs each")
    print(table(["input", "plain optimized session", "ortmux session", "speed ortmux / plain"], table_rows))


if __name__ == "__main__":
    main()
