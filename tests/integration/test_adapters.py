"""Adapter lifecycle through the real server and client, on the demo model."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from ortmux.client import Client, OrtmuxError
from ortmux.v1 import adapters_pb2, adapters_pb2_grpc
from ortmux.worker.adapters import safetensors
from ortmux.worker.adapters.local_store import LOCK_FILE
from ortmux.worker.api.server import Worker, start_worker

from ..conftest import scrape, serve_process, worker_settings
from ..demo_adapters import demo_weight, merged_reference, write_peft

DOWN = "layers.1.mlp.down_proj.weight"
IDS = np.array([[5, 17, 256, 999, 3], [1, 2, 3, 4, 5]], dtype=np.int64)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture()
def adapter_worker(tmp_path: Path) -> Iterator[Worker]:
    running = start_worker(
        worker_settings(tmp_path / "data", "--overridable", "layers.*.mlp.down_proj.weight")
    )
    yield running
    running.stop(0)


@pytest.fixture()
def client(adapter_worker: Worker) -> Iterator[Client]:
    with Client(adapter_worker.address) as connected:
        yield connected


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value.code, caught.value.message


def test_lora_adapter_equals_merged_weights_and_base_is_untouched(client: Client, tmp_path: Path) -> None:
    peft = write_peft(tmp_path / "peft")
    info = client.register_adapter("demo", "customer-1", peft)
    assert (info.format, info.rank, info.resident) == ("peft_lora", 4, True)
    assert info.targets == tuple(
        sorted(
            f"{m}.weight"
            for m in ("layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.up_proj")
        )
    )
    adapted = client.infer("demo", {"input_ids": IDS}, adapter="customer-1")["logits"]
    assert relative_error(adapted, merged_reference(peft, IDS)) <= 1e-4
    base = client.infer("demo", {"input_ids": IDS})["logits"]
    assert relative_error(base, merged_reference(None, IDS)) <= 1e-5


def test_list_get_delete(client: Client, tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        client.register_adapter("demo", name, write_peft(tmp_path / name, seed=ord(name)))
    assert [info.adapter_id for info in client.list_adapters("demo")] == ["a", "b", "c"]
    assert [info.adapter_id for info in client.list_adapters()] == ["a", "b", "c"]
    got = client.get_adapter("demo", "b")
    assert got.size_bytes > 0 and len(got.sha256) == 64 and got.created_at > 0
    assert client.model_info("demo").stats.adapters == 3
    client.delete_adapter("demo", "b")
    assert [info.adapter_id for info in client.list_adapters("demo")] == ["a", "c"]
    assert _code(lambda: client.get_adapter("demo", "b"))[0] == grpc.StatusCode.NOT_FOUND
    assert (
        _code(lambda: client.infer("demo", {"input_ids": IDS}, adapter="b"))[0] == grpc.StatusCode.NOT_FOUND
    )
    assert _code(lambda: client.delete_adapter("demo", "b"))[0] == grpc.StatusCode.NOT_FOUND


def test_list_pages_through_many_adapters(adapter_worker: Worker, client: Client, tmp_path: Path) -> None:
    peft = write_peft(tmp_path / "peft", modules=("layers.0.self_attn.q_proj",))
    for index in range(7):
        client.register_adapter("demo", f"a{index}", peft)
    with grpc.insecure_channel(adapter_worker.address) as channel:
        stub = adapters_pb2_grpc.AdapterServiceStub(channel)
        first = stub.ListAdapters(adapters_pb2.ListAdaptersRequest(model="demo", page_size=3), timeout=10)
        second = stub.ListAdapters(
            adapters_pb2.ListAdaptersRequest(model="demo", page_size=3, page_token=first.next_page_token),
            timeout=10,
        )
    assert [a.adapter_id for a in first.adapters] == ["a0", "a1", "a2"]
    assert [a.adapter_id for a in second.adapters] == ["a3", "a4", "a5"]
    assert len(client.list_adapters("demo")) == 7


def test_duplicate_id_is_already_exists_unless_replaced(client: Client, tmp_path: Path) -> None:
    client.register_adapter("demo", "dup", write_peft(tmp_path / "one", seed=1))
    code, message = _code(
        lambda: client.register_adapter("demo", "dup", write_peft(tmp_path / "two", seed=2))
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "adapter 'dup' already exists on model 'demo'" in message
    client.register_adapter("demo", "dup", tmp_path / "two", replace=True)
    adapted = client.infer("demo", {"input_ids": IDS}, adapter="dup")["logits"]
    assert relative_error(adapted, merged_reference(tmp_path / "two", IDS)) <= 1e-4


def test_adapters_survive_a_restart(tmp_path: Path) -> None:
    settings = ("--overridable", "layers.*.mlp.down_proj.weight")
    first = start_worker(worker_settings(tmp_path / "data", *settings))
    try:
        with Client(first.address) as client:
            client.register_adapter("demo", "kept", write_peft(tmp_path / "peft"))
            before = client.infer("demo", {"input_ids": IDS}, adapter="kept")["logits"]
    finally:
        first.stop(0)
    second = start_worker(worker_settings(tmp_path / "data", *settings))
    try:
        with Client(second.address) as client:
            assert [(a.adapter_id, a.resident) for a in client.list_adapters()] == [("kept", False)]
            after = client.infer("demo", {"input_ids": IDS}, adapter="kept")["logits"]
            assert client.get_adapter("demo", "kept").resident
    finally:
        second.stop(0)
    np.testing.assert_array_equal(before, after)


def test_adapters_stored_before_tenants_existed_move_to_the_default_tenant(tmp_path: Path) -> None:
    first = start_worker(worker_settings(tmp_path / "data"))
    try:
        with Client(first.address) as client:
            client.register_adapter("demo", "old", write_peft(tmp_path / "peft"))
            before = client.infer("demo", {"input_ids": IDS}, adapter="old")["logits"]
    finally:
        first.stop(0)
    model_dir = tmp_path / "data" / "adapters" / "demo"
    (model_dir / "default" / "old").rename(model_dir / "old")  # the layout without tenants
    (model_dir / "default").rmdir()
    second = start_worker(worker_settings(tmp_path / "data"))
    try:
        with Client(second.address) as client:
            np.testing.assert_array_equal(
                client.infer("demo", {"input_ids": IDS}, adapter="old")["logits"], before
            )
    finally:
        second.stop(0)
    assert (model_dir / "default" / "old" / "meta.json").is_file() and not (model_dir / "old").exists()


def _npz(tensors: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **tensors)
    return buffer.getvalue()


def test_override_adapter_replaces_only_its_weights(client: Client, tmp_path: Path) -> None:
    replacement = (demo_weight(DOWN) * -0.5).astype(np.float32)
    path = tmp_path / "override.npz"
    path.write_bytes(_npz({DOWN: replacement}))
    info = client.register_adapter("demo", "ft-layer1", path)
    assert (info.format, info.targets) == ("weight_override", (DOWN,))
    adapted = client.infer("demo", {"input_ids": IDS}, adapter="ft-layer1")["logits"]
    assert relative_error(adapted, merged_reference(None, IDS, {DOWN: replacement})) <= 1e-4
    base = client.infer("demo", {"input_ids": IDS})["logits"]
    assert relative_error(base, merged_reference(None, IDS)) <= 1e-5
    safetensors_path = tmp_path / "override.safetensors"
    safetensors_path.write_bytes(safetensors.dump({DOWN: replacement}))
    client.register_adapter("demo", "ft-st", safetensors_path)
    np.testing.assert_array_equal(
        client.infer("demo", {"input_ids": IDS}, adapter="ft-st")["logits"], adapted
    )


def test_ort_adapter_feeds_its_parameters(client: Client, tmp_path: Path) -> None:
    replacement = (demo_weight(DOWN) * 0.25).astype(np.float32)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({DOWN: ort.OrtValue.ortvalue_from_numpy(replacement)})
    path = tmp_path / "tuned.onnx_adapter"
    adapter.export_adapter(str(path))
    assert client.register_adapter("demo", "ort", path).format == "ort_adapter"
    adapted = client.infer("demo", {"input_ids": IDS}, adapter="ort")["logits"]
    assert relative_error(adapted, merged_reference(None, IDS, {DOWN: replacement})) <= 1e-4


def test_least_recently_used_adapters_leave_memory_and_come_back(tmp_path: Path) -> None:
    one = write_peft(tmp_path / "peft", modules=("layers.0.self_attn.q_proj",))
    # one adapter: A 128x4 + B 4x128 float32 = 4 KiB; the budget holds two
    running = start_worker(worker_settings(tmp_path / "data", "--adapter-memory-bytes", "9000"))
    try:
        with Client(running.address) as client:
            client.register_adapter("demo", "pinned", one, pinned=True)
            expected = client.infer("demo", {"input_ids": IDS}, adapter="pinned")["logits"]
            for name in ("x", "y", "z"):
                client.register_adapter("demo", name, one)
            resident = {a.adapter_id: a.resident for a in client.list_adapters()}
            assert resident == {"pinned": True, "x": False, "y": False, "z": True}
            assert running.dataplane.adapters.counters.evictions == 2
            np.testing.assert_array_equal(
                client.infer("demo", {"input_ids": IDS}, adapter="x")["logits"], expected
            )
            assert running.dataplane.adapters.counters.reloads == 1
            assert running.dataplane.adapters.resident_bytes() <= 9000
            samples = scrape(running)
            assert samples[("ortmux_adapter_evictions_total", ())] == 3  # reloading x evicted z
            assert samples[("ortmux_adapter_reloads_total", ())] == 1
            assert samples[("ortmux_adapter_registrations_total", ())] == 4
            assert samples[("ortmux_adapters_registered", ())] == 4
            assert samples[("ortmux_adapters_resident", ())] == 2
    finally:
        running.stop(0)


# -- bad input -----------------------------------------------------------------------------------


def _raw_upload(
    worker: Worker,
    header: adapters_pb2.AdapterUploadHeader,
    chunks: list[bytes],
    trailers: tuple[str, ...] | list[str] = (),
) -> grpc.RpcError:
    messages = [adapters_pb2.RegisterAdapterRequest(header=header)] + [
        adapters_pb2.RegisterAdapterRequest(chunk=chunk) for chunk in chunks
    ]
    messages += [
        adapters_pb2.RegisterAdapterRequest(trailer=adapters_pb2.AdapterUploadTrailer(sha256=sha256))
        for sha256 in trailers
    ]
    with grpc.insecure_channel(worker.address) as channel, pytest.raises(grpc.RpcError) as caught:
        adapters_pb2_grpc.AdapterServiceStub(channel).RegisterAdapter(iter(messages), timeout=10)
    return caught.value


def test_truncated_upload_is_invalid_argument(adapter_worker: Worker) -> None:
    payload = b"x" * 100
    header = adapters_pb2.AdapterUploadHeader(
        model="demo", adapter_id="t", total_bytes=200, sha256=hashlib.sha256(payload * 2).hexdigest()
    )
    error = _raw_upload(adapter_worker, header, [payload])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "upload ended after 100 of 200 bytes"


def test_checksum_mismatch_is_invalid_argument(adapter_worker: Worker) -> None:
    header = adapters_pb2.AdapterUploadHeader(model="demo", adapter_id="t", total_bytes=3, sha256="0" * 64)
    error = _raw_upload(adapter_worker, header, [b"abc"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"checksum mismatch: header.sha256 is {'0' * 64}")


@pytest.mark.parametrize(
    ("header_sha256", "trailers", "message", "field"),
    [
        ("", ["0" * 64], "checksum mismatch: trailer.sha256 is 000", "trailer.sha256"),
        ("", [], "the upload carries no sha256", "header.sha256"),
        ("", ["ABC"], "trailer.sha256 must be 64 lower-case hex digits", "trailer.sha256"),
        ("", [hashlib.sha256(b"abc").hexdigest()] * 2, "the trailer must be the last message", "trailer"),
        (
            hashlib.sha256(b"abc").hexdigest(),
            ["0" * 64],
            "checksum mismatch: trailer.sha256",
            "trailer.sha256",
        ),
    ],
)
def test_trailer_checksum_errors(
    adapter_worker: Worker, header_sha256: str, trailers: list[str], message: str, field: str
) -> None:
    header = adapters_pb2.AdapterUploadHeader(
        model="demo", adapter_id="t", total_bytes=3, sha256=header_sha256
    )
    error = _raw_upload(adapter_worker, header, [b"abc"], trailers)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(message)
    assert [v.field for v in OrtmuxError.from_rpc_error(error).field_violations] == [field]


def test_oversize_upload_is_resource_exhausted(tmp_path: Path) -> None:
    running = start_worker(worker_settings(tmp_path, "--max-adapter-bytes", "1000"))
    try:
        header = adapters_pb2.AdapterUploadHeader(
            model="demo", adapter_id="big", total_bytes=5000, sha256="0" * 64
        )
        error = _raw_upload(running, header, [b"x" * 5000])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "adapter of 5000 bytes exceeds the limit of 1000 bytes"
        liar = adapters_pb2.AdapterUploadHeader(
            model="demo", adapter_id="big", total_bytes=10, sha256="0" * 64
        )
        error = _raw_upload(running, liar, [b"x" * 600, b"x" * 600])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "upload sent more than the 10 bytes its header declares"
    finally:
        running.stop(0)


def test_upload_not_starting_with_a_header_is_invalid_argument(adapter_worker: Worker) -> None:
    with grpc.insecure_channel(adapter_worker.address) as channel, pytest.raises(grpc.RpcError) as caught:
        adapters_pb2_grpc.AdapterServiceStub(channel).RegisterAdapter(
            iter([adapters_pb2.RegisterAdapterRequest(chunk=b"abc")]), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "an adapter upload must start with a header message"


def _bad_peft(tmp_path: Path, case: str) -> Path:
    peft = write_peft(tmp_path / case)
    weights = peft / "adapter_model.safetensors"
    if case == "corrupt safetensors":
        weights.write_bytes(weights.read_bytes()[:40])
    elif case == "unknown target":
        tensors = safetensors.load(weights.read_bytes())
        renamed = {
            key.replace("layers.1.mlp.up_proj", "layers.7.mlp.gate_proj"): v for key, v in tensors.items()
        }
        weights.write_bytes(safetensors.dump(renamed))
    elif case == "wrong shape":
        tensors = dict(safetensors.load(weights.read_bytes()))
        key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = np.zeros((4, 64), np.float32)
        weights.write_bytes(safetensors.dump(tensors))
    elif case == "dora":
        config = (peft / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
        (peft / "adapter_config.json").write_text(config)
    elif case == "pickle weights":
        weights.rename(peft / "adapter_model.bin")
    return peft


BAD_ADAPTERS = {
    "corrupt safetensors": "adapter_model.safetensors: header size",
    "unknown target": "cannot map these adapter modules to base weights: layers.7.mlp.gate_proj",
    "wrong shape": "module 'layers.0.self_attn.q_proj' has lora_A [4, 64] and lora_B [128, 4], but weight",
    "dora": "DoRA adapters are not supported (use_dora=True)",
    "pickle weights": "PEFT adapter has adapter_config.json but no adapter_model.safetensors",
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_invalid_argument_and_leaves_nothing(
    adapter_worker: Worker, client: Client, tmp_path: Path, case: str
) -> None:
    code, message = _code(lambda: client.register_adapter("demo", "bad", _bad_peft(tmp_path, case)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert BAD_ADAPTERS[case] in message
    root = adapter_worker.settings.data_dir / "adapters"
    assert not [p for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    assert client.list_adapters() == []
    assert client.infer("demo", {"input_ids": IDS})["logits"].shape == (2, 5, 1000)


@pytest.mark.parametrize("adapter_id", ["../escape", "", "a/b", ".hidden", "x" * 129])
def test_unsafe_adapter_id_is_invalid_argument(client: Client, tmp_path: Path, adapter_id: str) -> None:
    code, message = _code(lambda: client.register_adapter("demo", adapter_id, write_peft(tmp_path / "p")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"adapter id {adapter_id!r} is invalid")


def test_override_errors(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "o.npz"
    path.write_bytes(_npz({"layers.0.self_attn.k_proj.weight": np.zeros((128, 128), np.float32)}))
    code, message = _code(lambda: client.register_adapter("demo", "o", path))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "weight 'layers.0.self_attn.k_proj.weight' is not overridable on model 'demo'" in message
    path.write_bytes(_npz({"no.such.weight": np.zeros(3, np.float32)}))
    code, message = _code(lambda: client.register_adapter("demo", "o", path))
    assert (code, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "weight 'no.such.weight' is not overridable on model 'demo': no such weight",
    )
    path.write_bytes(_npz({DOWN: np.zeros((3, 3), np.float32)}))
    code, message = _code(lambda: client.register_adapter("demo", "o", path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"adapter tensor '{DOWN}' is float32[3, 3], model 'demo' expects float32[128, 512]" == message


def test_unknown_model_and_adapter(client: Client, tmp_path: Path) -> None:
    assert _code(lambda: client.register_adapter("nope", "a", write_peft(tmp_path / "p")))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    code, message = _code(lambda: client.infer("demo", {"input_ids": IDS}, adapter="ghost"))
    assert (code, message) == (grpc.StatusCode.NOT_FOUND, "adapter 'ghost' is not registered on model 'demo'")


def test_register_from_a_path_on_the_worker(client: Client, tmp_path: Path) -> None:
    peft = write_peft(tmp_path / "server-side")
    info = client.register_adapter_from_path("demo", "ops", str(peft))
    assert (info.adapter_id, info.format) == ("ops", "peft_lora")
    uploaded = client.register_adapter("demo", "uploaded", peft)
    assert info.sha256 == uploaded.sha256
    ids = {"input_ids": IDS}
    np.testing.assert_array_equal(
        client.infer("demo", ids, adapter="ops")["logits"],
        client.infer("demo", ids, adapter="uploaded")["logits"],
    )
    with pytest.raises(OrtmuxError) as caught:
        client.register_adapter_from_path("demo", "x", str(tmp_path / "no"))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("archive", ["tar.gz", "zip"])
def test_archived_peft_directory_uploads(client: Client, tmp_path: Path, archive: str) -> None:
    import shutil

    peft = write_peft(tmp_path / "peft")
    packed = shutil.make_archive(str(tmp_path / "packed"), "gztar" if archive == "tar.gz" else "zip", peft)
    client.register_adapter("demo", "packed", packed)
    adapted = client.infer("demo", {"input_ids": IDS}, adapter="packed")["logits"]
    assert relative_error(adapted, merged_reference(peft, IDS)) <= 1e-4


def test_delete_waits_for_requests_running_on_the_adapter(
    adapter_worker: Worker, client: Client, tmp_path: Path
) -> None:
    import threading

    client.register_adapter("demo", "busy", write_peft(tmp_path / "peft"))
    manager = adapter_worker.dataplane.adapters
    deleted = threading.Event()
    with manager.use("demo", "busy"):
        deleter = threading.Thread(target=lambda: (client.delete_adapter("demo", "busy"), deleted.set()))
        deleter.start()
        assert not deleted.wait(0.5)  # the delete waits while a request holds the adapter
        with pytest.raises(OrtmuxError) as caught:  # and new requests no longer find it
            client.infer("demo", {"input_ids": IDS}, adapter="busy")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert deleted.wait(10)
    deleter.join()
    assert client.list_adapters() == []


def test_a_crash_mid_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGKILL the worker while an upload streams; the restarted worker has no trace of it."""
    import os
    import signal
    import threading
    import time

    data_dir = tmp_path / "data"

    process, address = serve_process(data_dir)
    half_sent = threading.Event()
    payload = b"\0" * (4 << 20)

    def messages() -> Iterator[adapters_pb2.RegisterAdapterRequest]:
        header = adapters_pb2.AdapterUploadHeader(
            model="demo",
            adapter_id="doomed",
            total_bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
        )
        yield adapters_pb2.RegisterAdapterRequest(header=header)
        yield adapters_pb2.RegisterAdapterRequest(chunk=payload[: 2 << 20])
        half_sent.set()
        threading.Event().wait(30)  # the worker dies before the rest is sent

    with grpc.insecure_channel(address) as channel:
        call = adapters_pb2_grpc.AdapterServiceStub(channel).RegisterAdapter.future(messages(), timeout=60)
        assert half_sent.wait(30)
        staging = data_dir / "adapters" / ".staging"
        deadline = time.monotonic() + 30
        while not any(staging.rglob("payload")):  # the upload is landing on disk
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        with pytest.raises(grpc.RpcError):
            call.result()
    process, address = serve_process(data_dir)
    try:
        with Client(address) as client:
            assert client.list_adapters() == []
        assert not [p for p in (data_dir / "adapters").rglob("*") if p.is_file() and p.name != LOCK_FILE]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_an_ort_adapter_cannot_feed_the_internal_lora_inputs(client: Client, tmp_path: Path) -> None:
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(
        {"ortmux.lora.0.a": ort.OrtValue.ortvalue_from_numpy(np.ones((1, 128, 2), np.float32))}
    )
    path = tmp_path / "sneaky.onnx_adapter"
    adapter.export_adapter(str(path))
    code, message = _code(lambda: client.register_adapter("demo", "sneaky", path))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "adapter tensor 'ortmux.lora.0.a' is not an overridable weight" in message
