"""Many pods, one service: adapter-affinity routing against round-robin, and the first request of
an adapter by where it lives.

    python bench/scale_out.py [--seconds 20] [--clients 16] [--adapters 300]

Three workers (``ortmux serve`` processes) on the demo model share one store, a real S3 server
(``rclone serve s3``). 300 adapters are registered; each pod's adapter memory budget holds 120 of
them (a third plus headroom for an uneven hash). Client threads send requests on uniformly random
adapters, once through a client with every pod as targets (adapter affinity) and once through
one gRPC channel balancing round-robin over the same pods, each on freshly started pods after a
warm-up of ``--warmup`` seconds. Evictions and reloads come from the pods' metrics.

Then the first request of an adapter by where it lives, on the demo model and on the bench base
(rank-16 adapters on 48 projections): resident in memory, on the pod's disk only (evicted from
memory), and in the store only (registered through another pod, never seen by this one).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the S3 server, demo adapters

from adapters import write_peft as write_bench_peft
from batching import load
from common import OUT, WorkerProcess, bench_model, median, table

from tests.demo_adapters import write_peft as write_demo_peft
from tests.s3_server import S3Server, free_port

DEMO_RESIDENT_BYTES = 18432  # one demo adapter in memory (rank 4 on three projections, rank bucket 4)


class Pod:
    def __init__(self, work: Path, store: S3Server, prefix: str, *flags: str) -> None:
        self.metrics_port = free_port()
        self.worker = WorkerProcess(
            "--data-dir",
            str(work),
            "--cache-dir",
            str(OUT / "scale-out" / "model-cache"),
            "--adapter-store",
            store.url(prefix),
            "--metrics-port",
            str(self.metrics_port),
            *flags,
            env=store.env,
        )
        self.address = self.worker.address

    def metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        )

    def stop(self) -> None:
        self.worker.stop()


def start_pods(work: Path, store: S3Server, prefix: str, count: int, *flags: str) -> list[Pod]:
    shutil.rmtree(work, ignore_errors=True)
    return [Pod(work / f"pod{index}", store, prefix, *flags) for index in range(count)]


def drive(target: str | list[str], clients: int, seconds: float, adapters: int) -> tuple[float, list[float]]:
    """Requests/s and latencies (ms) of ``clients`` threads on uniformly random adapters."""
    return load(target, clients, seconds, adapters, model="demo", vocab=1000, prefix="s")


def routing(args: argparse.Namespace, store: S3Server, work: Path) -> list[list[object]]:
    from ortmux.client import Client

    budget = ["--adapter-memory-bytes", str(120 * DEMO_RESIDENT_BYTES)]
    pods = start_pods(work / "register", store, "routing", 1)
    try:
        with Client(pods[0].address) as client:
            known = {info.adapter_id for info in client.list_adapters("demo")}
            for index in range(args.adapters):
                if f"s{index}" not in known:
                    client.register_adapter(
                        "demo", f"s{index}", write_demo_peft(work / "files" / f"s{index}", seed=index)
                    )
    finally:
        for pod in pods:
            pod.stop()
    rows = []
    for mode in ("affinity", "round-robin"):
        pods = start_pods(work / mode, store, "routing", 3, *budget)
        try:
            addresses = [pod.address for pod in pods]
            target = addresses if mode == "affinity" else "ipv4:" + ",".join(addresses)
            drive(target, args.clients, args.warmup, args.adapters)
            before = [
                (pod.metric("ortmux_adapter_evictions_total"), pod.metric("ortmux_adapter_reloads_total"))
                for pod in pods
            ]
            rps, latencies = drive(target, args.clients, args.seconds, args.adapters)
            after = [
                (pod.metric("ortmux_adapter_evictions_total"), pod.metric("ortmux_adapter_reloads_total"))
                for pod in pods
            ]
            evictions = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
            reloads = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
            resident = sum(pod.metric("ortmux_adapters_resident") for pod in pods)
            per_pod = [int(pod.metric("ortmux_adapters_resident")) for pod in pods]
            requests = len(latencies)
            rows.append(
                [
                    mode,
                    rps,
                    float(np.percentile(latencies, 50)),
                    float(np.percentile(latencies, 99)),
                    1000 * evictions / requests,
                    1000 * reloads / requests,
                    f"{int(resident)} ({'/'.join(map(str, per_pod))})",
                ]
            )
        finally:
            for pod in pods:
                pod.stop()
    return rows


def first_requests(
    store: S3Server,
    work: Path,
    model: str,
    flags: list[str],
    writer,
    ids: np.ndarray,
    samples: int,
    resident_bytes: int,
) -> list[object]:
    """Median ms of a request on an adapter resident, on local disk only, and in the store only."""
    from ortmux.client import Client

    prefix = f"first-{model}-{time.time_ns()}"
    budget = ["--adapter-memory-bytes", str(int(resident_bytes * 1.5))]
    pods = start_pods(work / f"first-{model}", store, prefix, 2, *flags, *budget)
    timings: dict[str, list[float]] = {"resident": [], "local disk only": [], "store only": []}
    try:
        serving, registering = (Client(pod.address, timeout=300) for pod in pods)
        feed = {"input_ids": ids}

        def timed_infer(adapter: str) -> float:
            started = time.perf_counter()
            serving.infer(model, feed, adapter=adapter)
            return (time.perf_counter() - started) * 1000

        files = [writer(work / f"files-{model}" / f"f{index}", index) for index in range(samples + 1)]
        for index in range(samples + 1):
            registering.register_adapter(model, f"f{index}", files[index])
        serving.infer(model, feed)  # the base warm
        timed_infer("f0")
        for index in range(1, samples + 1):
            timings["store only"].append(timed_infer(f"f{index}"))
            timings["resident"].append(timed_infer(f"f{index}"))
            timed_infer(f"f{index - 1}")  # takes the memory budget: f{index} leaves memory, stays on disk
            timings["local disk only"].append(timed_infer(f"f{index}"))
        serving.close()
        registering.close()
    finally:
        for pod in pods:
            pod.stop()
    resident = median(timings["resident"])
    return [
        model,
        resident,
        median(timings["local disk only"]),
        median(timings["store only"]),
        median(timings["store only"]) / resident,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=300)
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args()
    work = OUT / "scale-out"
    store_root = work / "s3"
    shutil.rmtree(store_root, ignore_errors=True)
    store = S3Server(store_root)
    store.start()
    try:
        rows = routing(args, store, work)
        print(
            f"\nThree pods, {args.adapters} adapters, memory for 120 per pod, {args.clients} clients on "
            f"random adapters, {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up (demo model)"
        )
        print(
            table(
                [
                    "routing",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "evictions / 1k req",
                    "reloads / 1k req",
                    "resident (per pod)",
                ],
                rows,
            )
        )
        demo_ids = np.random.default_rng(0).integers(0, 1000, (1, 8), dtype=np.int64)
        bench_ids = np.random.default_rng(0).integers(0, 8000, (1, 8), dtype=np.int64)
        first = [
            first_requests(
                store,
                work,
                "demo",
                [],
                lambda d, i: write_demo_peft(d, seed=i),
                demo_ids,
                args.samples,
                DEMO_RESIDENT_BYTES,
            ),
            first_requests(
                store,
                work,
                "bench",
                ["--model", f"bench={bench_model()}"],
                lambda d, i: write_bench_peft(d, seed=i),
                bench_ids,
                max(args.samples // 2, 5),
                48 * 16 * 1536 * 4,
            ),
        ]
        print(
            "\nFirst request of an adapter by where it lives (1 x 8 tokens), "
            f"medians of {args.samples} adapters"
        )
        print(table(["model", "resident", "local disk only", "store only", "store only x resident"], first))
    finally:
        store.stop()


if __name__ == "__main__":
    main()
