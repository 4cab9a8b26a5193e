"""Many concurrent generations from one asyncio client (one thread whatever their number), for
bench/generation.py's sampling and concurrency tables, and what the worker process holds
meanwhile: its threads, RSS and PSS (peaks sampled every 0.2 s from /proc)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class ProcessPeaks:
    """Peak threads, RSS and PSS of process ``pid`` while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.threads = 0
        self.rss_mib = 0.0
        self.pss_mib = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            self.sample()
            if self._done.wait(0.2):
                return

    def sample(self) -> None:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                self.threads = max(self.threads, int(line.split()[1]))
            elif line.startswith("VmRSS:"):
                self.rss_mib = max(self.rss_mib, int(line.split()[1]) / 1024)
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                self.pss_mib = max(self.pss_mib, int(line.split()[1]) / 1024)


def stream_load(
    address: str,
    jobs: list[tuple[list[int], str]],
    concurrency: int,
    new: int,
    sampling: dict | None = None,
    pid: int | None = None,
) -> dict:
    """``jobs`` (prompt ids, adapter) generated with at most ``concurrency`` open at once, from
    one asyncio client; ``sampling`` (temperature, top_p, top_k, seed base) or greedy."""
    peaks = ProcessPeaks(pid) if pid else None

    async def run() -> dict:
        from ortmux.client import AsyncClient

        first: list[float] = []
        gaps: list[float] = []
        count = 0
        pending = list(enumerate(jobs))
        async with AsyncClient(address, timeout=3600) as client:

            async def stream() -> None:
                nonlocal count
                while pending:
                    index, (ids, adapter) = pending.pop()
                    extra = {}
                    if sampling:
                        extra = {**sampling, "seed": sampling.get("seed", 0) + index}
                    started = time.perf_counter()
                    times = []
                    async for _chunk in client.generate(
                        "llm", input_ids=ids, adapter=adapter, max_new_tokens=new, **extra
                    ):
                        times.append(time.perf_counter())
                    first.append(times[0] - started)
                    gaps.extend(np.diff(times).tolist())
                    count += len(times)

            began = time.perf_counter()
            await asyncio.gather(*(stream() for _ in range(concurrency)))
            wall = time.perf_counter() - began
        return {
            "tokens_per_second": count / wall,
            "ttft_p50": percentile(first, 50) * 1000,
            "ttft_p99": percentile(first, 99) * 1000,
            "itl_p50": percentile(gaps, 50) * 1000,
            "itl_p99": percentile(gaps, 99) * 1000,
        }

    if peaks is None:
        return asyncio.run(run())
    with peaks:
        result = asyncio.run(run())
    return {**result, "threads": peaks.threads, "rss_mib": peaks.rss_mib, "pss_mib": peaks.pss_mib}
