"""Dynamic batching across requests and adapters, on the bench base with 64 rank-16 adapters.

    python bench/batching.py [--seconds 3] [--clients 1 8 32] [--repeats 3]

For each mode a worker runs in its own process (``ortmux serve``); N client threads each send
small requests (1 x 8 tokens) back to back, every request with a uniformly random adapter, for
``--seconds``. Modes: (a) batching off, (b) batches of one adapter only, (c) mixed-adapter
batches, (d) base-only requests with batching (the ceiling). Then fairness: one tenant floods
the queue from 16 threads while another sends one request at a time; its p50 against idle.
Last, in this process, where the time of one full mixed batch goes, against a base-only batch.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import LORA_MODULES, write_peft
from common import OUT, WorkerProcess, bench_model, median, table, timed

ADAPTERS = 64
MODES = {
    "a": ("batching off", ["--max-batch-size", "1"], True),
    "b": ("same-adapter batches only", ["--mix-adapters", "false"], True),
    "c": ("mixed-adapter batches", [], True),
    "d": ("base only, batching (ceiling)", [], False),
}


# Two tenants for the fairness part: the worker there runs with API keys.
TENANT_KEYS = {"flood": "flood-key", "light": "light-key"}


def load(
    target: str | list[str],
    clients: int,
    seconds: float,
    adapters: int,
    api_key: str | None = None,
    *,
    model: str = "bench",
    vocab: int = 8000,
    prefix: str = "a",
) -> tuple[float, list[float]]:
    """Requests per second and latencies (ms) of ``clients`` threads sending back to back, each
    request on a uniformly random adapter of ``a0`` .. ``a{adapters-1}`` (0: base-only)."""
    from ortmux.client import Client

    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    with Client(target, api_key=api_key) as client:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            ids = {"input_ids": np.random.default_rng(seed).integers(0, vocab, (1, 8), dtype=np.int64)}
            mine = []
            while time.monotonic() < stop:
                adapter = f"{prefix}{rng.randrange(adapters)}" if adapters else None
                started = time.perf_counter()
                client.infer(model, ids, adapter=adapter)
                mine.append((time.perf_counter() - started) * 1000)
            with lock:
                latencies.extend(mine)

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies


def start(work: Path, flags: list[str], api_keys: tuple[str | None, ...] = (None,)) -> WorkerProcess:
    """A worker with the 64 adapters registered for each caller of ``api_keys`` (None: no key)."""
    from ortmux.client import Client

    worker = WorkerProcess("--data-dir", str(work / "data"), "--model", f"bench={bench_model()}", *flags)
    for api_key in api_keys:
        with Client(worker.address, api_key=api_key) as client:
            registered = {a.adapter_id for a in client.list_adapters("bench")}
            for index in range(ADAPTERS):
                if f"a{index}" not in registered:
                    client.register_adapter(
                        "bench", f"a{index}", write_peft(work / "files" / f"a{index}", seed=index)
                    )
    return worker


def flood(address: str, done: threading.Event, count: list[int]) -> None:
    """The flood tenant sending from 16 threads until ``done``; ``count[0]`` counts answers."""
    from ortmux.client import Client

    ids = {"input_ids": np.zeros((1, 8), dtype=np.int64)}
    with Client(address, api_key=TENANT_KEYS["flood"]) as client:

        def spam() -> None:
            while not done.is_set():
                client.infer("bench", ids, adapter="a0")
                count[0] += 1

        threads = [threading.Thread(target=spam) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def distinct_adapters(model, rows: int) -> tuple[list, dict[str, np.ndarray]]:
    """A batch of ``rows`` 1 x 8 requests, each row its own random rank-16 adapter on the bench's
    48 projections: the row spans a run takes, and the inputs."""
    from ortmux.worker.engine.lora.feeds import Factors, LoraWeights, RowSpan
    from ortmux.worker.engine.lora.mapping import map_modules

    sites = map_modules(model.lora_sites, LORA_MODULES).values()  # what the bench's adapters target
    rng = np.random.default_rng(0)
    spans = [
        RowSpan(
            row,
            row + 1,
            Factors(
                {
                    site.call_group: LoraWeights(
                        a=rng.standard_normal((site.in_features, 16), dtype=np.float32) * 0.02,
                        b=rng.standard_normal((16, site.out_features), dtype=np.float32) * 0.02,
                    )
                    for site in sites
                }
            ),
        )
        for row in range(rows)
    ]
    return spans, {"input_ids": rng.integers(0, 8000, (rows, 8), dtype=np.int64)}


def mixed_batch_parts(work: Path, rows: int, runs: int = 5) -> None:
    """In-process, as the batcher runs them: a base-only batch of ``rows`` requests against one
    whose every row has its own rank-16 adapter on all 48 projections, split into gathering each
    row's LoRA factors into the run's inputs and the run itself. Medians of ``runs``."""
    from ortmux.worker.engine.cache import ModelCache
    from ortmux.worker.engine.lora.feeds import FeedBuffers, build_feeds
    from ortmux.worker.engine.registry import ModelRegistry
    from ortmux.worker.engine.runtime import RuntimeOptions, configure_process

    configure_process(0)
    registry = ModelRegistry(RuntimeOptions(providers=("CPUExecutionProvider",)), ModelCache(work / "cache"))
    model = registry.load("bench", bench_model())
    spans, inputs = distinct_adapters(model, rows)
    buffers = FeedBuffers()
    factor_bytes = sum(weights.nbytes for span in spans for weights in span.weights.values())

    def timed_ms(function) -> float:
        function()  # warm: buffers allocated, shapes seen
        return median([timed(function)[0] * 1000 for _ in range(runs)])

    base = timed_ms(lambda: model.run(inputs))
    gather = timed_ms(lambda: build_feeds(model.lora_inputs, rows, spans, buffers))
    mixed = timed_ms(lambda: model.run(inputs, lora_spans=spans, buffers=buffers))
    run = mixed - gather
    print(
        f"\nOne batch of {rows} requests (1x8 tokens), in-process, median of {runs}: "
        f"every row its own adapter ({factor_bytes / 1e6:.0f} MB of LoRA factors per batch)"
    )
    print(
        table(
            ["part", "ms", "x base-only batch"],
            [
                ["base-only batch (what (d) runs)", base, 1.0],
                ["mixed batch: gather each row's factors into the run's inputs", gather, gather / base],
                ["mixed batch: the run (base + per-row low-rank products)", run, run / base],
                ["mixed batch, all", mixed, mixed / base],
            ],
        )
    )
    print(f"Gathering moves {factor_bytes / gather / 1e6:.1f} GB/s; base-only / mixed = {base / mixed:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all modes; medians are shown")
    parser.add_argument("--only-parts", action="store_true", help="only the in-process batch breakdown")
    args = parser.parse_args()
    work = OUT / "batching-bench"
    if args.only_parts:
        mixed_batch_parts(work, max(args.clients))
        return
    samples: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for _round in range(args.repeats):  # modes interleaved, so drift of the machine hits them alike
        for mode, (_label, flags, use_adapters) in MODES.items():
            worker = start(work, flags)
            try:
                load(
                    worker.address, 4, 1.0, ADAPTERS if use_adapters else 0
                )  # warm up every batch shape a little
                for clients in args.clients:
                    rate, latencies = load(
                        worker.address, clients, args.seconds, ADAPTERS if use_adapters else 0
                    )
                    samples.setdefault((mode, clients), []).append(
                        (rate, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)))
                    )
            finally:
                worker.stop()
    results = {
        key: tuple(float(np.median(column)) for column in zip(*runs, strict=True))
        for key, runs in samples.items()
    }
    rows = []
    for clients in args.clients:
        for mode, (label, _flags, _adapters) in MODES.items():
            rate, p50, p99 = results[(mode, clients)]
            rows.append([clients, f"({mode}) {label}", rate, p50, p99, rate / results[("a", clients)][0]])
    print(
        "Throughput and latency, bench base, 64 rank-16 adapters, 1x8-token requests, "
        f"{args.seconds:.0f} s per point, median of {args.repeats} rounds"
    )
    print(table(["clients", "mode", "requests/s", "p50 ms", "p99 ms", "x (a)"], rows))
    top = max(args.clients)
    print(
        f"\nAt {top} clients: (c) / (a) = {results[('c', top)][0] / results[('a', top)][0]:.2f}, "
        f"(c) / (d) = {results[('c', top)][0] / results[('d', top)][0]:.2f}"
    )

    from ortmux.worker.auth import key_digest

    keys = [
        flag
        for tenant, key in TENANT_KEYS.items()
        for flag in ("--api-keys", f"{key_digest(key)}:{tenant}:tenant")
    ]
    fairness_rows = []
    for cap in (0, 1):
        worker = start(work, ["--fair-share-rows", str(cap), *keys], tuple(TENANT_KEYS.values()))
        try:
            _rate, idle = load(worker.address, 1, args.seconds, ADAPTERS, TENANT_KEYS["light"])
            flood_done = threading.Event()
            flood_count = [0]
            flooder = threading.Thread(target=flood, args=(worker.address, flood_done, flood_count))
            flooder.start()
            time.sleep(1.0)
            counted = flood_count[0]
            _rate, busy = load(worker.address, 1, args.seconds, ADAPTERS, TENANT_KEYS["light"])
            flood_rate = (flood_count[0] - counted) / args.seconds
            flood_done.set()
            flooder.join()
        finally:
            worker.stop()
        idle_p50, busy_p50 = float(np.percentile(idle, 50)), float(np.percentile(busy, 50))
        label = "no cap (default)" if cap == 0 else f"--fair-share-rows {cap}"
        fairness_rows.append([label, idle_p50, busy_p50, busy_p50 / idle_p50, flood_rate])
    print("\nFairness: tenant 'flood' sends from 16 threads; tenant 'light' one request at a time (API keys)")
    print(
        table(
            ["setting", "other p50 idle ms", "other p50 in flood ms", "x idle", "flood requests/s"],
            fairness_rows,
        )
    )
    mixed_batch_parts(work, max(args.clients))


if __name__ == "__main__":
    main()
