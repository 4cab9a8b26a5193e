"""The grpc-free core on its own: a DataPlane over a real model registry and adapter manager on a
temporary directory, with no server; the adapter manager's collaborators constructed alone; and
the codebase's shape (no gRPC below api/, modules of one job within 400 lines)."""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ortmux.worker.adapters.loading import Resident
from ortmux.worker.adapters.local_store import AdapterMeta, AdapterStore
from ortmux.worker.adapters.manager import AdapterLimits, AdapterManager
from ortmux.worker.adapters.records import Record, Records
from ortmux.worker.adapters.residency import Residency
from ortmux.worker.adapters.store_mirror import StoreMirror
from ortmux.worker.auth import SINGLE_TENANT, Identity
from ortmux.worker.dataplane import DataPlane, InferenceRequest, RequestLimits, RequestPath
from ortmux.worker.dataplane.models import ModelManagement
from ortmux.worker.dataplane.statistics import ServingStatistics
from ortmux.worker.demo import ensure_demo_model
from ortmux.worker.engine.cache import ModelCache
from ortmux.worker.engine.registry import ModelRegistry
from ortmux.worker.engine.runtime import RuntimeOptions
from ortmux.worker.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.quotas import RequestQuotas
from ortmux.worker.scheduler.batcher import BatchLimits

from ..demo_adapters import write_peft

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker" / "ortmux" / "worker"
IDS = np.array([[5, 17, 300, 999]], dtype=np.int64)


def _plane(tmp_path: Path, quotas: RequestQuotas | None = None, allowed: Path | None = None) -> DataPlane:
    registry = ModelRegistry(RuntimeOptions(("CPUExecutionProvider",)), ModelCache(tmp_path / "cache"))
    management = ModelManagement(registry, [allowed] if allowed else [])
    adapters = AdapterManager(AdapterStore(tmp_path / "adapters"), management.get, AdapterLimits())
    statistics = ServingStatistics(Metrics(CollectorRegistry()))
    requests = RequestPath(
        management, adapters, statistics, RequestLimits(BatchLimits(max_delay=0.0)), quotas
    )
    return DataPlane(management, requests, adapters, statistics)


@pytest.fixture()
def plane(tmp_path: Path) -> Iterator[DataPlane]:
    dataplane = _plane(tmp_path)
    dataplane.load_startup_models({"demo": ensure_demo_model(tmp_path)}, own_files=True)
    yield dataplane
    dataplane.close()


def test_a_request_runs_through_the_core_without_a_server(plane: DataPlane) -> None:
    result = plane.infer(InferenceRequest(model="demo", inputs={"input_ids": IDS}, request_id="r1"))
    assert result.outputs["logits"].shape == (1, 4, 1000)
    assert (result.request_id, result.batch_rows) == ("r1", 1)
    counters = plane.model_stats("demo")
    assert (counters.success_count, counters.rows) == (1, 1)


def test_an_adapter_registered_through_the_core_serves_its_requests(plane: DataPlane, tmp_path: Path) -> None:
    from ortmux.worker.adapters.manager import UploadHeader

    adapter = write_peft(tmp_path / "adapter")
    header = UploadHeader(model="demo", adapter_id="a")
    info = plane.register_adapter_from_path(SINGLE_TENANT, header, adapter)
    assert info.resident and info.rank == 4
    base = plane.infer(InferenceRequest(model="demo", inputs={"input_ids": IDS}))
    adapted = plane.infer(InferenceRequest(model="demo", inputs={"input_ids": IDS}, adapter="a"))
    assert not np.allclose(base.outputs["logits"], adapted.outputs["logits"])


