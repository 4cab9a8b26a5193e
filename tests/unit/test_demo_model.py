from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ortmux.worker.demo import build_demo_model, ensure_demo_model

from ..conftest import plain_session


def test_demo_model_bytes_are_deterministic() -> None:
    assert build_demo_model().SerializeToString() == build_demo_model().SerializeToString()


def test_demo_model_is_written_once_and_loads_fast(tmp_path: Path) -> None:
    path = ensure_demo_model(tmp_path)
    # No temp file left behind; the config.json beside it declares its context length.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, "config.json"])
    first_mtime = path.stat().st_mtime_ns
    assert ensure_demo_model(tmp_path) == path
    assert path.stat().st_mtime_ns == first_mtime
    assert 1_000_000 < path.stat().st_size < 8_000_000
    started = time.perf_counter()
    session = plain_session(path)
    assert time.perf_counter() - started < 5  # generous: "well under a second" on any CI box
    (logits,) = session.run(None, {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)})
    assert logits.shape == (1, 3, 1000)
    assert np.isfinite(logits).all()


def test_demo_weights_carry_module_names() -> None:
    names = {init.name for init in build_demo_model().graph.initializer}
    assert "layers.0.self_attn.q_proj.weight" in names
    assert "layers.1.mlp.down_proj.weight" in names
