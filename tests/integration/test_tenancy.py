"""Tenants through a real server: keys, isolation, roles, quotas, reloads, audit, TLS."""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ortmux.client import Client, InferRequest, OrtmuxError
from ortmux.worker.api.server import Worker, start_worker
from ortmux.worker.auth import key_digest

from ..conftest import worker_settings
from ..demo_adapters import write_peft

IDS = {"input_ids": np.arange(8, dtype=np.int64).reshape(1, 8)}
KEYS = {"acme": "acme-secret", "globex": "globex-secret", "root": "root-secret"}


def _write_keys(path: Path, keys: dict[str, tuple[str, str]]) -> None:
    lines = []
    for key, (tenant, role) in keys.items():
        lines += ["[[key]]", f'sha256 = "{key_digest(key)}"', f'tenant = "{tenant}"', f'role = "{role}"', ""]
    temp = path.with_suffix(".tmp")
    temp.write_text("\n".join(lines))
    temp.replace(path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    _write_keys(
        path,
        {
            KEYS["acme"]: ("acme", "tenant"),
            KEYS["globex"]: ("globex", "tenant"),
            KEYS["root"]: ("ops", "admin"),
        },
    )
    return path


@pytest.fixture(scope="module")
def tenant_worker(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Worker]:
    data = tmp_path_factory.mktemp("tenant-data")
    running = start_worker(
        worker_settings(data, "--api-keys-file", str(keys_file), "--tenant-max-adapters", "2")
    )
    yield running
    running.stop(0)


def _client(worker: Worker, who: str | None) -> Client:
    return Client(worker.address, api_key=KEYS.get(who or "", who), retry_attempts=1)


def _error(call: Callable[[], object]) -> OrtmuxError:
    with pytest.raises(OrtmuxError) as caught:
        call()
    return caught.value


def test_missing_or_wrong_keys_are_unauthenticated_and_health_needs_none(tenant_worker: Worker) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for who in (None, "not-a-key"):
        with _client(tenant_worker, who) as client:
            error = _error(lambda c=client: c.infer("demo", IDS))
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
            assert _error(lambda c=client: c.list_adapters()).code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(tenant_worker.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tenants_never_see_or_use_each_others_adapters(tenant_worker: Worker, tmp_path: Path) -> None:
    peft = write_peft(tmp_path / "peft", seed=3)
    with _client(tenant_worker, "acme") as acme, _client(tenant_worker, "globex") as globex:
        acme.register_adapter("demo", "shared-name", peft)
        expected = acme.infer("demo", IDS, adapter="shared-name")["logits"]
        assert [a.adapter_id for a in globex.list_adapters("demo")] == []
        missing = _error(lambda: globex.get_adapter("demo", "never-registered"))
        calls = {
            "get": lambda: globex.get_adapter("demo", "shared-name"),
            "use": lambda: globex.infer("demo", IDS, adapter="shared-name"),
            "delete": lambda: globex.delete_adapter("demo", "shared-name"),
        }
        for name, call in calls.items():
            error = _error(call)
            assert error.code == grpc.StatusCode.NOT_FOUND, name
            assert error.message == missing.message.replace("never-registered", "shared-name"), name
        streamed = list(globex.stream_infer([InferRequest("demo", IDS, adapter="shared-name")]))
        assert streamed[0].error is not None and streamed[0].error.code == grpc.StatusCode.NOT_FOUND
        # The same id in another namespace is another adapter.
        globex.register_adapter("demo", "shared-name", write_peft(tmp_path / "other", seed=4))
        assert not np.array_equal(globex.infer("demo", IDS, adapter="shared-name")["logits"], expected)
        np.testing.assert_array_equal(acme.infer("demo", IDS, adapter="shared-name")["logits"], expected)
        acme.delete_adapter("demo", "shared-name")
        assert [a.adapter_id for a in globex.list_adapters("demo")] == ["shared-name"]
        globex.delete_adapter("demo", "shared-name")


def test_only_admins_manage_models_or_read_worker_paths(tenant_worker: Worker, tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ortmux.v1 import models_pb2, models_pb2_grpc

    peft = write_peft(tmp_path / "peft")
    demo_file = tenant_worker.dataplane.get_model("demo").path
    with _client(tenant_worker, "acme") as acme, _client(tenant_worker, "root") as root:
        error = _error(lambda: acme.register_adapter_from_path("demo", "p", str(peft)))
        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert root.register_adapter_from_path("demo", "p", str(peft)).adapter_id == "p"
        root.delete_adapter("demo", "p")

    def call(key: str, method: str, request: object) -> tuple[grpc.StatusCode, object]:
        with grpc.insecure_channel(tenant_worker.address) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            try:
                reply = getattr(stub, method)(
                    request, timeout=60, metadata=(("authorization", f"Bearer {key}"),)
                )
                return grpc.StatusCode.OK, reply
            except grpc.RpcError as error:
                return error.code(), None

    def health(service: str) -> int:
        with grpc.insecure_channel(tenant_worker.address) as channel:
            try:
                return (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    .status
                )
            except grpc.RpcError as error:
                return -1 if error.code() == grpc.StatusCode.NOT_FOUND else -2

    load = models_pb2.LoadModelRequest(name="second", path=str(demo_file))
    unload = models_pb2.UnloadModelRequest(name="second")
    assert call(KEYS["acme"], "LoadModel", load)[0] == grpc.StatusCode.PERMISSION_DENIED
    missing = models_pb2.LoadModelRequest(name="second", path=str(tmp_path / "none.onnx"))
    assert call(KEYS["root"], "LoadModel", missing)[0] == grpc.StatusCode.NOT_FOUND
    bad_name = models_pb2.LoadModelRequest(name="../x", path=str(demo_file))
    assert call(KEYS["root"], "LoadModel", bad_name)[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, info = call(KEYS["root"], "LoadModel", load)
    assert code == grpc.StatusCode.OK and info.name == "second"
    assert call(KEYS["root"], "LoadModel", load)[0] == grpc.StatusCode.ALREADY_EXISTS
    assert health("ortmux.model.second") == health_pb2.HealthCheckResponse.SERVING
    with _client(tenant_worker, "acme") as acme, _client(tenant_worker, "root") as root:
        np.testing.assert_array_equal(acme.infer("second", IDS)["logits"], acme.infer("demo", IDS)["logits"])
        root.unload_model("second")  # the client's twins of the same calls
        assert root.load_model("second", str(demo_file)).name == "second"
        assert (
            _error(lambda: acme.load_model("third", str(demo_file))).code == grpc.StatusCode.PERMISSION_DENIED
        )
        assert call(KEYS["acme"], "UnloadModel", unload)[0] == grpc.StatusCode.PERMISSION_DENIED
        assert call(KEYS["root"], "UnloadModel", unload)[0] == grpc.StatusCode.OK
        assert _error(lambda: acme.infer("second", IDS)).code == grpc.StatusCode.NOT_FOUND
    assert health("ortmux.model.second") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert call(KEYS["root"], "UnloadModel", unload)[0] == grpc.StatusCode.NOT_FOUND


def test_adapter_quota_refuses_past_the_limit_and_recovers(tenant_worker: Worker, tmp_path: Path) -> None:
    peft = write_peft(tmp_path / "peft")
    with _client(tenant_worker, "globex") as globex, _client(tenant_worker, "acme") as acme:
        globex.register_adapter("demo", "q1", peft)
        globex.register_adapter("demo", "q2", peft)
        error = _error(lambda: globex.register_adapter("demo", "q3", peft))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant_max_adapters" in error.message and error.reason == "QUOTA_ADAPTERS"
        acme.register_adapter("demo", "q3", peft)  # another tenant's quota is its own
        globex.delete_adapter("demo", "q1")
        globex.register_adapter("demo", "q3", peft)
        for client, ids in ((globex, ("q2", "q3")), (acme, ("q3",))):
            for adapter_id in ids:
                client.delete_adapter("demo", adapter_id)


def test_keys_file_changes_apply_without_a_restart(tenant_worker: Worker, keys_file: Path) -> None:
    original = keys_file.read_text()
    try:
        _write_keys(keys_file, {"fresh-key": ("initech", "tenant")})
        os.utime(keys_file, (time.time() + 5, time.time() + 5))
        deadline = time.monotonic() + 10
        with Client(tenant_worker.address, api_key="fresh-key", retry_attempts=1) as fresh:
            while True:
                try:
                    fresh.infer("demo", IDS)
                    break
                except OrtmuxError as error:
                    assert error.code == grpc.StatusCode.UNAUTHENTICATED
                    assert time.monotonic() < deadline, "the new key never started working"
                    time.sleep(0.2)
        with _client(tenant_worker, "acme") as acme:  # revoked by the same change
            assert _error(lambda: acme.infer("demo", IDS)).code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        keys_file.write_text(original)
        os.utime(keys_file, (time.time() + 10, time.time() + 10))
        time.sleep(1.1)


def test_audit_log_has_one_line_per_register_delete_and_refused_key(
    tenant_worker: Worker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peft = write_peft(tmp_path / "peft")
    with caplog.at_level(logging.INFO, logger="ortmux.audit"):
        with _client(tenant_worker, "acme") as acme:
            acme.register_adapter("demo", "audited", peft)
            acme.delete_adapter("demo", "audited")
            _error(lambda: acme.delete_adapter("demo", "audited"))
        with _client(tenant_worker, "bad-key") as stranger:
            _error(lambda: stranger.list_models())
    events = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ortmux.audit"]
    assert [(e["event"], e["tenant"], e["result"], e.get("adapter")) for e in events] == [
        ("adapter.register", "acme", "OK", "audited"),
        ("adapter.delete", "acme", "OK", "audited"),
        ("adapter.delete", "acme", "NOT_FOUND", "audited"),
        ("auth.refused", "", "UNAUTHENTICATED", None),
    ]


def test_request_quotas_answer_resource_exhausted_and_the_tenant_recovers(tmp_path: Path) -> None:
    running = start_worker(
        worker_settings(
            tmp_path,
            "--api-keys",
            f"{key_digest('k')}:solo:tenant",
            "--tenant-max-in-flight",
            "2",
            "--tenant-max-requests-per-second",
            "50",
            "--max-batch-size",
            "1",
        )
    )
    try:
        heavy = {"input_ids": np.ones((8, 256), dtype=np.int64)}
        with Client(running.address, api_key="k", retry_attempts=1) as client:
            results = list(client.stream_infer((InferRequest("demo", heavy) for _ in range(40)), window=16))
            refused = [r.error for r in results if r.error is not None]
            assert refused and all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
            reasons = {e.reason for e in refused}
            assert reasons <= {"QUOTA_IN_FLIGHT", "QUOTA_RATE"} and "QUOTA_IN_FLIGHT" in reasons
            assert any(r.ok for r in results)
            time.sleep(1.0)  # the bucket refills
            rates = [_outcome(lambda: client.infer("demo", IDS)) for _ in range(120)]
            assert "QUOTA_RATE" in rates and rates[0] == "OK"
            time.sleep(1.0)
            assert client.infer("demo", IDS)["logits"].shape == (1, 8, 1000)
    finally:
        running.stop(0)


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
        return "OK"
    except OrtmuxError as error:
        return error.reason


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    where = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=where)  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=where)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=where)  # fmt: skip
    return where


def test_tls_and_mutual_tls(certificates: Path, tmp_path: Path) -> None:
    read = lambda name: (certificates / name).read_bytes()  # noqa: E731
    tls = [
        "--tls-cert-file",
        str(certificates / "server.pem"),
        "--tls-key-file",
        str(certificates / "server.key"),
    ]
    running = start_worker(worker_settings(tmp_path / "tls", *tls, "--http-port", "0"))
    try:
        with Client(running.address, credentials=grpc.ssl_channel_credentials(read("ca.pem"))) as client:
            assert client.infer("demo", IDS)["logits"].shape == (1, 8, 1000)
        with Client(running.address, retry_attempts=1, timeout=5) as plaintext:
            assert _error(lambda: plaintext.list_models()).code == grpc.StatusCode.UNAVAILABLE
        # The HTTP API takes the same TLS settings.
        context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
        health = f"https://127.0.0.1:{running.http_port}/health"
        with urllib.request.urlopen(health, context=context, timeout=10) as response:
            assert response.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext is refused
            urllib.request.urlopen(f"http://127.0.0.1:{running.http_port}/health", timeout=5)
    finally:
        running.stop(0)
    mutual = [*tls, "--tls-client-ca-file", str(certificates / "ca.pem")]
    running = start_worker(worker_settings(tmp_path / "mtls", *mutual))
    try:
        with_cert = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        with Client(running.address, credentials=with_cert) as client:
            assert client.infer("demo", IDS)["logits"].shape == (1, 8, 1000)
        without = grpc.ssl_channel_credentials(read("ca.pem"))
        with Client(running.address, credentials=without, retry_attempts=1, timeout=5) as client:
            assert _error(lambda: client.list_models()).code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_single_tenant_mode_warns_and_byte_quota_applies_to_the_default_tenant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peft = write_peft(tmp_path / "peft")
    size = sum(p.stat().st_size for p in peft.iterdir())
    with caplog.at_level(logging.WARNING):
        running = start_worker(
            worker_settings(tmp_path / "data", "--tenant-max-adapter-bytes", str(size + 10))
        )
    try:
        assert any("NO API KEYS CONFIGURED" in r.getMessage() for r in caplog.records)
        with Client(running.address) as client:  # no key needed
            client.register_adapter("demo", "first", peft)
            error = _error(lambda: client.register_adapter("demo", "second", peft))
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "QUOTA_ADAPTER_BYTES"
            assert "tenant_max_adapter_bytes" in error.message
            client.register_adapter("demo", "first", peft, replace=True)  # a replacement counts once
            client.delete_adapter("demo", "first")
            client.register_adapter("demo", "second", peft)
    finally:
        running.stop(0)


def test_worker_paths_confine_what_admins_may_read(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    peft = write_peft(allowed / "peft")
    outside = write_peft(tmp_path / "outside")
    (allowed / "link").symlink_to(outside)  # a link out of the allowed directory is still outside
    running = start_worker(worker_settings(tmp_path / "data", "--worker-paths", str(allowed)))
    try:
        with Client(running.address, retry_attempts=1) as client:
            assert client.register_adapter_from_path("demo", "in", str(peft)).adapter_id == "in"
            for path in (outside, allowed / "link", allowed / ".." / "outside"):
                error = _error(lambda p=path: client.register_adapter_from_path("demo", "out", str(p)))
                assert error.code == grpc.StatusCode.PERMISSION_DENIED and "worker_paths" in error.message
            demo = running.dataplane.get_model("demo").path
            assert (
                _error(lambda: client.load_model("second", str(demo))).code
                == grpc.StatusCode.PERMISSION_DENIED
            )
    finally:
        running.stop(0)