def test_a_passed_deadline_is_answered_deadline_exceeded(plane: DataPlane) -> None:
    request = InferenceRequest(model="demo", inputs={"input_ids": IDS}, deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        plane.infer(request)
    assert plane.model_stats("demo").fail_count == 1


def test_draining_tells_the_streams_and_stops_readiness(plane: DataPlane) -> None:
    told = []
    forget = plane.on_drain(lambda: told.append("first"))
    plane.on_drain(lambda: told.append("second"))
    forget()
    assert plane.ready()
    plane.drain()
    assert told == ["second"] and not plane.ready()
    plane.on_drain(lambda: told.append("late"))  # registered after: told at once
    assert told == ["second", "late"]


def test_tenant_quotas_are_enforced_by_the_core(tmp_path: Path) -> None:
    plane = _plane(tmp_path, RequestQuotas(max_per_second=1.0))
    plane.load_startup_models({"demo": ensure_demo_model(tmp_path)}, own_files=True)
    try:
        plane.infer(InferenceRequest(model="demo", inputs={"input_ids": IDS}, tenant="t"))
        with pytest.raises(ResourceExhausted) as caught:
            plane.infer(InferenceRequest(model="demo", inputs={"input_ids": IDS}, tenant="t"))
        assert caught.value.reason == "QUOTA_RATE"
        plane.infer(InferenceRequest(model="demo", inputs={"input_ids": IDS}, tenant="other"))
    finally:
        plane.close()


def test_start_up_models_pass_the_same_name_and_path_checks_as_load_model(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    plane = _plane(tmp_path, allowed=allowed)
    demo = ensure_demo_model(tmp_path / "elsewhere")
    with pytest.raises(InvalidArgument, match="model name 'bad name' is invalid"):
        plane.load_startup_models({"bad name": demo})
    with pytest.raises(PermissionDenied, match="outside the directories this worker reads from"):
        plane.load_startup_models({"demo": demo})
    with pytest.raises(PermissionDenied):
        plane.load_model(Identity("t", "admin"), "demo", demo)
    with pytest.raises(NotFound):
        plane.get_model("demo")
    plane.load_startup_models({"demo": demo}, own_files=True)  # the worker's own demo file
    assert [model.name for model in plane.list_models()] == ["demo"]
    plane.close()


# -- the adapter manager's collaborators, alone -----------------------------------------------------


def _record(tmp_path: Path, adapter_id: str, nbytes: int) -> tuple[tuple[str, str, str], Record]:
    meta = AdapterMeta(
        model="m",
        adapter_id=adapter_id,
        tenant="t",
        format="peft_lora",
        rank=1,
        targets=[],
        size_bytes=nbytes,
        sha256="",
        pinned=False,
        created_at=time.time(),
        files=[],
    )
    record = Record(meta)
    record.resident = Resident(nbytes=nbytes)
    return meta.key, record


def test_residency_evicts_the_least_recently_used_past_its_budget(tmp_path: Path) -> None:
    records = Records()
    residency = Residency(
        records, AdapterStore(tmp_path), None, AdapterLimits(memory_budget_bytes=250), lambda name: None
    )
    keys = []
    with records.lock:
        for name in ("a", "b", "c"):
            key, record = _record(tmp_path, name, 100)
            records.entries[key] = record
            residency.make_resident(key, record, record.resident)
            keys.append(key)
    assert residency.resident_bytes() == 200
    assert records.entries[keys[0]].resident is None and records.entries[keys[0]].evicted
    with residency.hold(keys[2], records.entries[keys[2]]) as resident:
        assert resident.nbytes == 100 and records.entries[keys[2]].in_use == 1
    assert records.entries[keys[2]].in_use == 0


def test_a_store_mirror_without_a_shared_store_answers_unknown_ids_not_found(tmp_path: Path) -> None:
    records = Records()
    dropped = []
    mirror = StoreMirror(records, AdapterStore(tmp_path), None, 20.0, lambda key, record: dropped.append(key))
    key, record = _record(tmp_path, "known", 10)
    records.entries[key] = record
    assert mirror.find(key, field="adapter") is record
    with pytest.raises(NotFound, match="adapter 'other' is not registered on model 'm'"):
        mirror.find(("m", "t", "other"), field="adapter")
    assert mirror.sync() == 0 and mirror.complete and dropped == []


# -- the codebase's shape ---------------------------------------------------------------------------


def _modules() -> list[Path]:
    roots = [WORKER, REPO / "client" / "ortmux"]
    generated = {"v1", "inference_v2"}
    return [
        path
        for root in roots
        for path in sorted(root.rglob("*.py"))
        if not generated & set(path.relative_to(root).parts)
    ]


def test_nothing_below_the_api_imports_grpc() -> None:
    offenders = []
    for path in WORKER.rglob("*.py"):
        relative = path.relative_to(WORKER)
        if relative.parts[0] == "api" or relative.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == "grpc" or name.startswith(("grpc.", "grpc_")) for name in names):
                offenders.append(str(relative))
    assert offenders == []


def test_every_hand_written_module_is_within_400_lines_and_says_its_job() -> None:
    too_long = {}
    undocumented = []
    for path in _modules():
        text = path.read_text()
        lines = text.count("\n")
        if lines > 400:
            too_long[str(path.relative_to(REPO))] = lines
        if (path.name != "__init__.py" or lines > 5) and not ast.get_docstring(ast.parse(text)):
            undocumented.append(str(path.relative_to(REPO)))
    assert too_long == {}
    assert undocumented == []


def test_no_worker_class_is_built_from_mixins() -> None:
    """Classes of the worker inherit from at most one of the worker's own classes (composition,
    not mixins sharing private fields)."""
    own = set()
    trees = {path: ast.parse(path.read_text()) for path in WORKER.rglob("*.py")}
    for tree in trees.values():
        own |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    mixed = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [base.id for base in node.bases if isinstance(base, ast.Name) and base.id in own]
                if len(bases) > 1:
                    mixed.append(f"{path.name}:{node.name}({', '.join(bases)})")
    assert mixed == []
