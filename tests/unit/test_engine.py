"""The engine core with real ONNX Runtime sessions and real cache files on disk."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from ortmux.worker.demo import TransformerShape, build_transformer, ensure_demo_model
from ortmux.worker.engine.arena import Arena
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.cache import BASE_MODEL_FILE, DATA_FILE, MANIFEST_FILE, MODEL_FILE, ModelCache
from ortmux.worker.engine.providers import CPU, cuda_works
from ortmux.worker.engine.runtime import RuntimeOptions
from ortmux.worker.errors import InvalidArgument

from ..conftest import plain_session

CPU_RUNTIME = RuntimeOptions(providers=(CPU,))
IDS = np.array([[3, 14, 15, 92, 65, 35]], dtype=np.int64)
Q_PROJ = "layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(demo_path: Path) -> np.ndarray:
    return plain_session(demo_path).run(None, {"input_ids": IDS})[0]


def _load(path: Path, cache_dir: Path, **kwargs: object) -> BaseModel:
    return BaseModel("m", path, CPU_RUNTIME, ModelCache(cache_dir), **kwargs)  # type: ignore[arg-type]


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "content")))


def test_first_load_misses_then_hits_with_identical_outputs(
    demo_path: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    first = _load(demo_path, tmp_path)
    second = _load(demo_path, tmp_path)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.entry.directory == second.entry.directory
    assert sorted(p.name for p in first.entry.directory.iterdir()) == [
        MANIFEST_FILE,
        MODEL_FILE,
        DATA_FILE,
        BASE_MODEL_FILE,
    ]
    for model in (first, second):
        np.testing.assert_allclose(model.run({"input_ids": IDS})["logits"], reference, rtol=1e-4, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".build", ".discard"))]


def test_cached_graph_is_optimized_and_carries_prepacked_weights(demo_path: Path, tmp_path: Path) -> None:
    model = _load(demo_path, tmp_path)
    source_nodes = len(onnx.load(str(demo_path)).graph.node)
    optimized = onnx.load(str(model.entry.model_path), load_external_data=False)
    rewritten_nodes = source_nodes + 3 * len(model.lora_inputs)  # each LoRA branch: two MatMuls, one Add
    assert len(optimized.graph.node) < rewritten_nodes  # weight transposes folded, fusions applied
    initializers = {tensor.name for tensor in optimized.graph.initializer}
    assert not [n for n in optimized.graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    assert model.entry.data_path.stat().st_size > demo_path.stat().st_size  # weights plus prepacked blobs


@pytest.mark.parametrize(
    "change",
    [
        {"onnxruntime_version": "0.0.0-other"},
        {"providers": ("CUDAExecutionProvider", CPU)},
        {"optimization_level": "basic"},
        {"cpu": "other-arch:0"},
        {"overridable": (Q_PROJ,)},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_key_field_changes_the_entry(
    demo_path: Path, tmp_path: Path, change: dict[str, object]
) -> None:
    key = _load(demo_path, tmp_path).key
    assert dataclasses.replace(key, **change).digest != key.digest  # type: ignore[arg-type]


def test_changed_model_bytes_miss(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(
        build_transformer(TransformerShape(vocab=1000, d_model=64, heads=2, d_ff=128, layers=1)), str(path)
    )
    first = _load(path, tmp_path / "cache")
    onnx.save(
        build_transformer(TransformerShape(vocab=1000, d_model=64, heads=2, d_ff=128, layers=1, seed=5)),
        str(path),
    )
    second = _load(path, tmp_path / "cache")
    assert first.sha256 != second.sha256
    assert not second.cache_hit
    assert len(_entries(tmp_path / "cache")) == 2


def _truncate_data(entry: Path) -> None:
    data = entry / DATA_FILE
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _flip_model_byte(entry: Path) -> None:
    model = entry / MODEL_FILE
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))


def _foreign_manifest(entry: Path) -> None:
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    manifest["key"]["onnxruntime_version"] = "9.9.9"
    (entry / MANIFEST_FILE).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated data": _truncate_data,
    "flipped model byte": _flip_model_byte,
    "missing manifest": lambda entry: (entry / MANIFEST_FILE).unlink(),
    "foreign manifest": _foreign_manifest,
    "missing data": lambda entry: (entry / DATA_FILE).unlink(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_unusable_entry_is_logged_and_rebuilt(
    demo_path: Path, reference: np.ndarray, tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _load(demo_path, tmp_path).entry.directory
    CORRUPTIONS[corruption](entry)
    with caplog.at_level(logging.WARNING):
        rebuilt = _load(demo_path, tmp_path)
    assert not rebuilt.cache_hit
    assert any("rebuilding" in record.getMessage() for record in caplog.records)
    np.testing.assert_allclose(rebuilt.run({"input_ids": IDS})["logits"], reference, rtol=1e-4, atol=1e-4)
    assert _load(demo_path, tmp_path).cache_hit


def test_overridable_tensors_survive_optimization_and_can_be_fed(demo_path: Path, tmp_path: Path) -> None:
    model = _load(demo_path, tmp_path, overridable_patterns=["layers.*.self_attn.q_proj.weight"])
    assert model.overridable == (Q_PROJ, "layers.1.self_attn.q_proj.weight")
    optimized = onnx.load(str(model.entry.model_path), load_external_data=False)
    assert set(model.overridable) <= {value.name for value in optimized.graph.input}
    assert set(model.overridable) <= {tensor.name for tensor in optimized.graph.initializer}
    names = {arg.name for arg in model._base.session.get_overridable_initializers()}
    assert set(model.overridable) <= names
    # other weights were folded or prepacked: not overridable
    assert "layers.0.self_attn.k_proj.weight" not in names


def test_unknown_overridable_pattern_is_refused(demo_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"overridable pattern 'nothing\.\*' matches no initializer"):
        _load(demo_path, tmp_path, overridable_patterns=["nothing.*"])


def test_extra_session_replaces_only_its_own_tensor(
    demo_path: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    model = _load(demo_path, tmp_path, overridable_patterns=[Q_PROJ])
    zero_q = np.zeros((128, 128), dtype=np.float32)
    override = model.new_session({Q_PROJ: zero_q})
    assert model.sessions == 3
    overridden = model.run({"input_ids": IDS}, session=override)["logits"]
    base = model.run({"input_ids": IDS})["logits"]
    np.testing.assert_allclose(base, reference, rtol=1e-4, atol=1e-4)
    assert not np.allclose(overridden, reference, atol=1e-3)
    assert override.own_bytes == zero_q.nbytes
    override.close()
    assert model.sessions == 2
    with pytest.raises(InvalidArgument, match="is not an overridable tensor"):
        model.new_session({"layers.0.self_attn.k_proj.weight": zero_q})


def test_arena_tensors_are_shared_in_place_not_copied(demo_path: Path, tmp_path: Path) -> None:
    """Sessions read an arena tensor in place: changing its buffer changes every session's output."""
    model = _load(demo_path, tmp_path)
    arena = Arena(model.entry, owned=["norm.weight"])
    model.arena = arena
    sessions = [model.new_session() for _ in range(3)]
    before = [model.run({"input_ids": IDS}, session=s)["logits"] for s in sessions]
    arena.host_array("norm.weight")[:] = 0.0  # the final layer norm now outputs its bias (zeros)
    after = [model.run({"input_ids": IDS}, session=s)["logits"] for s in sessions]
    for old, new in zip(before, after, strict=True):
        assert not np.allclose(old, new)
        np.testing.assert_allclose(new, 0.0, atol=1e-6)


