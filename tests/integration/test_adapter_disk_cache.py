"""The shared store's object layer against a real S3 server, and a pod's disk as a bounded cache of
the store (an in-process worker, so its metrics can be read)."""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.worker.adapters.object_store import Conflict, S3Objects, StoreUnavailable
from ortmux.worker.api.server import start_worker

from ..conftest import scrape, worker_settings
from ..demo_adapters import merged_reference, write_peft
from ..s3_server import S3Server, free_port

IDS = np.random.default_rng(4).integers(0, 1000, size=(1, 8), dtype=np.int64)


@pytest.fixture()
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


def test_object_layer_reads_writes_lists_and_reports_failures(aws_env: S3Server, tmp_path: Path) -> None:
    objects = S3Objects(aws_env.url(uuid.uuid4().hex[:8]))
    assert objects.get("missing") is None
    objects.put("a/1", b"one")
    objects.put("a/2", b"two")
    (tmp_path / "payload").write_bytes(b"x" * 3_000_000)
    objects.put_file("b/big", tmp_path / "payload")
    assert objects.get("a/1")[0] == b"one"
    chunks: list[bytes] = []
    assert objects.read_into("b/big", chunks.append) == 3_000_000 and b"".join(chunks) == b"x" * 3_000_000
    assert objects.read_into("b/none", chunks.append) is None
    assert [info.key for info in objects.list("a/")] == ["a/1", "a/2"]
    assert [info.key for info in objects.list("a/", start_after="a/1")] == ["a/2"]
    with contextlib.suppress(Conflict):  # honoured by AWS S3 and MinIO; rclone ignores it
        objects.put("a/1", b"again", if_absent=True)
    objects.delete("a/1")
    objects.delete("a/1")  # deleting what is gone is no error
    assert objects.get("a/1") is None
    operations, received, sent = objects.counters.snapshot()
    assert operations["put"].requests >= 3 and received >= 3_000_000 and sent >= 3_000_006


def test_bad_credentials_and_an_unreachable_store_are_store_unavailable(
    aws_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreUnavailable, match=r"SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied|403"):
        S3Objects(aws_env.url("x")).get("key")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreUnavailable, match="reading key failed"):
        S3Objects(aws_env.url("x"), timeout_seconds=1, attempts=1).get("key")


def test_the_disk_cache_stays_within_its_bound_and_refills_from_the_store(
    aws_env: S3Server, tmp_path: Path
) -> None:
    adapters = [write_peft(tmp_path / f"peft{index}", seed=40 + index) for index in range(6)]
    size = sum(p.stat().st_size for p in adapters[0].iterdir())
    flags = [
        "--adapter-store",
        aws_env.url(uuid.uuid4().hex[:8]),
        "--adapter-disk-bytes",
        str(2 * size + size // 2),  # two adapters' payloads
        "--adapter-memory-bytes",
        "20000",  # about one adapter resident
    ]
    worker = start_worker(worker_settings(tmp_path / "data", *flags))
    try:
        with Client(worker.address, retry_attempts=1) as client:
            for index, directory in enumerate(adapters):
                client.register_adapter("demo", f"cached-{index}", directory)
            root = tmp_path / "data" / "adapters"

            def on_disk() -> int:
                return sum(p.stat().st_size for p in root.glob("demo/default/*/payload"))

            for _ in range(2):
                for index, directory in enumerate(adapters):
                    got = client.infer("demo", {"input_ids": IDS}, adapter=f"cached-{index}")["logits"]
                    np.testing.assert_allclose(got, merged_reference(directory, IDS), rtol=1e-4, atol=1e-4)
                    assert on_disk() <= 2 * size + size // 2 + size  # + the resident one, which stays
            metrics = scrape(worker)
            assert metrics[("ortmux_adapter_disk_misses_total", ())] >= 6
            assert metrics[("ortmux_adapter_disk_evictions_total", ())] >= 6
            assert metrics[("ortmux_adapter_disk_bytes", ())] == on_disk()
            assert metrics[("ortmux_adapter_store_requests_total", (("operation", "get"),))] >= 6
            assert metrics[("ortmux_adapter_store_bytes_total", (("direction", "received"),))] >= 6 * size
            assert metrics[("ortmux_adapter_store_request_seconds_count", (("operation", "put"),))] >= 12
            assert metrics[("ortmux_adapters_registered", ())] == 6
    finally:
        worker.stop(0)


def test_lookups_of_unknown_ids_are_rate_limited_per_tenant(aws_env: S3Server, tmp_path: Path) -> None:
    flags = ["--adapter-store", aws_env.url(uuid.uuid4().hex[:8]), "--adapter-store-lookups-per-second", "3"]
    worker = start_worker(worker_settings(tmp_path / "data", *flags))
    try:
        with Client(worker.address, retry_attempts=1) as client:
            codes = []
            started = time.monotonic()
            for index in range(8):
                try:
                    client.infer("demo", {"input_ids": IDS}, adapter=f"nobody-{index}")
                except OrtmuxError as exc:
                    codes.append((exc.code, exc.reason))
            elapsed = time.monotonic() - started
            # A bucket of 3, refilled at 3 a second while the 8 lookups ran (slow on a busy machine).
            looked_up = codes.count((grpc.StatusCode.NOT_FOUND, "NOT_FOUND"))
            assert 3 <= looked_up <= 3 + math.floor(elapsed * 3), (codes, elapsed)
            refused = codes.count((grpc.StatusCode.RESOURCE_EXHAUSTED, "ADAPTER_LOOKUPS"))
            assert looked_up + refused == 8, codes
            client.infer("demo", {"input_ids": IDS})
    finally:
        worker.stop(0)
