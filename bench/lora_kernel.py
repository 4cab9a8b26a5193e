"""Where a mixed-adapter run's time goes, per LoRA branch candidate, against its physical floor.

    python bench/lora_kernel.py [--rows 32] [--runs 9]

In this process, on the bench base, a batch of ``--rows`` 1 x 8-token requests whose every row has
its own rank-16 adapter on the 48 attention projections (as the batcher runs it), once per branch
candidate, each on a model of its own:

- ``matmul``: ONNX Runtime's batched MatMul on per-run copies of each row's factors
  ([rows, in, R] feeds);
- ``kernel``: the worker's LoraBranch operator reading each row's factors where the adapter keeps
  them (a per-run table of addresses).

Then the candidates on one projection alone (d 768, rank 16, the same batch): those two and
``com.microsoft.MoE`` (ONNX Runtime's contrib op: top-1 routing over expert slots, each slot an
adapter's A and B stacked into pools read in place; it needs equal input and output widths).

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


def one_projection(runs: int, rows: int = 32, tokens: int = 8, width: int = 768, rank: int = 16) -> list:
    """Each candidate's branch on one [width, width] projection, ``rows`` rows of ``tokens``
    tokens, every row its own adapter: median ms per run (the MatMul candidate's copies of each
    row's factors included), and the bytes of factors each run copies."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ortmux.worker.engine import kernels
    from ortmux.worker.engine.runtime import RuntimeOptions

    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, width, rank), dtype=np.float32) * 0.02  # each adapter's A, B
    b = rng.standard_normal((rows, rank, width), dtype=np.float32) * 0.02
    x = rng.standard_normal((rows, tokens, width), dtype=np.float32)
    want = np.einsum("btd,bdr,bro->bto", x, a, b)
    value = helper.make_tensor_value_info

    def session(nodes, inputs, domains):
        graph = helper.make_graph(nodes, "branch", inputs, [value("y", TensorProto.FLOAT, None)])
        opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(domain, 1) for domain in domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 9
        options = RuntimeOptions(("CPUExecutionProvider",)).session_options(
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    F, INT64 = TensorProto.FLOAT, TensorProto.INT64
    matmul = session(
        [helper.make_node("MatMul", ["x", "a"], ["xa"]), helper.make_node("MatMul", ["xa", "b"], ["y"])],
        [
            value("x", F, ["b", "t", width]),
            value("a", F, ["b", width, "r"]),
            value("b", F, ["b", "r", width]),
        ],
        [],
    )
    a_rows, b_rows = np.empty_like(a), np.empty_like(b)

    def run_matmul():
        for row in range(rows):  # what the MatMul branch's feeds cost: a copy of each row's factors
            a_rows[row] = a[row]
            b_rows[row] = b[row]
        return matmul.run(None, {"x": x, "a": a_rows, "b": b_rows})[0]

    moe = session(
        [
            helper.make_node(
                "MoE",
                ["x", "router", "fc1", "", "fc2"],
                ["y"],
                domain="com.microsoft",
                k=1,
                activation_type="identity",
                normalize_routing_weights=0,
            )
        ],
        [
            value("x", F, [rows * tokens, width]),
            value("router", F, [rows * tokens, rows]),
            value("fc1", F, [rows, rank, width]),
            value("fc2", F, [rows, width, rank]),
        ],
        ["com.microsoft"],
    )
    fc1 = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1)))  # pools, bound once
    fc2 = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b.transpose(0, 2, 1)))
    flat = ort.OrtValue.ortvalue_from_numpy(x.reshape(rows * tokens, width))

    def run_moe():
        router = np.full((rows * tokens, rows), -1e4, np.float32)  # softmaxed: 1 at the row's slot
        router[np.arange(rows * tokens), np.repeat(np.arange(rows), tokens)] = 0
        values = {"x": flat, "router": ort.OrtValue.ortvalue_from_numpy(router), "fc1": fc1, "fc2": fc2}
        return moe.run_with_ort_values(["y"], values)[0].numpy().reshape(rows, tokens, width)

    kernel = session(
        [helper.make_node(kernels.OP, ["x", "base", "table"], ["y"], domain=kernels.DOMAIN)],
        [value("x", F, ["b", "t", width]), value("base", F, ["n", width]), value("table", INT64, ["b", 4])],
        [kernels.DOMAIN],
    )
    table_rows = np.array([[a[i].ctypes.data, b[i].ctypes.data, rank, 0] for i in range(rows)], np.int64)
    base = np.zeros((rows * tokens, width), np.float32)

    def run_kernel():
        return kernel.run(None, {"x": x, "base": base, "table": table_rows})[0].reshape(rows, tokens, width)

    candidates = {
        "matmul (copies)": (run_matmul, a.nbytes + b.nbytes),
        "com.microsoft.MoE": (run_moe, 0),
        "kernel (in place)": (run_kernel, 0),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for name, (function, _copied) in candidates.items():
        error = float(np.abs(function() - want).max() / np.abs(want).max())
        assert error < 1e-4, (name, error)
    for _ in range(runs):
        for name, (function, _copied) in candidates.items():
            times[name].append(timed(function)[0] * 1000)
    fastest = median(times["kernel (in place)"])
    return [
        [name, median(times[name]), median(times[name]) / fastest, copied / 1e6]
        for name, (_function, copied) in candidates.items()
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
    runs = args.runs * 5
    print(
        f"\nOne [768, 768] projection's branch, {args.rows} rows x 8 tokens, each row its own rank-16 "
        f"adapter, medians of {runs}"
    )
    print(table(["candidate", "ms", "x kernel", "factors copied MB/run"], one_projection(runs, args.rows)))


if __name__ == "__main__":
    main()