def test_extra_sessions_add_no_copy_of_the_weights(tmp_path: Path) -> None:
    """Eight more sessions on a 28 MB base: heap growth stays far below one copy of the weights.
    Measured in a fresh process, so the suite's other threads and heap state do not count."""
    path = tmp_path / "mid.onnx"
    onnx.save(
        build_transformer(TransformerShape(vocab=4000, d_model=256, heads=4, d_ff=1024, layers=4)), str(path)
    )
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        import numpy as np
        from ortmux.worker.engine.base_model import BaseModel
        from ortmux.worker.engine.cache import ModelCache
        from ortmux.worker.engine.runtime import RuntimeOptions, configure_process

        def anonymous_kib():
            for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
                if line.startswith("Anonymous:"):
                    return int(line.split()[1])

        configure_process(0)
        model = BaseModel("m", Path({str(path)!r}), RuntimeOptions(("CPUExecutionProvider",)),
                          ModelCache(Path({str(tmp_path / "cache")!r})))
        ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
        model.run({{"input_ids": ids}})
        before = anonymous_kib()
        sessions = [model.new_session() for _ in range(8)]
        for session in sessions:
            model.run({{"input_ids": ids}}, session=session)
        print(anonymous_kib() - before)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.strip().splitlines()[-1])
    weights_kib = path.stat().st_size // 1024
    assert grown < weights_kib / 2, (
        f"8 sessions grew the heap by {grown} KiB; the weights are {weights_kib} KiB"
    )


