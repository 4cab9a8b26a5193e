"""Many pods, one service: real worker processes over a real S3 server (``rclone serve s3``).

Every pod sees every adapter, deletes and replacements reach every pod within the sync bound, the
store's outages leave known adapters serving, a pod killed mid-upload leaves nothing visible, and
tenants and quotas hold across pods.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ortmux.client import Client, OrtmuxError
from ortmux.worker.adapters import safetensors
from ortmux.worker.auth import key_digest

from ..conftest import serve_process
from ..demo_adapters import merged_reference, write_peft
from ..s3_server import S3Server

IDS = np.random.default_rng(3).integers(0, 1000, size=(2, 8), dtype=np.int64)
SYNC_SECONDS = 2.0  # the default adapter_sync_seconds


@contextlib.contextmanager
def pods(
    tmp_path: Path, s3: S3Server, count: int, *flags: str, prefix: str | None = None
) -> Iterator[list[tuple[object, str]]]:
    """``count`` worker processes sharing one store prefix (and one model cache, as on a node)."""
    prefix = prefix or uuid.uuid4().hex[:8]
    common = ["--adapter-store", s3.url(prefix), "--cache-dir", str(tmp_path / "cache"), *flags]
    started = []
    try:
        for index in range(count):
            started.append(serve_process(tmp_path / f"pod{index}", *common, env=s3.env, keep_reading=True))
        yield started
    finally:
        for process, _address in started:
            process.kill()
            process.wait()


def logits(client: Client, adapter: str | None) -> np.ndarray:
    return client.infer("demo", {"input_ids": IDS}, adapter=adapter)["logits"]


def error_of(call: Callable[[], object]) -> OrtmuxError:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value


def wait_until(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition()`` held; fails after ``seconds``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_adapter_registered_on_one_pod_serves_on_every_pod(tmp_path: Path, s3_server: S3Server) -> None:
    peft = write_peft(tmp_path / "peft", seed=1)
    expected = merged_reference(peft, IDS)
    with pods(tmp_path, s3_server, 3) as running:
        clients = [Client(address, retry_attempts=1) for _process, address in running]
        info = clients[0].register_adapter("demo", "shared-1", peft)
        for client in clients:  # no wait: pods that do not know it yet look in the store
            np.testing.assert_allclose(logits(client, "shared-1"), expected, rtol=1e-4, atol=1e-4)
            assert client.get_adapter("demo", "shared-1").sha256 == info.sha256
        for client in clients:
            assert [a.adapter_id for a in client.list_adapters("demo")] == ["shared-1"]
        assert error_of(lambda: logits(clients[2], "never-registered")).code is grpc.StatusCode.NOT_FOUND
        for client in clients:
            client.close()


def test_a_client_given_every_pod_never_sees_not_found(tmp_path: Path, s3_server: S3Server) -> None:
    peft = write_peft(tmp_path / "peft", seed=2)
    with (
        pods(tmp_path, s3_server, 3) as running,
        Client([a for _p, a in running], retry_attempts=1) as client,
    ):
        for index in range(6):
            client.register_adapter("demo", f"spread-{index}", peft)
            for _ in range(6):
                logits(client, f"spread-{index}")


def test_deletes_and_replacements_reach_every_pod_within_the_sync_bound(
    tmp_path: Path, s3_server: S3Server
) -> None:
    first, second = write_peft(tmp_path / "first", seed=3), write_peft(tmp_path / "second", seed=4)
    with pods(tmp_path, s3_server, 2) as running:
        writer, reader = (Client(address, retry_attempts=1) for _process, address in running)
        writer.register_adapter("demo", "moving", first)
        np.testing.assert_allclose(
            logits(reader, "moving"), merged_reference(first, IDS), rtol=1e-4, atol=1e-4
        )
        assert reader.get_adapter("demo", "moving").resident

        writer.register_adapter("demo", "moving", second, replace=True)
        replaced = merged_reference(second, IDS)
        took = wait_until(lambda: np.allclose(logits(reader, "moving"), replaced, rtol=1e-4, atol=1e-4), 10)
        assert took <= SYNC_SECONDS + 0.5, took

        writer.delete_adapter("demo", "moving")
        took = wait_until(lambda: "moving" not in {a.adapter_id for a in reader.list_adapters("demo")}, 10)
        assert took <= SYNC_SECONDS + 0.5, took
        assert error_of(lambda: logits(reader, "moving")).code is grpc.StatusCode.NOT_FOUND
        writer.close()
        reader.close()


def _big_adapter(directory: Path, megabytes: int) -> Path:
    """A valid PEFT adapter padded with an unused tensor to ``megabytes`` (a long upload)."""
    write_peft(directory, seed=5)
    tensors = safetensors.load((directory / "adapter_model.safetensors").read_bytes())
    tensors["padding"] = np.zeros(megabytes << 18, dtype=np.float32)
    (directory / "adapter_model.safetensors").write_bytes(safetensors.dump(tensors))
    return directory


def test_a_pod_killed_mid_upload_leaves_nothing_and_orphans_are_collected(
    tmp_path: Path, s3_server: S3Server
) -> None:
    prefix = uuid.uuid4().hex[:8]
    big = _big_adapter(tmp_path / "big", 24)
    gc = ("--adapter-orphan-grace-seconds", "3", "--adapter-gc-seconds", "1")
    with pods(tmp_path, s3_server, 2, *gc, prefix=prefix) as running:
        (victim, victim_address), (_survivor, survivor_address) = running
        sent = threading.Event()

        def progress(done: int, total: int) -> None:
            sent.set()
            time.sleep(0.05)  # a slow client: the upload is still going when the pod dies

        def upload() -> None:
            with Client(victim_address, retry_attempts=1) as client, contextlib.suppress(OrtmuxError):
                client.register_adapter("demo", "half", big, chunk_bytes=256 << 10, progress=progress)

        uploader = threading.Thread(target=upload)
        uploader.start()
        assert sent.wait(30)
        time.sleep(0.3)
        victim.send_signal(signal.SIGKILL)
        uploader.join(30)
        assert not [key for key in s3_server.keys(f"{prefix}/") if "/half" in key or "records/" in key]
        with Client(survivor_address, retry_attempts=1) as survivor:
            assert error_of(lambda: survivor.get_adapter("demo", "half")).code is grpc.StatusCode.NOT_FOUND
            kept = survivor.register_adapter("demo", "kept", write_peft(tmp_path / "kept", seed=6))
            # A payload whose pod died before writing its record, as the store would hold it.
            orphan = f"{prefix}/objects/demo/default/{'0' * 64}-{uuid.uuid4().hex}"
            s3_server.client().put_object(Bucket=S3Server.BUCKET, Key=orphan, Body=b"half an upload")
            wait_until(lambda: orphan not in s3_server.keys(f"{prefix}/objects/"), 20)
            payloads = s3_server.keys(f"{prefix}/objects/")
            assert [key for key in payloads if kept.sha256 in key], payloads  # named by a record: kept
            np.testing.assert_allclose(
                logits(survivor, "kept"), merged_reference(tmp_path / "kept", IDS), rtol=1e-4, atol=1e-4
            )
    # The killed pod's data dir, started again, holds no trace of the upload either.
    process, address = serve_process(
        tmp_path / "pod0",
        "--adapter-store",
        s3_server.url(prefix),
        "--cache-dir",
        str(tmp_path / "cache"),
        env=s3_server.env,
        keep_reading=True,
    )
    try:
        with Client(address, retry_attempts=1) as client:
            assert [a.adapter_id for a in client.list_adapters("demo")] == ["kept"]
        assert not list((tmp_path / "pod0" / "adapters" / ".staging").iterdir())
    finally:
        process.kill()
        process.wait()


def test_a_store_outage_keeps_known_adapters_serving_and_needs_no_restart(tmp_path: Path) -> None:
    store = S3Server(tmp_path / "s3")
    store.start()
    try:
        with pods(tmp_path, store, 2) as running:
            first, second = (Client(address, retry_attempts=1) for _process, address in running)
            peft = write_peft(tmp_path / "peft", seed=7)
            first.register_adapter("demo", "known", peft)
            expected = merged_reference(peft, IDS)
            np.testing.assert_allclose(logits(second, "known"), expected, rtol=1e-4, atol=1e-4)
            failures: list[BaseException] = []
            stop = threading.Event()

            def load() -> None:
                for client in itertools.cycle((first, second)):
                    if stop.is_set():
                        return
                    try:
                        np.testing.assert_allclose(logits(client, "known"), expected, rtol=1e-4, atol=1e-4)
                        logits(client, None)
                    except BaseException as exc:  # reported below
                        failures.append(exc)

            loader = threading.Thread(target=load)
            loader.start()
            try:
                time.sleep(0.5)
                store.stop()
                time.sleep(SYNC_SECONDS)  # the pods' syncs fail meanwhile
                refused = error_of(lambda: first.register_adapter("demo", "during", peft))
                assert refused.code is grpc.StatusCode.UNAVAILABLE, refused
                assert refused.reason == "ADAPTER_STORE_UNAVAILABLE" and refused.retry_after, refused
                # the store is named, never its address (that stays in the log)
                assert "adapter store" in refused.message, refused
                assert store.url("").split("/")[2] not in refused.message, refused
                unknown = error_of(lambda: logits(second, "never-seen"))
                assert unknown.code is grpc.StatusCode.UNAVAILABLE, unknown
                for _process, address in running:
                    with grpc.insecure_channel(address) as channel:
                        health = health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=5
                        )
                        assert health.status == health_pb2.HealthCheckResponse.SERVING
                store.start()
                first.register_adapter("demo", "after", peft)
                np.testing.assert_allclose(logits(second, "after"), expected, rtol=1e-4, atol=1e-4)
            finally:
                stop.set()
                loader.join(30)
            assert not failures, failures[:3]
            first.close()
            second.close()
    finally:
        store.stop()


def test_one_id_registered_through_two_pods_at_once_ends_as_one_whole_adapter(
    tmp_path: Path, s3_server: S3Server
) -> None:
    sources = [write_peft(tmp_path / f"v{index}", seed=10 + index) for index in range(2)]
    references = [merged_reference(source, IDS) for source in sources]
    with pods(tmp_path, s3_server, 2) as running:
        clients = [Client(address, retry_attempts=1) for _process, address in running]
        for round_ in range(3):
            name = f"race-{round_}"
            barrier = threading.Barrier(2)
            outcomes: list[object] = [None, None]

            def register(
                index: int, name: str = name, barrier: threading.Barrier = barrier, outcomes: list = outcomes
            ) -> None:
                barrier.wait()
                try:
                    outcomes[index] = clients[index].register_adapter("demo", name, sources[index])
                except OrtmuxError as exc:
                    outcomes[index] = exc

            threads = [threading.Thread(target=register, args=(index,)) for index in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            errors = [o for o in outcomes if isinstance(o, OrtmuxError)]
            assert len(errors) <= 1 and all(e.code is grpc.StatusCode.ALREADY_EXISTS for e in errors), (
                outcomes
            )

            def agreed(name: str = name) -> bool:
                answers = [logits(client, name) for client in clients]
                return np.array_equal(answers[0], answers[1])

            wait_until(agreed, SYNC_SECONDS + 2)
            answer = logits(clients[0], name)
            assert any(np.allclose(answer, ref, rtol=1e-4, atol=1e-4) for ref in references)
        for client in clients:
            client.close()


TENANT_KEYS = {"acme": "acme-key", "globex": "globex-key"}


def test_tenants_stay_apart_and_quotas_hold_across_pods(tmp_path: Path, s3_server: S3Server) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        "".join(
            f'[[key]]\nsha256 = "{key_digest(key)}"\ntenant = "{tenant}"\nrole = "tenant"\n\n'
            for tenant, key in TENANT_KEYS.items()
        )
    )
    prefix = uuid.uuid4().hex[:8]
    flags = ("--api-keys-file", str(keys), "--tenant-max-adapters", "2")
    peft = write_peft(tmp_path / "peft", seed=20)
    with pods(tmp_path, s3_server, 2, *flags, prefix=prefix) as running:
        (_a, first), (_b, second) = running
        acme = [Client(address, api_key=TENANT_KEYS["acme"], retry_attempts=1) for address in (first, second)]
        globex = Client(second, api_key=TENANT_KEYS["globex"], retry_attempts=1)
        acme[0].register_adapter("demo", "one", peft)
        acme[1].register_adapter("demo", "two", peft)
        over = error_of(lambda: acme[0].register_adapter("demo", "three", peft))
        assert over.code is grpc.StatusCode.RESOURCE_EXHAUSTED and over.reason == "QUOTA_ADAPTERS", over
        assert error_of(lambda: logits(globex, "one")).code is grpc.StatusCode.NOT_FOUND
        assert globex.list_adapters("demo") == []
        globex.register_adapter("demo", "one", peft)  # the same id in another tenant is another adapter
        assert {a.adapter_id for a in acme[1].list_adapters("demo")} == {"one", "two"}
        records = s3_server.keys(f"{prefix}/records/")
        assert records == [
            f"{prefix}/records/demo/acme/one.json",
            f"{prefix}/records/demo/acme/two.json",
            f"{prefix}/records/demo/globex/one.json",
        ]
        for client in (*acme, globex):
            client.close()


def test_a_local_store_becomes_the_shared_stores_cache_without_losing_adapters(
    tmp_path: Path, s3_server: S3Server
) -> None:
    peft = write_peft(tmp_path / "peft", seed=30)
    process, address = serve_process(tmp_path / "pod0", "--cache-dir", str(tmp_path / "cache"))
    try:
        with Client(address, retry_attempts=1) as client:
            client.register_adapter("demo", "from-before", peft)
    finally:
        process.kill()
        process.wait()
    with pods(tmp_path, s3_server, 2) as running:
        for _process, address in running:
            with Client(address, retry_attempts=1) as client:
                np.testing.assert_allclose(
                    logits(client, "from-before"), merged_reference(peft, IDS), rtol=1e-4, atol=1e-4
                )


def test_requests_in_flight_on_another_pods_delete_finish(tmp_path: Path, s3_server: S3Server) -> None:
    """Pod B streams requests on an adapter while pod A deletes it: B answers every request it
    took before the delete reached it, then NOT_FOUND, never anything else."""
    from ortmux.client import InferRequest

    peft = write_peft(tmp_path / "peft", seed=70)
    heavy = {"input_ids": np.random.default_rng(5).integers(0, 1000, size=(4, 128), dtype=np.int64)}
    with pods(tmp_path, s3_server, 2) as running:
        (_a, first), (_b, second) = running
        with Client(first, retry_attempts=1) as deleter, Client(second, retry_attempts=1) as reader:
            deleter.register_adapter("demo", "leaving", peft)
            logits(reader, "leaving")  # resident on B
            gone = threading.Event()
            started = time.monotonic()

            def requests() -> Iterator[InferRequest]:
                while not gone.is_set() and time.monotonic() - started < 30:
                    yield InferRequest("demo", heavy, adapter="leaving")

            codes: list[str] = []
            for count, result in enumerate(reader.stream_infer(requests(), window=4, ordered=True)):
                codes.append("OK" if result.ok else result.error.code.name)
                if count == 10:
                    deleter.delete_adapter("demo", "leaving")
                if codes[-1] == "NOT_FOUND" and len([c for c in codes if c == "NOT_FOUND"]) >= 3:
                    gone.set()
    first_missing = codes.index("NOT_FOUND")
    assert first_missing > 10 and set(codes[:first_missing]) == {"OK"}, codes
    assert set(codes[first_missing:]) == {"NOT_FOUND"}, codes
