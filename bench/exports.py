"""Base-only and one-adapter latency on real exports, against a plain ONNX Runtime session.

    python bench/exports.py [--model NAME=PATH ...] [--rounds 5] [--iterations 30]

Default models: the committed fixture exports (tests/fixtures/exports: Optimum BERT, Optimum and
dynamo GPT-2, Optimum Qwen2). Each model runs in one process, interleaved round by round: a plain
session with ONNX Runtime's default optimization (what a user serving the export would run), the
worker's base-only path with ``base_graph`` shared and separate, and a request whose rows use
one rank-8 adapter on every adaptable projection. Medians over rounds of per-round medians.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, table, timed

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "exports"
DEFAULT = ["bert-optimum", "gpt2-optimum", "gpt2-dynamo", "qwen2-optimum"]


def feeds_for(session, rows: int, tokens: int):
    """Inputs an export takes, made from its input names (ids, masks, positions)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = rng.integers(3, 100, (rows, tokens), dtype=np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.tile(np.arange(tokens, dtype=np.int64), (rows, 1))
        elif arg.name == "token_type_ids":
            feeds[arg.name] = np.zeros((rows, tokens), np.int64)
        else:
            feeds[arg.name] = np.ones((rows, tokens), np.int64)
    return feeds


def bench_model(name: str, path: Path, shapes: list[tuple[int, int]], rounds: int, iterations: int) -> list:
    import numpy as np
    import onnxruntime as ort

    from ortmux.worker.engine.base_model import BaseModel
    from ortmux.worker.engine.cache import ModelCache
    from ortmux.worker.engine.lora.feeds import FeedBuffers, LoraWeights, RowSpan
    from ortmux.worker.engine.runtime import RuntimeOptions

    scratch = Path(tempfile.mkdtemp(prefix="ortmux-bench-exports-"))
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    models = {
        mode: BaseModel(
            f"{name}-{mode}",
            path,
            RuntimeOptions(providers=("CPUExecutionProvider",), base_graph=mode),
            ModelCache(scratch / mode),
        )
        for mode in ("shared", "separate")
    }
    shared = models["shared"]
    rng = np.random.default_rng(1)
    adapter = {
        site.weight: LoraWeights(
            a=rng.standard_normal((site.in_features, 8), dtype=np.float32) * 0.02,
            b=rng.standard_normal((8, site.out_features), dtype=np.float32) * 0.02,
        )
        for site in shared.lora_sites
    }
    buffers = FeedBuffers()
    rows_out = []
    for rows, tokens in shapes:
        feeds = feeds_for(plain, rows, tokens)
        want = plain.run(None, feeds)[0]
        got = next(iter(shared.run(feeds).values()))
        error = float(np.abs(got - want).max() / np.abs(want).max())
        calls = {
            "plain": lambda f=feeds: plain.run(None, f),
            "shared": lambda f=feeds: shared.run(f),
            "separate": lambda f=feeds: models["separate"].run(f),
            "adapter": lambda f=feeds, r=rows: shared.run(
                f, lora_spans=[RowSpan(0, r, adapter)], buffers=buffers
            ),
        }
        results: dict[str, list[float]] = {kind: [] for kind in calls}
        for _ in range(rounds):
            for kind, call in calls.items():
                call()
                results[kind].append(median([timed(call)[0] * 1000 for _ in range(iterations)]))
        ms = {kind: median(values) for kind, values in results.items()}
        rows_out.append(
            [
                name,
                f"{rows}x{tokens}",
                ms["plain"],
                ms["shared"],
                ms["plain"] / ms["shared"],
                ms["separate"],
                ms["plain"] / ms["separate"],
                ms["adapter"],
                ms["shared"] / ms["adapter"],
                f"{error:.1e}",
            ]
        )
    extra = models["separate"].arena.total_bytes - shared.arena.total_bytes
    print(
        f"{name}: {len(shared.lora_sites)} adaptable projections; "
        f"the separate base graph maps {extra / 2**20:.1f} MiB more"
    )
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    from ortmux.worker.engine.runtime import configure_process

    configure_process(0)
    models = [(m.split("=", 1)[0], Path(m.split("=", 1)[1])) for m in args.model] or [
        (name, FIXTURES / f"{name}.onnx") for name in DEFAULT
    ]
    rows = []
    for name, path in models:
        rows += bench_model(name, path, [(1, 8), (8, 32)], args.rounds, args.iterations)
    print(
        table(
            [
                "model",
                "input",
                "plain ms",
                "base shared ms",
                "x plain",
                "base separate ms",
                "x plain",
                "one adapter ms",
                "x base",
                "base rel. err",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
