"""The scenarios of bench/generation.py, each on a worker of its own with its rounds interleaved:
greedy against sampled (``--sampling``), many open streams (``--concurrency``), prompts sharing a
start (``--prefix``) and a long prompt among short ones (``--long-among-short``)."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from common import OUT
from generation_load import stream_load
from generation_setup import DECODER, DECODER_128K, jobs_of, load_cells, ready, serve, vocab_of, without_eos

SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # top-p over the whole vocabulary: the costly path


def sampling_rows(args: argparse.Namespace, adapters: list[str]) -> list[list[str]]:
    """Greedy and sampled generation at 32 streams, side by side on one worker per decoder (the
    bench decoder, and its 128k-vocabulary variant when made), rounds interleaved."""
    rows = []
    decoders = [DECODER] + ([DECODER_128K] if (DECODER_128K / "onnx" / "model.onnx").is_file() else [])
    for decoder in decoders:
        model_dir = without_eos(decoder / "onnx", OUT / f"{decoder.name}-no-eos")
        vocab = vocab_of(model_dir)
        worker = serve(model_dir, OUT / f"gen-data-{decoder.name}", [])
        try:
            ready(worker.address, decoder, adapters)
            jobs = jobs_of(32, adapters, tuple(args.prompt_tokens), vocab=vocab)
            rates: dict[str, list[dict]] = {"greedy": [], "sampled": []}
            for _round in range(args.rounds):
                for mode in rates:
                    sampling = SAMPLED if mode == "sampled" else None
                    rates[mode].append(stream_load(worker.address, jobs, 32, args.new_tokens, sampling))
            greedy = float(np.median([r["tokens_per_second"] for r in rates["greedy"]]))
            for mode, results in rates.items():
                rate = float(np.median([r["tokens_per_second"] for r in results]))
                itl = float(np.median([r["itl_p50"] for r in results]))
                rows.append([f"{vocab:,}", mode, f"{rate:.1f}", f"{itl:.1f}", f"{rate / greedy:.3f}"])
                print(rows[-1], flush=True)
        finally:
            worker.stop()
    return rows


def concurrency_rows(args: argparse.Namespace, adapters: list[str]) -> list[list[str]]:
    """1 to 1,000 concurrent streams on one worker, one generation each (at least 4), from one
    asyncio client: tokens/s, TTFT, ITL and the worker's peak threads, RSS and PSS."""
    model_dir = without_eos(DECODER / "onnx", OUT / "decoder-no-eos")
    worker = serve(model_dir, OUT / "gen-data-concurrency", ["--max-queue-size", "4096"])
    rows = []
    try:
        ready(worker.address, DECODER, adapters)
        for streams in args.concurrency:
            jobs = jobs_of(streams, adapters, tuple(args.prompt_tokens), count=max(streams, 4))
            result = stream_load(worker.address, jobs, streams, args.sweep_new_tokens, pid=worker.pid)
            rows.append(
                [
                    str(streams),
                    *load_cells(result),
                    str(result["threads"]),
                    f"{result['rss_mib']:.0f}",
                    f"{result['pss_mib']:.0f}",
                ]
            )
            print(rows[-1], flush=True)
    finally:
        worker.stop()
    return rows


def prefix_rows(args: argparse.Namespace, adapters: list[str]) -> list[list[str]]:
    """16 streams on one adapter whose prompts share a 1,024-token start (and end in 16 tokens of
    their own), against 16 unique prompts of the same length, rounds interleaved on one worker:
    the time to finish all and the time to first token."""
    model_dir = without_eos(DECODER / "onnx", OUT / "decoder-no-eos")
    worker = serve(model_dir, OUT / "gen-data-prefix", [])
    rows = []
    try:
        ready(worker.address, DECODER, adapters)
        adapter = adapters[0]
        results: dict[str, list[dict]] = {"unique prompts": [], "a shared 1,024-token start": []}
        for round_ in range(args.rounds):
            rng = np.random.default_rng(round_)  # fresh prompts each round: nothing cached before
            shared = rng.integers(3, 32000, size=1024).tolist()
            kinds = {
                "unique prompts": [rng.integers(3, 32000, size=1040).tolist() for _ in range(16)],
                "a shared 1,024-token start": [
                    shared + rng.integers(3, 32000, size=16).tolist() for _ in range(16)
                ],
            }
            for kind, prompts in kinds.items():
                jobs = [(prompt, adapter) for prompt in prompts]
                began = time.perf_counter()
                result = stream_load(worker.address, jobs, 16, args.new_tokens)
                results[kind].append({**result, "wall": time.perf_counter() - began})
        unique = results["unique prompts"]
        for kind, measured in results.items():
            wall = float(np.median([r["wall"] for r in measured]))
            ttft = float(np.median([r["ttft_p50"] for r in measured]))
            base_wall = float(np.median([r["wall"] for r in unique]))
            base_ttft = float(np.median([r["ttft_p50"] for r in unique]))
            rows.append(
                [kind, f"{wall:.2f}", f"{base_wall / wall:.2f}", f"{ttft:.0f}", f"{base_ttft / ttft:.2f}"]
            )
            print(rows[-1], flush=True)
    finally:
        worker.stop()
    return rows


def long_among_short_rows(args: argparse.Namespace, adapters: list[str]) -> list[list[str]]:
    """31 streams of 64-token prompts alone, and the same 31 while one stream with a 1,536-token
    prompt runs beside them, rounds interleaved on one worker: the 31 short streams' tokens/s."""
    from ortmux.client import Client

    model_dir = without_eos(DECODER / "onnx", OUT / "decoder-no-eos")
    worker = serve(model_dir, OUT / "gen-data-long", [])
    alone_kind, mixed_kind = "31 short streams alone", "the same 31 and one 1,536-token prompt"
    rates: dict[str, list[dict]] = {alone_kind: [], mixed_kind: []}
    try:
        ready(worker.address, DECODER, adapters)
        for round_ in range(args.rounds):
            rng = np.random.default_rng(round_)
            short = [
                (rng.integers(3, 32000, size=64).tolist(), adapters[i % len(adapters)]) for i in range(31)
            ]
            for kind in rates:
                long_stream = None
                if kind == mixed_kind:
                    ids = rng.integers(3, 32000, size=1536).tolist()

                    def run_long(ids: list[int] = ids) -> None:
                        with Client(worker.address, timeout=600) as client:
                            list(
                                client.generate("llm", input_ids=ids, adapter=adapters[0], max_new_tokens=128)
                            )

                    long_stream = threading.Thread(target=run_long)
                    long_stream.start()
                rates[kind].append(stream_load(worker.address, short, 31, args.new_tokens))
                if long_stream is not None:
                    long_stream.join()
    finally:
        worker.stop()
    alone = float(np.median([r["tokens_per_second"] for r in rates[alone_kind]]))
    rows = []
    for kind, measured in rates.items():
        rate = float(np.median([r["tokens_per_second"] for r in measured]))
        itl = float(np.median([r["itl_p50"] for r in measured]))
        rows.append([kind, f"{rate:.1f}", f"{itl:.1f}", f"{rate / alone:.2f}"])
        print(rows[-1], flush=True)
    return rows
