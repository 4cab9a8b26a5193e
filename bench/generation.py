"""Generation throughput and latency: a worker in its own process serving the bench decoder
(bench/make_decoder.py: Qwen2-style, 12 layers, d 768, vocab 32k; 16 rank-16 adapters on
q_proj/v_proj and 16 on every linear layer), streams of 32-128-token prompts and 128 new tokens
(eos off), each on a random adapter, at 1, 8 and 32 concurrent streams: aggregate tokens/s, time to
first token and inter-token latency (p50 / p99, measured by the clients). Side by side in the
same run: plain ONNX Runtime on the same export with a Python loop (base model, batch 1 and 32,
its KV cache fed back each step), the same load through the ``openai`` client on the worker's HTTP
API and through tritonclient, and with ``--peers`` the peers of bench/generation_peers.py
(onnxruntime-genai, PyTorch + PEFT), each in its own virtual environment. Streams draw from 16
adapters (8 on q_proj/v_proj, 8 on every linear layer; ``--adapters 32`` for all).

The scenarios (bench/generation_scenarios.py): ``--sampling``, greedy against sampled
(temperature 0.8, top-p 0.95) at 32 streams, on the bench decoder and on its 128k-vocabulary
variant (``make_decoder.py --vocab 128256``) when made; ``--concurrency 1 32 256 1000``, that many
streams open at once from one asyncio client, with the worker's peak threads, RSS and PSS;
``--prefix``, 16 streams whose prompts share a 1,024-token start against 16 unique prompts (the
prefix cache); ``--long-among-short``, 31 short streams alone and beside one 1,536-token prompt.

    /tmp/fx/bin/python bench/make_decoder.py [--vocab 128256]     # once
    python bench/generation.py [--streams 1 8 32] [--new-tokens 128] [--int8] [--adapters 16]
                               [--prompt-tokens 32 128] [--peers] [--peft-python /tmp/fx/bin/python]
                               [--genai-python /tmp/genai/bin/python]
    python bench/generation.py --sampling [--rounds 2]
    python bench/generation.py --concurrency 1 32 256 1000 [--sweep-new-tokens 32]
    python bench/generation.py --prefix [--new-tokens 32] [--rounds 2]
    python bench/generation.py --long-among-short [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, table
from generation_load import percentile
from generation_scenarios import (
    SAMPLED,
    concurrency_rows,
    long_among_short_rows,
    prefix_rows,
    sampling_rows,
)
from generation_setup import DECODER, as_text, jobs_of, load_cells, serve, without_eos


def through_tritonclient(address: str, streams: int, adapters: list[str], new: int) -> dict:
    """The same load from tritonclient (its own venv, made once by bench/streaming.py's helper)."""
    from streaming import triton_python

    jobs = OUT / "triton-generation-jobs.json"
    jobs.write_text(json.dumps([[as_text(ids), adapter] for ids, adapter in jobs_of(streams, adapters)]))
    script = Path(__file__).resolve().parent / "triton_generation_load.py"
    result = subprocess.run(
        [str(triton_python()), str(script), address, "llm", str(jobs), str(streams), str(new)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"triton_generation_load.py failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load(
    address: str,
    http: int,
    streams: int,
    adapters: list[str],
    new: int,
    via: str,
    prompt: tuple[int, int] = (32, 128),
) -> dict:
    """``streams`` concurrent generations (two rounds of them), each on a random adapter."""
    from ortmux.client import Client

    if via == "tritonclient":
        return through_tritonclient(address, streams, adapters, new)
    jobs = jobs_of(streams, adapters, prompt)
    first, gaps, counts = [], [], []
    lock = threading.Lock()
    pending = list(jobs)

    def worker() -> None:
        if via == "openai":
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="x", max_retries=0)
        else:
            client = Client(address, timeout=600)
        while True:
            with lock:
                if not pending:
                    return
                ids, adapter = pending.pop()
            started = time.perf_counter()
            times = []
            if via == "openai":  # the prompt as token ids, as the completions API allows
                stream = client.completions.create(
                    model=f"llm:{adapter}", prompt=ids, max_tokens=new, temperature=0, stream=True
                )
                for _chunk in stream:
                    times.append(time.perf_counter())
            else:
                for _chunk in client.generate("llm", input_ids=ids, adapter=adapter, max_new_tokens=new):
                    times.append(time.perf_counter())
            with lock:
                first.append(times[0] - started)
                gaps.extend(np.diff(times).tolist())
                counts.append(len(times))

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {
        "tokens_per_second": sum(counts) / wall,
        "ttft_p50": percentile(first, 50) * 1000,
        "ttft_p99": percentile(first, 99) * 1000,
        "itl_p50": percentile(gaps, 50) * 1000,
        "itl_p99": percentile(gaps, 99) * 1000,
    }


def plain_loop(model: Path, rows: int, new: int) -> float:
    """Tokens/s of plain ONNX Runtime greedy decoding, ``rows`` 64-token prompts at once."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    names = [o.name for o in session.get_outputs()]
    ids = np.random.default_rng(0).integers(3, 32000, size=(rows, 64), dtype=np.int64)
    feeds = {p.name: np.zeros((rows, p.shape[1], 0, p.shape[3]), np.float32) for p in pasts}
    length = 0
    began = time.perf_counter()
    for _ in range(new):
        feeds["input_ids"] = ids
        feeds["attention_mask"] = np.ones((rows, length + ids.shape[1]), np.int64)
        feeds["position_ids"] = np.tile(np.arange(length, length + ids.shape[1]), (rows, 1))
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        length += ids.shape[1]
        ids = outputs["logits"][:, -1:].argmax(-1).astype(np.int64)
        for past in pasts:
            feeds[past.name] = outputs[past.name.replace("past_key_values", "present")]
    return rows * new / (time.perf_counter() - began)


def breakdown(model_dir: Path, adapters: list[str], rows: int = 32, past: int = 100) -> list[list[str]]:
    """Where one decode step's time goes at ``rows`` rows and ``past`` cached tokens, in-process:
    the base-only step, the step with the rows spread over ``adapters`` (the row's factors read by
    the worker's LoRA branch), building those rows' LoRA feeds, and re-laying the cache when a row
    joins; against the step's floor: the base step, the branches' multiply-adds at its speed, and
    reading each distinct adapter's factors once at the measured memory bandwidth."""
    import tempfile

    from lora_kernel import read_bandwidth

    from ortmux.client import Client
    from ortmux.worker.api.server import start_worker
    from ortmux.worker.engine.lora.feeds import FeedBuffers, RowSpan, build_feeds
    from ortmux.worker.settings import Settings

    bandwidth = read_bandwidth()
    with tempfile.TemporaryDirectory() as data:
        settings = Settings.load(
            [
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--data-dir",
                data,
                "--model",
                f"llm={model_dir / 'model.onnx'}",
            ],
            environ={},
        )
        worker = start_worker(settings)
        try:
            with Client(worker.address, timeout=600) as client:
                for name in adapters:
                    client.register_adapter("llm", name, DECODER / "adapters" / name, replace=True)
            model = worker.dataplane.get_model("llm")
            decoder = worker.dataplane.describe_generation(model).decoder
            rng = np.random.default_rng(0)
            feeds = {
                "input_ids": rng.integers(3, 32000, size=(rows, 1), dtype=np.int64),
                "attention_mask": np.ones((rows, past + 1), np.int64),
                "position_ids": np.full((rows, 1), past, np.int64),
            }
            for name, _present in decoder.cache_names():
                feeds[name] = rng.standard_normal((rows, decoder.kv_heads, past, decoder.head_dim)).astype(
                    np.float32
                )
            names = [decoder.logits, *(p for _n, p in decoder.cache_names())]
            residents = [worker.dataplane.adapters.use("llm", name) for name in adapters]
            loras = [stack.__enter__().lora for stack in residents]
            spans = [RowSpan(i, i + 1, loras[i % len(loras)]) for i in range(rows)]
            buffers = FeedBuffers()
            sites = {lora.site.call_group: lora.site for lora in model.lora_inputs}
            factor_bytes = sum(weights.nbytes for lora in loras for weights in lora.values())
            branch_macs = sum(
                weights.rank * (sites[group].in_features + sites[group].out_features)
                for lora in loras
                for group, weights in lora.items()
            ) * (rows / len(loras))
            base_macs = rows * sum(site.in_features * site.out_features for site in sites.values())

            lora_feeds = build_feeds(model.lora_inputs, rows, spans, buffers)
            caches = [feeds[name] for name, _p in decoder.cache_names()]
            parts = {
                "base": lambda: model.run(feeds, names),
                "build": lambda: build_feeds(model.lora_inputs, rows, spans, buffers),
                "mixed": lambda: model.run(feeds, names, extra_feeds=lora_feeds),
                "relay": lambda: [np.concatenate([c[: rows - 1], c[rows - 1 :]]) for c in caches],
            }
            times: dict[str, list[float]] = {part: [] for part in parts}
            for part in parts.values():
                part()  # warm
            for _ in range(9):  # interleaved rounds: the machine's drifts touch every part alike
                for part, function in parts.items():
                    started = time.perf_counter()
                    function()
                    times[part].append((time.perf_counter() - started) * 1000)
            base, build, mixed, relay = (float(np.median(times[part])) for part in parts)
            for stack in residents:
                stack.__exit__(None, None, None)
            branch = "kernel" if model.lora_inputs[0].table else "matmul"
        finally:
            worker.stop(0)
    step = mixed + build
    floor = base * (1 + branch_macs / base_macs) + factor_bytes / bandwidth * 1000
    print(
        f"{rows} rows over {len(loras)} adapters ({factor_bytes / 1e6:.0f} MB of factors), "
        f"lora_branch={branch}, "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s; floor of the mixed step {floor:.1f} ms, "
        f"the step {step:.1f} ms = {step / floor:.2f}x the floor"
    )
    return [
        ["base-only step", f"{base:.1f}", f"{base / step:.2f}"],
        ["mixed step: run with each row's factors", f"{mixed:.1f}", f"{mixed / step:.2f}"],
        [
            "  of which the LoRA branches (mixed run - base run)",
            f"{mixed - base:.1f}",
            f"{(mixed - base) / step:.2f}",
        ],
        ["mixed step: building the rows' LoRA feeds", f"{build:.1f}", f"{build / step:.2f}"],
        ["re-laying the cache when a row joins or leaves", f"{relay:.1f}", f"{relay / step:.2f}"],
        ["floor of the mixed step", f"{floor:.1f}", f"{floor / step:.2f}"],
    ]


def peers(args: argparse.Namespace) -> list[list[str]]:
    """The rows of bench/generation_peers.py, each peer run by its own environment's Python."""
    script = Path(__file__).resolve().parent / "generation_peers.py"
    rows = []
    for peer, python in (("peft", args.peft_python), ("genai", args.genai_python)):
        result = subprocess.run(
            [python, str(script), peer, "--new-tokens", str(args.new_tokens)],
            capture_output=True,
            text=True,
            timeout=7200,
        )
        if result.returncode != 0:
            print(f"generation_peers.py {peer} failed:\n{result.stderr[-3000:]}")
            continue
        for line in result.stdout.splitlines():
            if line.startswith("{"):
                values = json.loads(line)
                name = f"{values['peer']}, {values['run']} (64-token prompts)"
                rows.append(
                    [name, f"{values['rows']} rows", f"{values['tokens_per_second']:.1f}", *["-"] * 4]
                )
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--int8", action="store_true", help="also serve the decoder quantized (--quantize int8)"
    )
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--skip-openai", action="store_true")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--breakdown-only", action="store_true", help="only the in-process step breakdown")
    parser.add_argument("--adapters", type=int, default=16, choices=[2, 4, 8, 16, 32])
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs=2,
        default=[32, 128],
        metavar=("MIN", "MAX"),
        help="prompt lengths (the peers run 64 64)",
    )
    parser.add_argument("--peers", action="store_true", help="also run bench/generation_peers.py")
    parser.add_argument(
        "--sampling", action="store_true", help="only greedy vs sampled at 32 streams (and the 128k variant)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of each mode for --sampling and --prefix"
    )
    parser.add_argument(
        "--prefix", action="store_true", help="only 16 streams sharing a 1,024-token start vs unique prompts"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="*", help="only the concurrency sweep at these stream counts"
    )
    parser.add_argument(
        "--long-among-short", action="store_true", help="only 31 short streams with and without a long one"
    )
    parser.add_argument(
        "--sweep-new-tokens", type=int, default=32, help="new tokens per generation of the sweep"
    )
    parser.add_argument("--peft-python", default="/tmp/fx/bin/python")
    parser.add_argument("--genai-python", default="/tmp/genai/bin/python")
    args = parser.parse_args()
    if not (DECODER / "onnx" / "model.onnx").is_file():
        raise SystemExit("no bench decoder: run /tmp/fx/bin/python bench/make_decoder.py first")
    every = json.loads((DECODER / "adapters.json").read_text())
    half = args.adapters // 2
    adapters = [n for n in every if n.startswith("qv-")][:half] + [n for n in every if n.startswith("all-")][
        :half
    ]
    model_dir = without_eos(DECODER / "onnx", OUT / "decoder-no-eos")
    if args.sampling:
        heads = ["vocabulary", "sampling", "tokens/s", "inter-token p50 ms", "x greedy"]
        print(
            f"32 streams, {args.new_tokens} new tokens, sampled = {SAMPLED}, medians of {args.rounds} rounds:"
        )
        print(table(heads, sampling_rows(args, adapters)))
        return
    if args.prefix:
        heads = [
            "16 streams, one adapter, 1,040-token prompts",
            "finish s",
            "x faster",
            "TTFT p50 ms",
            "x lower",
        ]
        rows = prefix_rows(args, adapters)
        print(f"{args.new_tokens} new tokens, medians of {args.rounds} rounds")
        print(table(heads, rows))
        return
    if args.long_among_short:
        rows = long_among_short_rows(args, adapters)
        print(f"{args.new_tokens} new tokens, 16 adapters, medians of {args.rounds} rounds")
        print(table(["load", "short streams' tokens/s", "their ITL p50 ms", "x alone"], rows))
        return
    if args.concurrency:
        rows = concurrency_rows(args, adapters)
        print(
            f"One generation per stream (at least 4), {args.sweep_new_tokens} new tokens, one asyncio client:"
        )
        heads = ["streams", "tokens/s", "TTFT p50 ms", "p99 ms", "ITL p50 ms", "p99 ms", "threads", "RSS MiB"]
        print(table([*heads, "PSS MiB"], rows))
        return
    if args.breakdown_only:
        steps = breakdown(model_dir, adapters)
        print("One decode step: 32 rows, 100 cached tokens, in-process, medians of 9 interleaved rounds:")
        print(table(["part", "ms", "share of a mixed step"], steps))
        return
    rows = []
    if not args.skip_plain:
        for batch in (1, 32):
            rate = plain_loop(model_dir / "model.onnx", batch, args.new_tokens)
            rows.append(
                [f"plain ONNX Runtime loop, base, batch {batch}", "-", f"{rate:.1f}", "-", "-", "-", "-"]
            )
    for kind, extra in [("float32", [])] + ([("int8", ["--quantize", "int8"])] if args.int8 else []):
        worker = serve(model_dir, OUT / f"gen-data-{kind}", extra)
        address, http = worker.address, worker.http_port or 0
        try:
            from ortmux.client import Client

            with Client(address, timeout=600) as client:
                for name in adapters:
                    client.register_adapter("llm", name, DECODER / "adapters" / name, replace=True)
                for name in ["", *adapters]:  # warm: the weights' pages, first runs, each adapter
                    list(client.generate("llm", input_ids=list(range(3, 67)), adapter=name, max_new_tokens=2))
            vias = ["native"]
            if kind == "float32":
                vias += ([] if args.skip_openai else ["openai"]) + (
                    [] if args.skip_triton else ["tritonclient"]
                )
            prompt = tuple(args.prompt_tokens)
            lengths = f"{prompt[0]}-{prompt[1]}" if prompt[0] != prompt[1] else str(prompt[0])
            for streams, via in [(streams, via) for streams in args.streams for via in vias]:
                result = load(address, http, streams, adapters, args.new_tokens, via, prompt)
                rows.append(
                    [
                        f"ortmux {kind}, {via} client, {lengths}-token prompts, {len(adapters)} adapters",
                        str(streams),
                        *load_cells(result),
                    ]
                )
                print(rows[-1], flush=True)
        finally:
            worker.stop()
    if args.peers:
        rows += peers(args)
    # The breakdown sets ONNX Runtime's global thread pool: in a process of its own.
    subprocess.run(
        [sys.executable, __file__, "--breakdown-only", "--adapters", str(args.adapters)], check=True
    )
    print(
        f"Generation, bench decoder, prompts of {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens, "
        f"{args.new_tokens} new tokens, eos off, "
        "two generations per stream"
    )
    print(
        table(
            ["run", "streams", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "inter-token p50 ms", "p99 ms"], rows
        )
    )


if __name__ == "__main__":
    main()
