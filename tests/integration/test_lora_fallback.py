"""Where the LoRA kernel cannot be built (no C compiler), the worker says so and serves LoRA
adapters through MatMul on copied factors, with the same results: a real worker process whose C
compiler is missing and whose temporary directory holds no built library."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ortmux.client import Client

from ..conftest import serve_process
from ..demo_adapters import merged_reference, write_peft

IDS = np.array([[5, 17, 256, 999, 3], [1, 2, 3, 4, 5]], dtype=np.int64)


def test_without_a_compiler_the_worker_warns_and_serves_adapters_through_matmul(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"CC": str(tmp_path / "no-such-compiler"), "TMPDIR": str(scratch)}
    process, address = serve_process(tmp_path / "data", env=env, keep_reading=True)
    try:
        adapter = write_peft(tmp_path / "peft")
        with Client(address, timeout=60) as client:
            client.register_adapter("demo", "a", adapter)
            got = client.infer("demo", {"input_ids": IDS}, adapter="a")["logits"]
            base = client.infer("demo", {"input_ids": IDS})["logits"]
        want = merged_reference(adapter, IDS)
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
        assert np.abs(got - base).max() > 1e-3  # the adapter applied
        log = "".join(process.log_lines)  # type: ignore[attr-defined]
        assert "LoRA kernel off" in log and "branches use MatMul" in log, log[-3000:]
        assert not list(scratch.glob("ortmux-kernels-*/*.so"))
    finally:
        process.terminate()
        process.wait(30)
