"""Memory stays bounded and a full disk is answered clearly, on real worker processes."""

from __future__ import annotations

import hashlib
import logging
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.v1 import adapters_pb2, adapters_pb2_grpc
from ortmux.worker.api.server import start_worker

from ..conftest import pss_bytes, serve_process, small_tmpfs, worker_settings
from ..demo_adapters import merged_reference, write_peft

ALL_MODULES = tuple(
    f"layers.{layer}.{module}"
    for layer in (0, 1)
    for module in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
)
MiB = 1 << 20


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def test_feed_memory_stays_within_its_bound_under_every_batch_size(tmp_path: Path) -> None:
    """Rank-64 adapters on every projection, batches of every size from 1 to 32 rows, mixing
    adapters: the worker's PSS grows by at most the feed bound (each size kept its own arrays
    before, ~600 MB here)."""
    bound = 64 * MiB
    process, address = serve_process(tmp_path / "data", "--feed-memory-bytes", str(bound))
    try:
        with Client(address, timeout=60) as client:
            for index in range(3):
                directory = write_peft(tmp_path / f"a{index}", rank=64, seed=index, modules=ALL_MODULES)
                client.register_adapter("demo", f"a{index}", directory)
            rng = np.random.default_rng(0)

            def load(rows_list: list[int], adapter: str) -> None:
                for rows in rows_list:
                    ids = rng.integers(0, 1000, (rows, 8), dtype=np.int64)
                    client.infer("demo", {"input_ids": ids}, adapter=adapter)

            load([1, 32], "a0")  # warm: the largest arrays once, ORT's buffers for both ends
            before = pss_bytes(process.pid)
            for _round in range(2):
                threads = [
                    threading.Thread(target=load, args=(list(range(1, 33))[index::3], f"a{index}"))
                    for index in range(3)
                ] + [threading.Thread(target=load, args=(list(range(32, 0, -1)), ""))]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            grown = pss_bytes(process.pid) - before
        # Beyond the bound: ONNX Runtime's buffers for new shapes and the heap the runs take anew
        # (the worker hands the heap freed by loading back to the system, so runs cannot reuse it).
        assert grown <= bound + 48 * MiB, (
            f"PSS grew {grown / MiB:.0f} MiB under a {bound / MiB:.0f} MiB bound"
        )
    finally:
        _stop(process)


def _upload_messages(
    directory: Path, adapter_id: str, paused: threading.Barrier, release: threading.Event, corrupt: bool
) -> Iterator[adapters_pb2.RegisterAdapterRequest]:
    """A PEFT directory as back-to-back files, all but its last chunk sent before it pauses."""
    files = [directory / "adapter_config.json", directory / "adapter_model.safetensors"]
    payload = b"".join(path.read_bytes() for path in files)
    header = adapters_pb2.AdapterUploadHeader(
        model="demo",
        adapter_id=adapter_id,
        total_bytes=len(payload),
        files=[adapters_pb2.UploadFile(name=p.name, size_bytes=p.stat().st_size) for p in files],
    )
    yield adapters_pb2.RegisterAdapterRequest(header=header)
    chunks = [payload[start : start + MiB] for start in range(0, len(payload), MiB)]
    for chunk in chunks[:-1]:
        yield adapters_pb2.RegisterAdapterRequest(chunk=chunk)
    paused.wait(60)
    release.wait(60)
    yield adapters_pb2.RegisterAdapterRequest(chunk=chunks[-1])
    digest = hashlib.sha256(payload).hexdigest()
    if corrupt:
        digest = ("0" if digest[0] != "0" else "1") + digest[1:]
    yield adapters_pb2.RegisterAdapterRequest(trailer=adapters_pb2.AdapterUploadTrailer(sha256=digest))


