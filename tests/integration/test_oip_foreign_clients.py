"""tritonclient and KServe's client, each in a venv of its own (they define the protobuf package
``inference`` too, and pin protobuf < 7), against a real worker: bit-equal to the native client."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ortmux.client import Client
from ortmux.worker.api.server import Worker

from ..conftest import make_venv
from .oip_models import IDS, TENANT_KEY, TYPES

CLIENTS = Path(__file__).resolve().parents[1] / "oip_clients"


def _run_in(python: Path, script: str, *args: str) -> dict:
    result = subprocess.run(
        [str(python), str(CLIENTS / script), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tritonclient_works_unchanged(oip_worker: Worker, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv", "tritonclient[grpc]==2.73.0")
    out = tmp_path / "triton.npz"
    found = _run_in(python, "triton_checks.py", oip_worker.address, TENANT_KEY, str(out))
    got = np.load(out)
    with Client(oip_worker.address, api_key=TENANT_KEY) as native:
        base = native.infer("demo", {"input_ids": IDS})["logits"]
        adapted = native.infer("demo", {"input_ids": IDS}, adapter="acme-a")["logits"]
    assert found["live"] and found["ready"]
    assert "model_repository" in found["extensions"]
    assert found["metadata"] == ["demo:acme-a", "onnxruntime_onnx", [["input_ids", "INT64", ["-1", "-1"]]]]
    assert found["config"] == ["demo", 32, ["input_ids"]]
    assert found["model_ready"] == [True, True, False]
    assert "demo:acme-a" in found["index"] and "demo" in found["index"]
    for name in ("by_name", "by_parameter", "stream_adapter"):
        assert np.array_equal(got[name], adapted), name  # bit-equal to the native client
    assert np.array_equal(got["base"], base) and np.array_equal(got["stream_base"], base)
    for datatype in TYPES:
        assert got[f"got_{datatype}"].dtype == got[f"sent_{datatype}"].dtype, datatype
        assert np.array_equal(got[f"got_{datatype}"], got[f"sent_{datatype}"]), datatype
    assert (found["request_id"], found["model_name"]) == ("x1", "demo:acme-a")
    assert len(found["stream_errors"]) == 1 and "NOT_FOUND" in found["stream_errors"][0]
    assert found["unknown_adapter"] == "StatusCode.NOT_FOUND"
    assert found["no_key"] == "StatusCode.UNAUTHENTICATED"
    assert found["both_names"] == "StatusCode.INVALID_ARGUMENT"
    assert int(found["statistics"]) >= 3
    assert found["shared_memory"] == "StatusCode.UNIMPLEMENTED"


@pytest.mark.slow
def test_kserves_client_sends_typed_contents(oip_worker: Worker, tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv", "kserve==0.21.0")
    found = _run_in(python, "kserve_checks.py", oip_worker.address, TENANT_KEY)
    with Client(oip_worker.address, api_key=TENANT_KEY) as native:
        adapted = native.infer("demo", {"input_ids": IDS}, adapter="acme-a")["logits"]
    assert found["live"] and found["ready"] and found["model_ready"]
    assert np.array_equal(np.array(found["logits"], dtype=np.float32), adapted)
    assert found["unknown"] == "NOT_FOUND"
