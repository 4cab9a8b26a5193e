"""A real Prometheus server scrapes a running worker; its query API sees the request counter."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker


def _prometheus_binary() -> str:
    """The Debian package's server, installed here when it is missing (the tests run as root)."""
    found = shutil.which("prometheus")
    if found:
        return found
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
        subprocess.run(install, capture_output=True, check=True)
    found = shutil.which("prometheus")
    assert found, "apt-get installed prometheus, but it is not on PATH"
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def prometheus(worker: Worker, tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: ortmux\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{worker.metrics_port}']\n"
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            _prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]["result"]
    except OSError:
        return []  # not listening yet


def test_prometheus_scrapes_the_request_counter(
    prometheus: str, worker: Worker, token_ids: np.ndarray
) -> None:
    with Client(worker.address) as client:
        for _ in range(5):
            client.infer("demo", {"input_ids": token_ids})
    promql = 'sum(ortmux_requests_total{model="demo",code="OK"})'
    deadline = time.monotonic() + 60
    while True:
        result = _query(prometheus, promql)
        if result and float(result[0]["value"][1]) >= 5:
            break
        assert time.monotonic() < deadline, f"Prometheus never saw 5 requests: {result}"
        time.sleep(0.5)
    up = _query(prometheus, 'up{job="ortmux"}')
    assert up and up[0]["value"][1] == "1"
