"""Adapters on the bench base: time from registration to the first result, against the best
per-adapter-session recipe; adapter inference latency against the base; memory per adapter.

    python bench/adapters.py [--runs 20] [--memory-adapters 100]

A real worker runs in its own process (``ortmux serve``); this process is its client and also
runs the recipe's sessions, so every figure is measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_SHAPE, OUT, WorkerProcess, bench_model, median, pss_of, table

RANK = 16
LORA_MODULES = [f"layers.{i}.self_attn.{p}_proj" for i in range(BENCH_SHAPE["layers"]) for p in "qkvo"]
OVERRIDDEN = ["layers.11.mlp.up_proj.weight", "layers.11.mlp.down_proj.weight"]


def write_peft(directory: Path, seed: int) -> Path:
    from ortmux.worker.adapters import safetensors

    d = BENCH_SHAPE["d_model"]
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in LORA_MODULES:
        tensors[f"base_model.model.{module}.lora_A.weight"] = (rng.standard_normal((RANK, d)) * 0.02).astype(
            "f4"
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = (rng.standard_normal((d, RANK)) * 0.02).astype(
            "f4"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


def write_override(path: Path, seed: int) -> Path:
    from ortmux.worker.adapters import safetensors

    d, f = BENCH_SHAPE["d_model"], BENCH_SHAPE["d_ff"]
    rng = np.random.default_rng(seed)
    shapes = {OVERRIDDEN[0]: (f, d), OVERRIDDEN[1]: (d, f)}
    path.write_bytes(
        safetensors.dump({n: (rng.standard_normal(s) * 0.02).astype("f4") for n, s in shapes.items()})
    )
    return path


class Recipe:
    """A new InferenceSession per adapter over a pre-optimized model (no prepacked blobs saved),
    base weights shared through add_initializer, optimizations off; the adapter merged into its
    target weights."""

    def __init__(self, source: Path, work: Path) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        from ortmux.worker.engine.runtime import configure_process

        configure_process(0)  # one global pool, as a worker has, so the comparison is fair
        self.ort = ort
        self.path = work / "recipe" / "model.onnx"
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            options = ort.SessionOptions()
            options.use_per_session_threads = False
            options.optimized_model_filepath = str(self.path)
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "model.onnx.data"
            )
            options.log_severity_level = 3
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        model = onnx.load(str(self.path))
        self.arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.arrays.items() if a.size > 256}
        # After optimization the projections are pre-transposed [in, out] constants; find them by shape order.
        self.weight_names = {name for name, array in self.arrays.items() if array.ndim == 2}

    def first_result(self, replaced: dict[str, np.ndarray], feeds: dict) -> float:
        started = time.perf_counter()
        options = self.ort.SessionOptions()
        options.use_per_session_threads = False
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        keep = []
        for name, value in self.values.items():
            if name in replaced:
                keep.append(self.ort.OrtValue.ortvalue_from_numpy(replaced[name]))
                options.add_initializer(name, keep[-1])
            else:
                options.add_initializer(name, value)
        session = self.ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        return time.perf_counter() - started


def merged_lora(recipe: Recipe, peft: Path) -> dict[str, np.ndarray]:
    """The recipe's adapter: deltas merged into copies of as many projection weights (timed as part
    of it). Only the cost matters here, so weights are picked by shape; outputs are not compared."""
    from ortmux.worker.adapters import safetensors

    tensors = safetensors.load((peft / "adapter_model.safetensors").read_bytes())
    candidates = sorted(n for n in recipe.weight_names if recipe.arrays[n].shape == (768, 768))
    merged = {}
    for index, module in enumerate(LORA_MODULES):
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        name = candidates[index % len(candidates)]
        merged[name] = np.ascontiguousarray(recipe.arrays[name] + (b @ a).T * 2.0)
    return merged


def start(work: Path, source: Path) -> WorkerProcess:
    shutil.rmtree(work / "data" / "adapters", ignore_errors=True)
    overridable = [flag for name in OVERRIDDEN for flag in ("--overridable", name)]
    return WorkerProcess("--data-dir", str(work / "data"), "--model", f"bench={source}", *overridable)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--memory-adapters", type=int, default=100)
    args = parser.parse_args()

    from ortmux.client import Client

    source = bench_model()
    work = OUT / "adapters-bench"
    files = work / "files"
    worker = start(work, source)
    ids = {"input_ids": np.random.default_rng(0).integers(0, 8000, (1, 8), dtype=np.int64)}
    times: dict[str, list[float]] = {
        "lora": [],
        "lora_path": [],
        "override": [],
        "override_path": [],
        "recipe_lora": [],
        "recipe_override": [],
    }
    first_adapter_ms: list[float] = []
    base_ms: list[float] = []
    # Files are written before timing starts; ortmux and the recipe take turns by phase, so neither
    # runs while the other is being timed (on 2 cores they would share the CPU).
    pefts = [write_peft(files / f"lora-{run}", seed=run) for run in range(args.runs)]
    overrides = [write_override(files / f"override-{run}.safetensors", seed=run) for run in range(args.runs)]
    os.sync()
    with Client(worker.address) as client:
        for _ in range(3):
            client.infer("bench", ids)
        for run, (peft, override) in enumerate(zip(pefts, overrides, strict=True)):
            started = time.perf_counter()
            client.register_adapter("bench", f"lora-{run}", peft)
            registered = time.perf_counter()
            client.infer("bench", ids, adapter=f"lora-{run}")
            done = time.perf_counter()
            times["lora"].append(done - started)
            first_adapter_ms.append((done - registered) * 1000)
            started = time.perf_counter()
            client.infer("bench", ids)
            base_ms.append((time.perf_counter() - started) * 1000)

            started = time.perf_counter()
            client.register_adapter_from_path("bench", f"lora-path-{run}", str(peft.resolve()))
            client.infer("bench", ids, adapter=f"lora-path-{run}")
            times["lora_path"].append(time.perf_counter() - started)

            started = time.perf_counter()
            client.register_adapter("bench", f"override-{run}", override)
            client.infer("bench", ids, adapter=f"override-{run}")
            times["override"].append(time.perf_counter() - started)

            started = time.perf_counter()
            client.register_adapter_from_path("bench", f"override-path-{run}", str(override.resolve()))
            client.infer("bench", ids, adapter=f"override-path-{run}")
            times["override_path"].append(time.perf_counter() - started)

    recipe = Recipe(source, work)
    mlp = sorted(n for n in recipe.weight_names if recipe.arrays[n].shape in ((768, 3072), (3072, 768)))
    for peft in pefts:
        merge_started = time.perf_counter()
        merged = merged_lora(recipe, peft)
        merge_seconds = time.perf_counter() - merge_started
        times["recipe_lora"].append(merge_seconds + recipe.first_result(merged, ids))
        replacement = {name: np.ascontiguousarray(recipe.arrays[name] * 0.5) for name in mlp[:2]}
        times["recipe_override"].append(recipe.first_result(replacement, ids))
    worker.stop()

    worker = start(work, source)  # a fresh worker for memory: nothing registered or freed before
    peft = write_peft(files / "memory", seed=1234)
    with Client(worker.address) as client:
        for _ in range(3):
            client.infer("bench", ids)
        client.register_adapter("bench", "warm-up", peft)
        client.infer("bench", ids, adapter="warm-up")
        before = pss_of(worker.pid)
        for index in range(args.memory_adapters):
            client.register_adapter("bench", f"mem-{index}", peft)
        growth = (pss_of(worker.pid) - before) * (1 << 20)
        resident = sum(a.resident_bytes for a in client.list_adapters("bench") if a.adapter_id != "warm-up")
    worker.stop()

    lora, recipe_lora = median(times["lora"]), median(times["recipe_lora"])
    lora_path = median(times["lora_path"])
    override, recipe_override = median(times["override"]), median(times["recipe_override"])
    override_path = median(times["override_path"])
    rows = [
        ["LoRA rank 16, 48 projections (ortmux, uploaded)", lora * 1000, lora / recipe_lora],
        [
            "LoRA rank 16, 48 projections (ortmux, from a worker path)",
            lora_path * 1000,
            lora_path / recipe_lora,
        ],
        ["LoRA, per-adapter session recipe", recipe_lora * 1000, 1.0],
        ["override of 2 weights (ortmux, uploaded)", override * 1000, override / recipe_override],
        [
            "override of 2 weights (ortmux, from a worker path)",
            override_path * 1000,
            override_path / recipe_override,
        ],
        ["override, per-adapter session recipe", recipe_override * 1000, 1.0],
    ]
    print(f"Registration to first result (ms), bench base, p50 of {args.runs}")
    print(table(["adapter", "p50 ms", "x recipe"], rows))
    print()
    base, first = median(base_ms), median(first_adapter_ms)
    print(f"Inference latency (ms), 1x8 tokens, p50 of {args.runs}")
    print(
        table(
            ["request", "p50 ms", "x base"],
            [["base model", base, 1.0], ["first request with a new LoRA adapter", first, first / base]],
        )
    )
    print()
    print(f"Memory of {args.memory_adapters} registered rank-16 adapters (48 projections each), fresh worker")
    print(
        table(
            ["PSS growth MiB", "adapter tensors MiB", "growth / tensor bytes"],
            [[growth / (1 << 20), resident / (1 << 20), growth / resident]],
        )
    )


if __name__ == "__main__":
    main()
