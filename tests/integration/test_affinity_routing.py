"""Adapter-affinity routing in the thin client: each adapter's calls go to one pod, base-only calls
spread, a pod that leaves moves only its share, and a failing pod's calls go to the next."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import AsyncClient, Client, OrtmuxError
from ortmux.client._routing import ADAPTER_HEADER, MODEL_HEADER, Pods, rank
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import worker_settings
from ..demo_adapters import write_peft
from ..s3_server import S3Server, free_port

IDS = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}


def adapters_on_every_pod(workers: list[Worker], per_pod: int = 4) -> list[str]:
    """Adapter ids of which rendezvous ranks ``per_pod`` first on each pod (ports are random)."""
    addresses = [worker.address for worker in workers]
    chosen: dict[str, list[str]] = {address: [] for address in addresses}
    for index in range(10_000):
        name = f"tenant-task-{index}"
        home = rank(addresses, f"demo/{name}")[0]
        if len(chosen[home]) < per_pod:
            chosen[home].append(name)
        if all(len(names) == per_pod for names in chosen.values()):
            break
    return sorted(name for names in chosen.values() for name in names)


def test_rendezvous_moves_only_the_share_of_a_pod_that_leaves_and_spreads_evenly() -> None:
    pods = [f"10.0.0.{index}:50051" for index in range(4)]
    keys = [f"demo/adapter-{index}" for index in range(4000)]
    before = {key: rank(pods, key)[0] for key in keys}
    shares = collections.Counter(before.values())
    assert all(800 <= count <= 1200 for count in shares.values()), shares
    after = {key: rank(pods[:3], key)[0] for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert all(before[key] == pods[3] for key in moved)
    assert len(moved) == shares[pods[3]]
    # Base-only calls take the pods in turn.
    turns = Pods(pods)
    assert collections.Counter(turns.order(None, 1)[0] for _ in range(400)) == {pod: 100 for pod in pods}


@pytest.fixture()
def pods_over_s3(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[Worker]]:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    flags = ["--adapter-store", s3_server.url(uuid.uuid4().hex[:8]), "--cache-dir", str(tmp_path / "cache")]
    workers = [start_worker(worker_settings(tmp_path / f"pod{index}", *flags)) for index in range(3)]
    yield workers
    for worker in workers:
        worker.stop(0)


def resident_on(workers: list[Worker], adapter: str) -> list[int]:
    """Indexes of the pods that hold ``adapter`` in memory."""
    found = []
    for index, worker in enumerate(workers):
        if worker.port and not worker._stopped.is_set():
            infos = {info.adapter_id: info for info in worker.dataplane.adapters.list("demo")}
            if adapter in infos and infos[adapter].resident:
                found.append(index)
    return found


def test_each_adapter_stays_on_one_pod_and_a_failing_pod_hands_its_share_on(
    pods_over_s3: list[Worker], tmp_path: Path
) -> None:
    workers = pods_over_s3
    adapters = adapters_on_every_pod(workers)
    peft = write_peft(tmp_path / "peft", seed=50)
    with Client([worker.address for worker in workers], retry_attempts=3) as client:
        for adapter in adapters:
            client.register_adapter("demo", adapter, peft)
        expected = client.infer("demo", IDS, adapter=adapters[0])["logits"]
        for _ in range(4):
            for adapter in adapters:
                np.testing.assert_allclose(
                    client.infer("demo", IDS, adapter=adapter)["logits"], expected, rtol=1e-5
                )
        homes = {adapter: resident_on(workers, adapter) for adapter in adapters}
        addresses = [worker.address for worker in workers]
        expected_homes = {a: [addresses.index(rank(addresses, f"demo/{a}")[0])] for a in adapters}
        assert homes == expected_homes  # resident on its own pod only, and every pod has some
        for _ in range(30):
            client.infer("demo", IDS)
        rows = [sum(batcher.counters.rows for batcher in worker.dataplane.batchers()) for worker in workers]
        assert all(count > 10 for count in rows), rows

        leaving = homes[adapters[0]][0]
        workers[leaving].stop(0)
        for adapter in adapters:  # all still answer: the next pod in each order takes over
            np.testing.assert_allclose(
                client.infer("demo", IDS, adapter=adapter)["logits"], expected, rtol=1e-5
            )
        for adapter, home in homes.items():
            now = resident_on(workers, adapter)
            if home[0] != leaving:
                assert now == home, (adapter, home, now)  # only the leaving pod's share moved
            else:
                assert len(now) == 1 and now[0] != leaving, (adapter, now)


def test_the_asyncio_client_routes_like_the_blocking_one(pods_over_s3: list[Worker], tmp_path: Path) -> None:
    workers = pods_over_s3
    adapters = adapters_on_every_pod(workers, per_pod=2)
    peft = write_peft(tmp_path / "peft", seed=51)
    targets = [worker.address for worker in workers]
    with Client(targets) as client:
        for adapter in adapters[:6]:
            client.register_adapter("demo", adapter, peft)
        homes = {adapter: resident_on(workers, adapter) for adapter in adapters[:6]}

    async def run() -> None:
        async with AsyncClient(targets) as client:
            for adapter in adapters[:6]:
                for _ in range(3):
                    await client.infer("demo", IDS, adapter=adapter)

    asyncio.run(run())
    assert {adapter: resident_on(workers, adapter) for adapter in adapters[:6]} == homes


class _Recorder(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        self.metadata.append(dict(handler_call_details.invocation_metadata))
        return None  # UNIMPLEMENTED


def test_calls_carry_the_adapter_in_headers_for_proxies_and_dns_names_resolve() -> None:
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[recorder])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for target in (f"127.0.0.1:{port}", f"dns:///127.0.0.1:{port}"):
            with Client(target, retry_attempts=1) as client, pytest.raises(OrtmuxError):
                client.infer("demo", IDS, adapter="acme-summarize")
            assert recorder.metadata[-1][ADAPTER_HEADER] == "acme-summarize"
            assert recorder.metadata[-1][MODEL_HEADER] == "demo"
            with Client(target, retry_attempts=1) as client, pytest.raises(OrtmuxError):
                client.infer("demo", IDS)
            assert ADAPTER_HEADER not in recorder.metadata[-1]
    finally:
        server.stop(0)


def test_a_target_with_no_live_pod_fails_unavailable_after_trying_each() -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    with Client(dead, retry_attempts=3, timeout=5) as client, pytest.raises(OrtmuxError) as caught:
        client.infer("demo", IDS, adapter="x")
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
