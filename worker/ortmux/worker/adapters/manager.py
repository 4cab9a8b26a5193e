"""Registered adapters: validation against their base, persistence, residency and use.

Registering parses and checks the payload against the base model, writes it atomically, and
makes it resident; the next request can use it. Resident adapters live within a memory budget:
the least recently used unpinned ones leave memory and come back from disk on demand. A request
holds its adapter while it runs; deleting waits for those requests to finish.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ortmux.worker.adapters import formats
from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.store import DEFAULT_TENANT, AdapterMeta, AdapterStore, PendingAdapter
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.lora.feeds import LoraWeights, rank_bucket
from ortmux.worker.engine.lora.targets import map_modules
from ortmux.worker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DELETE_WAIT_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class AdapterLimits:
    max_adapter_bytes: int = 1 << 30
    max_upload_chunks: int = 1 << 20
    memory_budget_bytes: int = 2 << 30
    tenant_max_adapters: int = 0  # per tenant and model; 0: no quota
    tenant_max_adapter_bytes: int = 0  # stored bytes per tenant over all models; 0: no quota


@dataclasses.dataclass(frozen=True)
class UploadHeader:
    model: str
    adapter_id: str
    format: str = ""  # "" detects the format
    total_bytes: int = 0
    sha256: str = ""
    files: tuple[tuple[str, int], ...] = ()  # named files back to back; () = one file or archive
    pinned: bool = False
    replace: bool = False
    module_mapping_json: str = ""
    tenant: str = DEFAULT_TENANT


@dataclasses.dataclass(frozen=True)
class UploadTrailer:
    """The optional last part of an upload: its checksum, computed while sending."""

    sha256: str


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    model: str
    adapter_id: str
    format: str
    rank: int
    targets: tuple[str, ...]
    size_bytes: int
    resident: bool
    resident_bytes: int
    pinned: bool
    created_at: float
    last_used_at: float
    sha256: str


@dataclasses.dataclass
class Resident:
    """An adapter in memory, in the form a run uses."""

    lora: dict[str, LoraWeights] = dataclasses.field(default_factory=dict)
    feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    nbytes: int = 0


@dataclasses.dataclass
class _Record:
    meta: AdapterMeta
    resident: Resident | None = None
    last_used_at: float = 0.0
    in_use: int = 0
    deleting: bool = False
    evicted: bool = False


@dataclasses.dataclass
class AdapterCounters:
    registrations: int = 0
    evictions: int = 0
    reloads: int = 0
    load_seconds_total: float = 0.0


Key = tuple[str, str, str]  # (model, tenant, adapter id)


def validate_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID.match(adapter_id or ""):
        raise InvalidArgument(
            f"adapter id {adapter_id!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field="adapter_id",
        )


class AdapterManager:
    def __init__(
        self, store: AdapterStore, models: Callable[[str], BaseModel], limits: AdapterLimits
    ) -> None:
        self.store = store
        self._model = models
        self.limits = limits
        self.counters = AdapterCounters()
        self._records: dict[Key, _Record] = {}
        self._lru: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._resident_bytes = 0
        self._pending: set[Key] = set()
        self._lock = threading.Condition()
        for meta in store.scan():
            self._records[(meta.model, meta.tenant, meta.adapter_id)] = _Record(
                meta, last_used_at=meta.created_at
            )
        if self._records:
            log.info("%d adapters on disk; they load on first use", len(self._records))

    # -- registration ------------------------------------------------------------------------------

    def receive(
        self, header: UploadHeader, parts: Iterable[bytes | UploadTrailer]
    ) -> tuple[UploadHeader, Payload, PendingAdapter]:
        """The payload of an upload, checked against its size and checksum, and written to a
        staging directory as it arrives; returns the header with the verified sha256 filled in.

        The checksum comes in the header or in a trailer after the last chunk (so a client can
        hash while sending). Refuses an upload as soon as it passes its declared or allowed size,
        so neither memory nor disk ever holds more than ``max_adapter_bytes`` of it.
        """
        limit = self.limits.max_adapter_bytes
        if header.total_bytes <= 0:
            raise InvalidArgument("header.total_bytes must be positive", field="header.total_bytes")
        if header.total_bytes > limit:
            raise ResourceExhausted(
                f"adapter of {header.total_bytes} bytes exceeds the limit of {limit} bytes",
                field="header.total_bytes",
            )
        if header.sha256 and not _SHA256.match(header.sha256):
            raise InvalidArgument("header.sha256 must be 64 lower-case hex digits", field="header.sha256")
        _check_file_list(header.files, header.total_bytes)
        digest = hashlib.sha256()
        received = 0
        trailer: UploadTrailer | None = None
        pending = self.store.begin(header.total_bytes)
        try:
            for count, part in enumerate(parts, start=1):
                if trailer is not None:
                    raise InvalidArgument(
                        "the trailer must be the last message of an upload", field="trailer"
                    )
                if isinstance(part, UploadTrailer):
                    if not _SHA256.match(part.sha256):
                        raise InvalidArgument(
                            "trailer.sha256 must be 64 lower-case hex digits", field="trailer.sha256"
                        )
                    trailer = part
                    continue
                if count > self.limits.max_upload_chunks:
                    raise ResourceExhausted(
                        f"upload has more than {self.limits.max_upload_chunks} chunks", field="chunk"
                    )
                received += len(part)
                if received > header.total_bytes:
                    raise InvalidArgument(
                        f"upload sent more than the {header.total_bytes} bytes its header declares",
                        field="chunk",
                    )
                digest.update(part)
                pending.write(part)
            if received != header.total_bytes:
                raise InvalidArgument(
                    f"upload ended after {received} of {header.total_bytes} bytes", field="chunk"
                )
            declared = [
                (field, value)
                for field, value in (
                    ("header.sha256", header.sha256),
                    ("trailer.sha256", trailer and trailer.sha256),
                )
                if value
            ]
            if not declared:
                raise InvalidArgument(
                    "the upload carries no sha256: set header.sha256 or end with a trailer",
                    field="header.sha256",
                )
            for field, value in declared:
                if value != digest.hexdigest():
                    raise InvalidArgument(
                        f"checksum mismatch: {field} is {value}, the payload hashes to {digest.hexdigest()}",
                        field=field,
                    )
            payload = pending.finish()
        except BaseException:
            pending.abort()
            raise
        return dataclasses.replace(header, sha256=digest.hexdigest()), payload, pending

    def register(self, header: UploadHeader, payload: Payload, pending: PendingAdapter) -> AdapterInfo:
        """Check a received payload against its base, then commit and make it resident."""
        try:
            return self._register(header, payload, header.sha256, pending)
        finally:
            pending.abort()  # no-op once committed (the directory has moved)

    def register_from_path(self, header: UploadHeader, path: Path) -> AdapterInfo:
        """Register an adapter from a file, archive or directory on the worker's filesystem."""
        if not path.exists():
            raise NotFound(f"no file or directory at {path}", field="path")
        sources = (
            sorted(p for p in path.iterdir() if p.is_file() and p.name != "README.md")
            if path.is_dir()
            else [path]
        )
        size = sum(p.stat().st_size for p in sources)
        if size > self.limits.max_adapter_bytes:
            raise ResourceExhausted(
                f"{path} exceeds the limit of {self.limits.max_adapter_bytes} bytes", field="path"
            )
        if path.is_dir():
            header = dataclasses.replace(header, files=tuple((p.name, p.stat().st_size) for p in sources))
        digest = hashlib.sha256()
        block = memoryview(bytearray(1 << 20))  # one reused buffer: no fresh pages to fault in
        pending = self.store.begin(size)
        changed = FailedPrecondition(f"{path} changed while it was being read", field="path")
        try:
            copied = 0
            for source in sources:
                with source.open("rb") as handle:
                    while count := handle.readinto(block):
                        copied += count
                        if copied > size:
                            raise changed
                        digest.update(block[:count])
                        pending.write(block[:count])
            if copied != size:
                raise changed
            return self._register(header, pending.finish(), digest.hexdigest(), pending)
        finally:
            pending.abort()

    def _register(
        self, header: UploadHeader, payload: Payload, sha256: str, pending: PendingAdapter
    ) -> AdapterInfo:
        model = self._model(header.model)
        validate_adapter_id(header.adapter_id)
        key = (model.name, header.tenant, header.adapter_id)
        with self._lock:
            if key in self._pending:
                raise Unavailable(
                    f"adapter '{header.adapter_id}' is being registered or deleted right now", retry_after=1.0
                )
            if key in self._records and not header.replace:
                raise AlreadyExists(
                    f"adapter '{header.adapter_id}' already exists on model '{model.name}'; "
                    "set replace to overwrite it",
                    field="adapter_id",
                )
            self._check_quotas(key, len(payload))
            self._pending.add(key)
        try:
            started = time.perf_counter()
            meta = AdapterMeta(
                model=model.name,
                adapter_id=header.adapter_id,
                tenant=header.tenant,
                format=header.format,
                rank=0,
                targets=[],
                size_bytes=len(payload),
                sha256=sha256,
                pinned=header.pinned,
                created_at=time.time(),
                files=list(header.files),
                module_mapping_json=header.module_mapping_json,
            )
            resident, meta.format, meta.rank, meta.targets = self._load(model, meta, payload)
            checked = time.perf_counter()
            pending.commit(meta)
            log.info(
                "adapter %s/%s registered: %s, rank %d, %d targets, %d bytes "
                "(checked in %.1f ms, committed in %.1f ms)",
                model.name,
                header.adapter_id,
                meta.format,
                meta.rank,
                len(meta.targets),
                meta.size_bytes,
                (checked - started) * 1000,
                (time.perf_counter() - checked) * 1000,
            )
            with self._lock:
                old = self._records.get(key)
                if old is not None:
                    self._drop_resident(key, old)
                record = _Record(meta, last_used_at=meta.created_at)
                self._records[key] = record
                self._make_resident(key, record, resident)
                self.counters.registrations += 1
                self.counters.load_seconds_total += checked - started
                return self._info(record)
        finally:
            with self._lock:
                self._pending.discard(key)

    def _load(
        self, model: BaseModel, meta: AdapterMeta, payload: Payload
    ) -> tuple[Resident, str, int, list[str]]:
        """Payload -> resident form on ``model``, with the detected format, rank and targets."""
        named = None
        if meta.files:
            named, offset, view = {}, 0, memoryview(payload)
            for name, size in meta.files:
                named[name] = view[offset : offset + size]
                offset += size
        files = formats.unpack(payload, named, self.limits.max_adapter_bytes)
        fmt = meta.format or formats.detect(files)
        parsed = formats.parse(fmt, files, _parse_mapping(meta.module_mapping_json))
        resident, rank, targets = self._materialize(model, parsed)
        return resident, fmt, rank, targets

    def _materialize(
        self, model: BaseModel, parsed: formats.ParsedAdapter
    ) -> tuple[Resident, int, list[str]]:
        """The resident form of a parsed adapter on ``model``, with its rank and target weights."""
        if parsed.format == formats.PEFT_LORA:
            if not model.lora_inputs and not model.unadaptable and not model.fused:
                raise FailedPrecondition(
                    f"model '{model.name}' takes no LoRA adapters: it has no MatMul or Gemm on a "
                    "weight, or its inputs share no dynamic batch dimension"
                )
            sites = map_modules(
                model.lora_sites,
                [m.module for m in parsed.peft_modules],
                parsed.module_mapping,
                model.unadaptable,
                model.fused,
            )
            weights_of = {}
            for module in parsed.peft_modules:
                site = sites[module.module]
                if module.a.shape[1] != site.in_features or module.b.shape[0] != site.out_features:
                    raise InvalidArgument(
                        f"module '{module.module}' has lora_A {list(module.a.shape)} and lora_B "
                        f"{list(module.b.shape)}, but weight '{site.weight}' is {site.in_features} -> "
                        f"{site.out_features}",
                        field="adapter_model.safetensors",
                    )
                if site.weight in weights_of:
                    raise InvalidArgument(
                        f"two modules map to weight '{site.weight}'", field="target_modules"
                    )
                weights_of[site.weight] = module
            lora = _lora_factors(weights_of)
            nbytes = sum(weights.nbytes for weights in lora.values())
            rank = max(module.rank for module in weights_of.values())
            return Resident(lora=lora, nbytes=nbytes), rank, sorted(lora)
        if parsed.format == formats.ORT_ADAPTER:
            specs = model.feedable_specs()
            for name, array in parsed.tensors.items():
                _check_tensor(model, name, array, specs)
            nbytes = sum(array.nbytes for array in parsed.tensors.values())
            return Resident(feeds=dict(parsed.tensors), nbytes=nbytes), 0, sorted(parsed.tensors)
        specs = model.feedable_specs()
        for name, array in parsed.tensors.items():
            if name not in model.overridable:
                known = name in model.initializer_names
                raise (FailedPrecondition if known else InvalidArgument)(
                    f"weight '{name}' is not overridable on model '{model.name}'"
                    + (
                        "; start the worker with --overridable to keep it replaceable"
                        if known
                        else ": no such weight"
                    ),
                    field="tensors",
                )
            _check_tensor(model, name, array, specs)
        # Fed with each run as overridable initializers: ONNX Runtime reads them in place, and the
        # base session with its shared arena serves the rest. (A session per override adapter
        # cost 150+ ms to create on the bench base; feeding costs nothing measurable.)
        tensors = {name: np.ascontiguousarray(array) for name, array in parsed.tensors.items()}
        return Resident(feeds=tensors, nbytes=sum(a.nbytes for a in tensors.values())), 0, sorted(tensors)

    # -- use ---------------------------------------------------------------------------------------

    @contextmanager
    def use(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> Iterator[Resident]:
        """Hold an adapter for one run: loaded if it was evicted, and never deleted meanwhile."""
        key = (model, tenant, adapter_id)
        with self._lock:
            record = self._live_record(key, field="adapter")
            record.in_use += 1
            record.last_used_at = time.time()
        try:
            yield self._ensure_resident(key, record)
        finally:
            with self._lock:
                record.in_use -= 1
                self._lock.notify_all()

    def _ensure_resident(self, key: Key, record: _Record) -> Resident:
        with self._lock:
            if record.resident is not None:
                self._lru.move_to_end(key)
                return record.resident
        started = time.perf_counter()
        resident, *_ = self._load(self._model(key[0]), record.meta, self.store.read_payload(*key))
        with self._lock:
            if record.resident is not None:  # another request loaded it meanwhile
                return record.resident
            if record.evicted:
                self.counters.reloads += 1
            self.counters.load_seconds_total += time.perf_counter() - started
            self._make_resident(key, record, resident)
            return resident

    def _make_resident(self, key: Key, record: _Record, resident: Resident) -> None:
        record.resident = resident
        self._resident_bytes += resident.nbytes
        self._lru[key] = None
        self._lru.move_to_end(key)
        self._evict_over_budget(keep=key)

    def _evict_over_budget(self, keep: Key) -> None:
        for key in list(self._lru):
            if self._resident_bytes <= self.limits.memory_budget_bytes:
                return
            record = self._records[key]
            if key == keep or record.meta.pinned or record.in_use:
                continue
            self._drop_resident(key, record)
            record.evicted = True
            self.counters.evictions += 1

    def _drop_resident(self, key: Key, record: _Record) -> None:
        if record.resident is not None:
            self._resident_bytes -= record.resident.nbytes
            record.resident = None
        self._lru.pop(key, None)

    # -- queries and deletion ----------------------------------------------------------------------

    def get(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> AdapterInfo:
        self._model(model)
        with self._lock:
            return self._info(self._live_record((model, tenant, adapter_id), field="adapter_id"))

    def list(self, model: str = "", tenant: str | None = DEFAULT_TENANT) -> list[AdapterInfo]:
        """A tenant's adapters (``tenant=None``: every tenant's), on one model or all."""
        if model:
            self._model(model)
        with self._lock:
            return [
                self._info(record)
                for key, record in sorted(self._records.items())
                if not record.deleting and (not model or key[0] == model) and tenant in (None, key[1])
            ]

    def delete(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> None:
        self._model(model)
        key = (model, tenant, adapter_id)
        with self._lock:
            record = self._live_record(key, field="adapter_id")
            record.deleting = True
            self._pending.add(key)
            finished = self._lock.wait_for(lambda: record.in_use == 0, timeout=DELETE_WAIT_SECONDS)
            if not finished:
                record.deleting = False
                self._pending.discard(key)
                raise Unavailable(
                    f"adapter '{adapter_id}' is still in use; retry the delete", retry_after=5.0
                )
        try:
            self.store.remove(*key)
        finally:
            with self._lock:
                self._drop_resident(key, record)
                self._records.pop(key, None)
                self._pending.discard(key)

    def resident_bytes(self) -> int:
        with self._lock:
            return self._resident_bytes

    def counts(self) -> tuple[int, int]:
        """(registered, resident) adapters."""
        with self._lock:
            return len(self._records), sum(1 for r in self._records.values() if r.resident is not None)

    def _check_quotas(self, key: Key, size: int) -> None:
        """Refuse a registration that would take its tenant over a quota (call with the lock held);
        replacing an adapter counts its new size instead of its old one."""
        model, tenant, _ = key
        others = [k for k in (*self._records, *self._pending) if k[1] == tenant and k != key]
        count_limit = self.limits.tenant_max_adapters
        on_model = sum(1 for k in others if k[0] == model)
        if count_limit and on_model >= count_limit:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {on_model} adapters on model '{model}', its quota "
                f"(tenant_max_adapters = {count_limit}); delete one first",
                reason="QUOTA_ADAPTERS",
            )
        bytes_limit = self.limits.tenant_max_adapter_bytes
        stored = sum(self._records[k].meta.size_bytes for k in others if k in self._records)
        if bytes_limit and stored + size > bytes_limit:
            raise ResourceExhausted(
                f"tenant '{tenant}' stores {stored} bytes of adapters; {size} more would pass its quota "
                f"(tenant_max_adapter_bytes = {bytes_limit})",
                reason="QUOTA_ADAPTER_BYTES",
            )

    def _live_record(self, key: Key, field: str) -> _Record:
        """The record of a registered adapter that is not being deleted (call with the lock held).

        Another tenant's adapter is answered exactly like a missing one."""
        record = self._records.get(key)
        if record is None or record.deleting:
            model, _tenant, adapter_id = key
            raise NotFound(f"adapter '{adapter_id}' is not registered on model '{model}'", field=field)
        return record

    def _info(self, record: _Record) -> AdapterInfo:
        meta = record.meta
        return AdapterInfo(
            model=meta.model,
            adapter_id=meta.adapter_id,
            format=meta.format,
            rank=meta.rank,
            targets=tuple(meta.targets),
            size_bytes=meta.size_bytes,
            resident=record.resident is not None,
            resident_bytes=record.resident.nbytes if record.resident else 0,
            pinned=meta.pinned,
            created_at=meta.created_at,
            last_used_at=record.last_used_at,
            sha256=meta.sha256,
        )


def _lora_factors(modules: dict[str, formats.PeftModule]) -> dict[str, LoraWeights]:
    """Each module's factors as a run feeds them, A [in, R] and B * scale [R, out], carved out of
    one float32 block: one allocation per adapter, each factor written in a single pass.

    R is the rank rounded up to the power of two runs use, the extra columns of A and rows of B
    zero (exact): a run whose rows all use this adapter is then fed views of these arrays, with
    no copy, whatever the rank."""
    sizes = {weight: (rank_bucket(m.rank), m.a.shape[1], m.b.shape[0]) for weight, m in modules.items()}
    block = np.zeros(sum(r * (i + o) for r, i, o in sizes.values()), dtype=np.float32)
    lora, offset = {}, 0
    for weight, module in modules.items():
        rank, (bucket, fan_in, fan_out) = module.rank, sizes[weight]
        a = block[offset : offset + fan_in * bucket].reshape(fan_in, bucket)
        offset += a.size
        b = block[offset : offset + bucket * fan_out].reshape(bucket, fan_out)
        offset += b.size
        np.copyto(a[:, :rank], module.a.T, casting="same_kind")
        np.multiply(module.b.T, module.scale, out=b[:rank], casting="same_kind")
        lora[weight] = LoraWeights(a=a, b=b)
    return lora


def _check_file_list(files: tuple[tuple[str, int], ...], total: int) -> None:
    for name, _size in files:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise InvalidArgument(f"file name {name!r} is invalid", field="header.files")
    if files and sum(size for _name, size in files) != total:
        raise InvalidArgument("the sizes in header.files do not add up to total_bytes", field="header.files")


def _parse_mapping(text: str) -> dict[str, str] | None:
    if not text:
        return None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"module mapping is not valid JSON: {exc}", field="module_mapping_json"
        ) from None
    if not isinstance(mapping, dict):
        raise InvalidArgument("module mapping must be a JSON object", field="module_mapping_json")
    return mapping


def _check_tensor(
    model: BaseModel, name: str, array: np.ndarray, specs: dict[str, tuple[str, tuple[int, ...]]]
) -> None:
    spec = specs.get(name)
    if spec is None:
        raise InvalidArgument(
            f"adapter tensor '{name}' is neither an input nor an overridable weight of model '{model.name}'",
            field="tensors",
        )
    dtype, shape = spec
    if (
        array.dtype.name != dtype
        or len(array.shape) != len(shape)
        or any(want >= 0 and got != want for got, want in zip(array.shape, shape, strict=True))
    ):
        raise InvalidArgument(
            f"adapter tensor '{name}' is {array.dtype.name}{list(array.shape)}, model '{model.name}' expects "
            f"{dtype}{list(shape)}",
            field="tensors",
        )