def test_concurrent_uploads_stay_within_the_upload_memory(tmp_path: Path) -> None:
    """Eight ~19 MB uploads in flight at once against a 4 MiB upload memory: the worker holds no
    more than that (the rest go to their staging files), valid ones land whole, corrupt ones fail
    cleanly, and nothing is left in staging."""
    data_dir = tmp_path / "data"
    process, address = serve_process(data_dir, "--upload-memory-bytes", str(4 * MiB))
    count = 8
    directories = [
        write_peft(tmp_path / f"big{index}", rank=1024, seed=index, modules=ALL_MODULES)
        for index in range(count)
    ]
    try:
        with Client(address, timeout=60) as client:
            client.infer("demo", {"input_ids": np.ones((1, 4), np.int64)})  # warm
            before = pss_bytes(process.pid)
            paused, release = threading.Barrier(count + 1), threading.Event()
            with grpc.insecure_channel(address) as channel:
                stub = adapters_pb2_grpc.AdapterServiceStub(channel)
                calls = [
                    stub.RegisterAdapter.future(
                        _upload_messages(directory, f"big{index}", paused, release, corrupt=index % 2 == 1),
                        timeout=120,
                    )
                    for index, directory in enumerate(directories)
                ]
                paused.wait(60)
                staging = data_dir / "adapters" / ".staging"
                sizes = [sum(p.stat().st_size for p in d.iterdir()) for d in directories]
                expected = sum(size - (size % MiB or MiB) for size in sizes)  # all but the last chunks
                for _ in range(600):  # every byte sent so far has reached the staging files
                    staged = sum(p.stat().st_size for p in staging.rglob("payload"))
                    if staged >= expected:
                        break
                    release.wait(0.1)
                held = pss_bytes(process.pid) - before
                release.set()
                outcomes = []
                for call in calls:
                    try:
                        call.result()
                        outcomes.append("ok")
                    except grpc.RpcError as error:
                        outcomes.append(error.code())
            # gRPC's own buffers and threads cost ~20 MiB plus 5-10 MiB per open stream here (its
            # receive windows grow with its bandwidth probe), whatever the payload; the payloads
            # themselves (8 x 18 MiB received, 144 MiB) must not be held.
            allowance = 4 * MiB + 24 * MiB + count * 12 * MiB
            assert held <= allowance, (
                f"uploads held {held / MiB:.0f} MiB (allowed {allowance / MiB:.0f}); "
                f"{staged} of {expected} bytes staged"
            )
            assert outcomes == ["ok", grpc.StatusCode.INVALID_ARGUMENT] * (count // 2)
            assert sorted(a.adapter_id for a in client.list_adapters()) == [
                f"big{index}" for index in range(0, count, 2)
            ]
            ids = np.array([[5, 17, 256, 999, 3]], dtype=np.int64)
            got = client.infer("demo", {"input_ids": ids}, adapter="big2")["logits"]
            want = merged_reference(directories[2], ids)
            assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        assert not any((data_dir / "adapters" / ".staging").iterdir())
    finally:
        _stop(process)


def test_a_full_adapter_disk_is_resource_exhausted_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with small_tmpfs(data_dir / "adapters", 3 * MiB):
        worker = start_worker(worker_settings(data_dir, "--cache-dir", str(tmp_path / "cache")))
        try:
            with Client(worker.address, timeout=30) as client:
                registered, refusal = [], None
                for index in range(40):
                    directory = write_peft(
                        tmp_path / f"a{index}", rank=64, seed=index, modules=ALL_MODULES[:6]
                    )
                    try:
                        client.register_adapter("demo", f"a{index}", directory)
                        registered.append(f"a{index}")
                    except OrtmuxError as error:
                        refusal = error
                        break
                assert refusal is not None and registered, "the disk never filled"
                assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "adapter storage at" in refusal.message and "is full" in refusal.message
                assert refusal.reason == "STORAGE_FULL"
                assert not any((data_dir / "adapters" / ".staging").iterdir())
                ids = np.array([[5, 17, 256, 999, 3]], dtype=np.int64)
                want = merged_reference(tmp_path / registered[0], ids)
                got = client.infer("demo", {"input_ids": ids}, adapter=registered[0])["logits"]
                assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
                client.delete_adapter("demo", registered[-1])
                client.delete_adapter("demo", registered[-2])
                client.register_adapter("demo", "after", tmp_path / registered[-1])
                assert len(client.list_adapters()) == len(registered) - 1
        finally:
            worker.stop(0)
        worker = start_worker(worker_settings(data_dir, "--cache-dir", str(tmp_path / "cache")))
        try:
            with Client(worker.address, timeout=30) as client:  # consistent after a restart
                assert len(client.list_adapters()) == len(registered) - 1
        finally:
            worker.stop(0)


def test_a_full_model_cache_serves_from_an_uncached_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "cache", 1 * MiB) as cache:
        with caplog.at_level(logging.WARNING):
            worker = start_worker(worker_settings(tmp_path / "data", "--cache-dir", str(cache)))
        try:
            assert any("is full" in r.message and "uncached" in r.message for r in caplog.records)
            model = worker.dataplane.models.get("demo")
            assert not model.entry.cached and model.entry.directory.is_dir()
            assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]
            with Client(worker.address, timeout=30) as client:
                ids = np.array([[5, 17, 256, 999, 3]], dtype=np.int64)
                got = client.infer("demo", {"input_ids": ids})["logits"]
                want = merged_reference(None, ids)
                assert np.abs(got - want).max() / np.abs(want).max() < 1e-5
                directory = write_peft(tmp_path / "lora")
                client.register_adapter("demo", "lora", directory)
                got = client.infer("demo", {"input_ids": ids}, adapter="lora")["logits"]
                want = merged_reference(directory, ids)
                assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        finally:
            worker.stop(0)


def test_a_model_with_embedded_weights_costs_no_more_memory_than_one_with_external_data(
    tmp_path: Path,
) -> None:
    """Loading parses the whole file when its weights are embedded (most quantized files are);
    that memory goes back to the system once the model is loaded. Measured on a restart, from the
    cache (the process that builds an entry holds more; docs/operations.md, memory and disk)."""
    import onnx

    from ortmux.worker.demo import TransformerShape, build_transformer

    model = build_transformer(TransformerShape(vocab=12000, d_model=256, heads=4, d_ff=1024, layers=2))
    (tmp_path / "embedded").mkdir()
    (tmp_path / "external").mkdir()
    onnx.save_model(model, str(tmp_path / "embedded" / "model.onnx"))  # 31 MB in the file itself
    onnx.save_model(
        model,
        str(tmp_path / "external" / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
    )
    held = {}
    for kind in ("embedded", "external", "embedded", "external"):  # build the entries, then measure
        data = tmp_path / f"data-{kind}"
        process, address = serve_process(data, "--model", f"m={tmp_path / kind / 'model.onnx'}")
        try:
            with Client(address, timeout=60) as client:
                client.infer("m", {"input_ids": np.zeros((1, 8), dtype=np.int64)})
            held[kind] = pss_bytes(process.pid)
        finally:
            _stop(process)
    assert held["embedded"] - held["external"] < 8 * MiB, held
