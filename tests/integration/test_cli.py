"""The ortmux command, run as a user runs it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from ortmux.worker.api.server import Worker

from ..conftest import serve_process

ORTMUX = [sys.executable, "-m", "ortmux.worker.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ORTMUX, *args], capture_output=True, text=True, timeout=120)


def test_models_lists_demo_with_inputs_and_outputs(worker: Worker) -> None:
    result = _run("models", "--target", worker.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "demo",
        "  input  input_ids: int64[-1, -1]",
        "  output logits: float32[-1, -1, 1000]",
        "  adaptable projections: 13",
    ]
    q_proj = "layers.0.self_attn.q_proj  128 -> 128  weight layers.0.self_attn.q_proj.weight"
    assert f"    {q_proj}  (initializer, rows)" in lines


def test_infer_prints_output_shapes_and_saves_them(worker: Worker, tmp_path: Path) -> None:
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    np.save(tmp_path / "ids.npy", ids)
    out_dir = tmp_path / "out"
    result = _run(
        "infer",
        "--target",
        worker.address,
        "--model",
        "demo",
        "--input",
        f"input_ids={tmp_path / 'ids.npy'}",
        "--output-dir",
        str(out_dir),
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"logits: float32\[2, 6, 1000\] min=\S+ max=\S+ mean=\S+\n", result.stdout)
    assert np.load(out_dir / "logits.npy").shape == (2, 6, 1000)


def test_infer_reports_server_errors_with_their_code(worker: Worker, tmp_path: Path) -> None:
    np.save(tmp_path / "ids.npy", np.zeros((1, 3), np.float32))
    result = _run(
        "infer", "--target", worker.address, "--model", "demo", "--input", f"input_ids={tmp_path / 'ids.npy'}"
    )
    assert result.returncode == 1
    assert (
        "INVALID_ARGUMENT: input 'input_ids' has dtype float32, model 'demo' expects int64" in result.stderr
    )


def test_infer_refuses_a_malformed_input_flag(worker: Worker) -> None:
    result = _run("infer", "--target", worker.address, "--model", "demo", "--input", "input_ids")
    assert result.returncode == 2
    assert "is not NAME=FILE.npy" in result.stderr


def test_serve_starts_on_the_demo_model_and_drains_on_sigterm(tmp_path: Path) -> None:
    process, address = serve_process(tmp_path)
    try:
        result = _run("models", "--target", address)
        assert result.stdout.splitlines()[0] == "demo"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_a_bad_setting(tmp_path: Path) -> None:
    result = _run("serve", "--port", "0", "--data-dir", str(tmp_path), "--model", "oops")
    assert result.returncode == 1
    assert "model 'oops' is not NAME=PATH" in result.stderr


def test_adapters_register_list_delete(worker: Worker, tmp_path: Path) -> None:
    from ..demo_adapters import write_peft

    peft = write_peft(tmp_path / "peft")
    result = _run(
        "adapters", "register", "--target", worker.address, "--model", "demo", "--id", "cli-a", str(peft)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "registered demo/cli-a: peft_lora, rank 4, 3 targets\n"
    listed = _run("adapters", "list", "--target", worker.address, "--model", "demo")
    assert listed.returncode == 0
    assert re.search(r"^demo\s+cli-a\s+peft_lora\s+4\s+\d+ yes$", listed.stdout, re.M)
    again = _run(
        "adapters", "register", "--target", worker.address, "--model", "demo", "--id", "cli-a", str(peft)
    )
    assert again.returncode == 1
    assert "ALREADY_EXISTS: adapter 'cli-a' already exists on model 'demo'" in again.stderr
    deleted = _run("adapters", "delete", "--target", worker.address, "--model", "demo", "--id", "cli-a")
    assert (deleted.returncode, deleted.stdout) == (0, "deleted demo/cli-a\n")
    assert "cli-a" not in _run("adapters", "list", "--target", worker.address).stdout


def test_large_uploads_show_a_progress_bar_and_errors_keep_their_code(worker: Worker, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\0" * (5 << 20))  # 5 MiB that no format accepts
    result = _run(
        "adapters", "register", "--target", worker.address, "--model", "demo", "--id", "junk", str(junk)
    )
    assert result.returncode == 1
    assert "] 5/5 MiB\n" in result.stderr
    assert "ortmux adapters register: INVALID_ARGUMENT: cannot tell the adapter format" in result.stderr
