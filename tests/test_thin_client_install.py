"""The thin client installs without ONNX Runtime, on the protobuf and grpcio versions it declares,
and beside the ecosystem's clients (tritonclient pins protobuf < 7); each install calls a real
worker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ortmux.worker.api.server import Worker

from .conftest import make_venv

# Run in the venv under test against the worker of this test session.
CALL_WORKER = """
import sys, numpy as np
from ortmux.client import Client
with Client(sys.argv[1], timeout=30) as client:
    logits = client.infer("demo", {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})["logits"]
    print("logits", logits.shape, [m.name for m in client.list_models()])
"""


def _run(python: Path, *args: str) -> str:
    result = subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _versions(python: Path, *names: str) -> dict[str, str]:
    lines = _run(python, "-m", "pip", "list", "--format=freeze").lower().splitlines()
    found = dict(line.split("==", 1) for line in lines if "==" in line)
    return {name: found.get(name, "") for name in names}


@pytest.mark.slow
def test_plain_install_imports_the_client_without_onnxruntime(
    tmp_path: Path, client_wheel: Path, worker: Worker
) -> None:
    python = make_venv(tmp_path / "venv", str(client_wheel))
    probe = (
        "import importlib.util, ortmux.client as c;"
        "from ortmux.client import Client, AsyncClient, OrtmuxError;"
        "assert importlib.util.find_spec('onnxruntime') is None, 'onnxruntime is installed';"
        "assert importlib.util.find_spec('onnx') is None, 'onnx is installed';"
        "import sys; assert 'onnxruntime' not in sys.modules;"
        "print(sorted(c.__all__))"
    )
    assert "Client" in _run(python, "-c", probe)
    listed = _run(python, "-m", "pip", "list", "--format=freeze").lower()
    assert "onnxruntime" not in listed
    assert "prometheus" not in listed
    assert _versions(python, "protobuf")["protobuf"].startswith("7.")  # the newest it allows
    assert "logits (1, 3, 1000) ['demo']" in _run(python, "-W", "error", "-c", CALL_WORKER, worker.address)


@pytest.mark.slow
def test_the_client_runs_on_the_oldest_protobuf_and_grpcio_it_declares(
    tmp_path: Path, client_wheel: Path, worker: Worker
) -> None:
    python = make_venv(tmp_path / "venv", "protobuf==6.30.0", "grpcio==1.72.2", str(client_wheel))
    assert _versions(python, "protobuf", "grpcio") == {"protobuf": "6.30.0", "grpcio": "1.72.2"}
    assert "logits (1, 3, 1000) ['demo']" in _run(python, "-W", "error", "-c", CALL_WORKER, worker.address)


@pytest.mark.slow
def test_the_client_installs_beside_tritonclient(tmp_path: Path, client_wheel: Path, worker: Worker) -> None:
    python = make_venv(tmp_path / "venv", "tritonclient[grpc]==2.73.0", str(client_wheel))
    _run(python, "-m", "pip", "check")
    assert _versions(python, "protobuf")["protobuf"] < "7"
    _run(python, "-W", "error", "-c", "import ortmux.client, tritonclient.grpc")
    assert "logits (1, 3, 1000) ['demo']" in _run(python, "-W", "error", "-c", CALL_WORKER, worker.address)