def test_concurrent_processes_build_one_entry(demo_path: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from ortmux.worker.engine.base_model import BaseModel
        from ortmux.worker.engine.cache import ModelCache
        from ortmux.worker.engine.runtime import RuntimeOptions, configure_process
        configure_process(1)
        model = BaseModel("m", Path({str(demo_path)!r}), RuntimeOptions(("CPUExecutionProvider",)),
                          ModelCache(Path({str(tmp_path)!r})))
        print("hit" if model.cache_hit else "miss")
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert all(p.returncode == 0 for p in processes)
    assert outcomes == ["hit", "hit", "miss"]
    assert len(_entries(tmp_path)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build")]


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_works(), reason="needs a CUDA device")
def test_cuda_arena_lives_on_the_device_and_is_shared(
    demo_path: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    runtime = RuntimeOptions(providers=("CUDAExecutionProvider", CPU))
    model = BaseModel("m", demo_path, runtime, ModelCache(tmp_path))
    assert model.providers[0] == "CUDAExecutionProvider"
    assert model.arena.owned_bytes > 2_000_000
    extra = model.new_session()
    for session in (None, extra):
        np.testing.assert_allclose(
            model.run({"input_ids": IDS}, session=session)["logits"], reference, atol=1e-3
        )


@pytest.mark.parametrize("branch", ["kernel", "matmul"])
def test_base_only_graph_has_no_branches_and_the_same_outputs(
    demo_path: Path, tmp_path: Path, branch: str
) -> None:
    runtime = RuntimeOptions(providers=(CPU,), lora_branch=branch)
    model = BaseModel("m", demo_path, runtime, ModelCache(tmp_path))
    full = onnx.load(str(model.entry.model_path), load_external_data=False)
    plain = onnx.load(str(model.entry.directory / BASE_MODEL_FILE), load_external_data=False)
    assert len(model.lora_inputs) == 13
    assert all(bool(lora.table) == (branch == "kernel") for lora in model.lora_inputs)
    assert {node.domain for node in full.graph.node if node.op_type == "LoraBranch"} == (
        {"ortmux"} if branch == "kernel" else set()
    )
    assert not [t for t in plain.graph.initializer if t.name.startswith("ortmux.lora.")]
    assert not [
        n for n in plain.graph.node if n.domain == "ortmux" or any("ortmux.lora." in i for i in n.input)
    ]
    assert "ortmux" not in {opset.domain for opset in plain.opset_import}
    per_branch = 1 if branch == "kernel" else 2
    assert len(full.graph.node) - len(plain.graph.node) >= per_branch * len(model.lora_inputs) - 1
    # both graphs read the same data file: one copy of the weights for both sessions
    locations = {e.value for t in plain.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {model.entry.data_path.name}
    base_run = model.run({"input_ids": IDS})["logits"]
    full_run = model._base.run(["logits"], {"input_ids": IDS})[0]
    np.testing.assert_allclose(base_run, full_run, rtol=1e-6, atol=1e-6)


def test_a_failed_load_leaves_no_model_reported_as_loading(demo_path: Path, tmp_path: Path) -> None:
    from ortmux.worker.engine.registry import ModelRegistry
    from ortmux.worker.errors import NotFound

    registry = ModelRegistry(CPU_RUNTIME, ModelCache(tmp_path))
    with pytest.raises(NotFound, match="no file at"):
        registry.load_all({"bad": tmp_path / "missing.onnx", "later": demo_path})
    assert registry.loading() == []
    with pytest.raises(NotFound, match="model 'later' is not served here"):
        registry.get("later")
    registry.load("later", demo_path)
    assert [model.name for model in registry.all()] == ["later"]


def test_no_request_can_feed_a_branch_input(demo_path: Path, tmp_path: Path) -> None:
    """The kernel's tables hold addresses: only the worker builds them, no request may name them."""
    model = _load(demo_path, tmp_path)
    names = {name for lora in model.lora_inputs for name in lora.names}
    assert names and not names & {spec.name for spec in model.inputs}
    assert not names & set(model.feedable_specs())
    table = np.array([[1 << 40, 1 << 40, 16, 0]], np.int64)
    for name in sorted(names)[:2]:
        with pytest.raises(InvalidArgument, match=name.replace(".", r"\.")):
            model.run({"input_ids": IDS, name: table})
