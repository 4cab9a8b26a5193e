"""Helpers shared by the benchmarks: the bench base model, PSS, child processes, tables."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"  # generated models and caches, not committed
RESULTS = Path(__file__).resolve().parent / "results"  # plots shown in README

# About 97M parameters (390 MB of float32): attention, layer norm, GELU MLP, named weights.
BENCH_SHAPE = {"vocab": 8000, "d_model": 768, "heads": 12, "d_ff": 3072, "layers": 12}


def bench_model() -> Path:
    """The bench base as ONNX with external data under bench/out (generated once, not committed)."""
    import onnx

    from ortmux.worker.demo import TransformerShape, build_transformer

    path = OUT / "bench-base" / "model.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = build_transformer(TransformerShape(**BENCH_SHAPE))
        temp = path.with_name(".model.onnx.tmp")
        onnx.save_model(
            model, str(temp), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
        )
        temp.rename(path)
    return path


def model_mib() -> float:
    """Size of the bench base: graph plus external data."""
    path = bench_model()
    return sum(p.stat().st_size for p in path.parent.iterdir()) / (1 << 20)


def pss_mib() -> float:
    """Proportional set size of this process: shared pages divided among their users."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def pss_of(pid: int) -> float:
    """PSS of another process, in MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for process {pid}")


class WorkerProcess:
    """``ortmux serve`` in its own process, as in production; stopped with SIGTERM."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        import os
        import re
        import threading

        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ortmux.worker.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                *flags,
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.process.stderr is not None
        self.log: list[str] = []
        self.http_port: int | None = None  # with --http-port: the port the log names
        for line in self.process.stderr:
            self.log.append(line)
            http = re.search(r"HTTP on .*:(\d+)", line)
            if http:
                self.http_port = int(http.group(1))
            match = re.search(r"serving .* on port (\d+)", line)
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                break
        else:
            raise RuntimeError(f"worker exited with {self.process.wait()}: {''.join(self.log[-10:])}")
        # Keep reading its log, so a chatty worker never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def child(script: str, *args: str) -> dict:
    """Run ``script --child args`` in a fresh interpreter and return the JSON it prints last."""
    result = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def emit(values: dict) -> None:
    print(json.dumps(values), flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:.0f}"
    return str(value)
