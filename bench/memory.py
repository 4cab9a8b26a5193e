"""Process memory (PSS) with 1, 4 and 16 sessions on one base: plain sessions, the
``add_initializer`` recipe, and ortmux. Writes a PNG of PSS against session count.

    python bench/memory.py [--runs 3] [--counts 1 4 16] [--png bench/results/memory.png]

Each point is a fresh process; PSS (not RSS) counts a page shared by k mappings as 1/k.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, RESULTS, bench_model, child, emit, median, model_mib, pss_mib, table

APPROACHES = {
    "plain": "plain InferenceSession per session",
    "add_initializer": "weights once as OrtValues + add_initializer (prepack per session)",
    "ortmux": "ortmux: cached prepacked model, mapped arena, global pool",
}


def _ids():
    import numpy as np

    return {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}


def measure(approach: str, count: int, cache_dir: Path) -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    path = bench_model()
    baseline = pss_mib()
    sessions: list = []
    if approach == "plain":
        sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for _ in range(count)]
        runs = [lambda s=s: s.run(None, _ids()) for s in sessions]
    elif approach == "add_initializer":
        model = onnx.load(str(path))
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        del model
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        for _ in range(count):
            options = ort.SessionOptions()
            for name, value in values.items():
                options.add_initializer(name, value)
            sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        runs = [lambda s=s: s.run(None, _ids()) for s in sessions]
    else:
        from ortmux.worker.engine.base_model import BaseModel
        from ortmux.worker.engine.cache import ModelCache
        from ortmux.worker.engine.runtime import RuntimeOptions, configure_process

        configure_process(0)
        base = BaseModel(
            "bench", path, RuntimeOptions(providers=("CPUExecutionProvider",)), ModelCache(cache_dir)
        )
        sessions = [None] + [base.new_session() for _ in range(count - 1)]
        runs = [lambda s=s: base.run(_ids(), session=s) for s in sessions]
    for run in runs:
        run()
    return {"pss_mib": pss_mib(), "baseline_mib": baseline}


def plot(results: dict[str, dict[int, float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for approach, points in results.items():
        counts = sorted(points)
        axes.plot(counts, [points[c] for c in counts], marker="o", label=APPROACHES[approach])
    axes.set_xlabel("sessions on one base model")
    axes.set_ylabel("process PSS (MiB)")
    axes.set_title(f"Memory with many sessions on one {model_mib():.0f} MiB base")
    axes.set_xticks(sorted({c for points in results.values() for c in points}))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--png", type=Path, default=RESULTS / "memory.png")
    parser.add_argument("--child", nargs=3, metavar=("APPROACH", "COUNT", "CACHE_DIR"))
    args = parser.parse_args()
    if args.child:
        emit(measure(args.child[0], int(args.child[1]), Path(args.child[2])))
        return
    bench_model()
    cache_dir = OUT / "memory-cache"
    child(__file__, "ortmux", "1", str(cache_dir))  # fill the cache; every measured load is a hit
    results: dict[str, dict[int, float]] = {}
    rows = []
    for approach in APPROACHES:
        results[approach] = {}
        for count in args.counts:
            samples = [
                child(__file__, approach, str(count), str(cache_dir))["pss_mib"] for _ in range(args.runs)
            ]
            results[approach][count] = median(samples)
        one = results[approach][min(args.counts)]
        rows.append(
            [APPROACHES[approach]]
            + [results[approach][c] for c in args.counts]
            + [results[approach][max(args.counts)] / one]
        )
    print(
        f"Process PSS (MiB), bench base ({model_mib():.0f} MiB), median of {args.runs} fresh processes each"
    )
    headers = ["approach"] + [f"{c} session{'s' if c > 1 else ''}" for c in args.counts]
    print(table([*headers, f"{max(args.counts)} / {min(args.counts)}"], rows))
    plot(results, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
