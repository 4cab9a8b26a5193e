"""How long a session takes to start: plain ONNX Runtime vs ortmux (cache miss, cache hit, extra).

    python bench/session_creation.py [--runs 5]

Each start runs in a fresh process (the page cache stays warm, as on a node that restarts a pod).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, bench_model, child, emit, median, model_mib, table, timed


def measure(kind: str, cache_dir: Path) -> dict:
    import onnxruntime as ort

    from ortmux.worker.engine.base_model import BaseModel
    from ortmux.worker.engine.cache import ModelCache
    from ortmux.worker.engine.runtime import RuntimeOptions, configure_process

    path = bench_model()
    if kind == "plain":
        seconds, _ = timed(ort.InferenceSession, str(path), providers=["CPUExecutionProvider"])
        return {"seconds": seconds}
    configure_process(0)
    runtime = RuntimeOptions(providers=("CPUExecutionProvider",))
    seconds, model = timed(BaseModel, "bench", path, runtime, ModelCache(cache_dir))
    result = {"seconds": seconds, "hit": model.cache_hit}
    if kind == "extra":
        result["seconds"], _ = timed(model.new_session)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CACHE_DIR"))
    args = parser.parse_args()
    if args.child:
        emit(measure(args.child[0], Path(args.child[1])))
        return
    bench_model()
    cache_dir = OUT / "session-creation-cache"
    samples: dict[str, list[float]] = {"plain": [], "miss": [], "hit": [], "extra": []}
    for _ in range(args.runs):
        shutil.rmtree(cache_dir, ignore_errors=True)
        samples["plain"].append(child(__file__, "plain", str(cache_dir))["seconds"])
        miss = child(__file__, "miss", str(cache_dir))
        assert not miss["hit"]
        samples["miss"].append(miss["seconds"])
        hit = child(__file__, "hit", str(cache_dir))
        assert hit["hit"]
        samples["hit"].append(hit["seconds"])
        samples["extra"].append(child(__file__, "extra", str(cache_dir))["seconds"])
    cold = median(samples["plain"])
    labels = {
        "plain": "plain InferenceSession (cold, default optimization)",
        "miss": "ortmux base load, cache miss (optimize + prepack + save)",
        "hit": "ortmux base load, cache hit",
        "extra": "ortmux extra session on a loaded base",
    }
    rows = [
        [labels[kind], median(values), min(values), max(values), median(values) / cold]
        for kind, values in samples.items()
    ]
    print(f"Session creation, bench base ({model_mib():.0f} MiB), median of {args.runs} fresh processes each")
    print(table(["start", "median s", "min s", "max s", "x plain cold"], rows))


if __name__ == "__main__":
    main()
