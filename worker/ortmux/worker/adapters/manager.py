"""Registered adapters: validation against their base, persistence, residency and use.

Registering parses and checks the payload against the base model, writes it atomically, and
makes it resident; the next request can use it. Resident adapters live within a memory budget:
the least recently used unpinned ones leave memory and come back from disk on demand. A request
holds its adapter while it runs; deleting waits for those requests to finish.

With a shared store (``adapter_store``) the store holds every pod's adapters and the local disk
is a cache of it, bounded by ``disk_bytes``: a registration is written to both, an adapter this
pod does not know is looked up in the store before NOT_FOUND, and :meth:`sync` applies what other
pods registered, replaced or deleted.

The manager owns two collaborators over the records the three share
(:class:`~ortmux.worker.adapters.records.Records`): its :class:`~.residency.Residency` (memory
and disk: holding an adapter for a run, loading, the LRU, the disk bound) and its
:class:`~.store_mirror.StoreMirror` (the shared store's consistency).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ortmux.worker.adapters import loading
from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.loading import Resident
from ortmux.worker.adapters.local_store import DEFAULT_TENANT, AdapterMeta, AdapterStore, Key, PendingAdapter
from ortmux.worker.adapters.object_store import StoreUnavailable
from ortmux.worker.adapters.records import (
    AdapterCounters,
    AdapterLimits,
    Record,
    Records,
    exists_error,
    not_found,
    store_down,
    validate_adapter_id,
)
from ortmux.worker.adapters.residency import Residency
from ortmux.worker.adapters.shared_store import SharedStore
from ortmux.worker.adapters.store_mirror import StoreMirror
from ortmux.worker.adapters.uploads import UploadHeader, UploadTrailer, receive_path, receive_upload
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DELETE_WAIT_SECONDS = 60.0

__all__ = [
    "AdapterInfo",
    "AdapterLimits",
    "AdapterManager",
    "Resident",
    "UploadHeader",
    "UploadTrailer",
    "validate_adapter_id",
]


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


class AdapterManager:
    def __init__(
        self,
        store: AdapterStore,
        models: Callable[[str], BaseModel],
        limits: AdapterLimits,
        shared: SharedStore | None = None,
    ) -> None:
        self.store = store
        self.shared = shared
        self._model = models
        self.limits = limits
        self._records = Records()
        self.residency = Residency(self._records, store, shared, limits, models)
        self.mirror = StoreMirror(
            self._records, store, shared, limits.store_lookups_per_second, self.residency.drop
        )
        local = {meta.key: meta for meta in store.scan()}
        if shared is not None:
            try:
                if not store.is_cache_of(shared.description):
                    self.mirror.migrate(local)
                self.mirror.replace_all(shared.read_all(), local)
                store.mark_cache_of(shared.description)
                log.info(
                    "%d adapters in %s; they load on first use",
                    len(self._records.entries),
                    shared.description,
                )
                return
            except StoreUnavailable as exc:
                log.error("%s; serving the %d adapters on local disk until it answers", exc, len(local))
        for key, meta in local.items():
            self._records.entries[key] = Record(meta, last_used_at=meta.created_at)
        if self._records.entries and shared is None:
            log.info("%d adapters on disk; they load on first use", len(self._records.entries))

    # -- registration ------------------------------------------------------------------------------

    def receive(
        self, header: UploadHeader, parts: Iterable[bytes | UploadTrailer]
    ) -> tuple[UploadHeader, Payload, PendingAdapter]:
        """An upload's payload, checked against its size and checksum as it is staged (see
        :func:`receive_upload`)."""
        return receive_upload(self.store, self.limits, header, parts)

    def register(self, header: UploadHeader, payload: Payload, pending: PendingAdapter) -> AdapterInfo:
        """Check a received payload against its base, then commit and make it resident."""
        try:
            return self._register(header, payload, pending)
        finally:
            pending.abort()  # no-op once committed (the directory has moved)

    def register_from_path(
        self, header: UploadHeader, path: Path, readable: Callable[[Path], Path] = Path.resolve
    ) -> AdapterInfo:
        """Register an adapter from a file, archive or directory on the worker's filesystem;
        ``readable`` resolves each file read, refusing those outside the allowed paths."""
        return self.register(*receive_path(self.store, self.limits, header, path, readable))

    def _register(self, header: UploadHeader, payload: Payload, pending: PendingAdapter) -> AdapterInfo:
        model = self._model(header.model)
        validate_adapter_id(header.adapter_id)
        key = (model.name, header.tenant, header.adapter_id)
        if self.shared is not None:
            self.mirror.sync_for_registration(key, header.replace)
        with self._records.lock:
            if key in self._records.pending:
                raise Unavailable(
                    f"adapter '{header.adapter_id}' is being registered or deleted right now", retry_after=1.0
                )
            if key in self._records.entries and not header.replace:
                raise exists_error(header.adapter_id, model.name)
            self._check_quotas(key, len(payload))
            self._records.pending.add(key)
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
                sha256=header.sha256,
                pinned=header.pinned,
                created_at=time.time(),
                files=list(header.files),
                module_mapping_json=header.module_mapping_json,
                version=uuid.uuid4().hex,
            )
            resident, meta.format, meta.rank, meta.targets = loading.load(
                model, meta, payload, self.limits.max_adapter_bytes
            )
            checked = time.perf_counter()
            pending.commit(meta)
            if self.shared is not None:
                self.mirror.publish(meta, header.replace)
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
            with self._records.lock:
                old = self._records.entries.get(key)
                if old is not None:
                    self.residency.drop(key, old)
                record = Record(meta, last_used_at=meta.created_at, verified=True)
                self._records.entries[key] = record
                self.mirror.known(key)
                self.residency.make_resident(key, record, resident)
                self._records.counters.registrations += 1
                self._records.counters.load_seconds_total += checked - started
                info = self._info(record)
            self.residency.trim_disk()
            return info
        finally:
            with self._records.lock:
                self._records.pending.discard(key)

    # -- use ---------------------------------------------------------------------------------------

    @property
    def counters(self) -> AdapterCounters:
        return self._records.counters

    @contextmanager
    def use(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> Iterator[Resident]:
        """Hold an adapter for one run: loaded if it was evicted, and never deleted meanwhile."""
        key = (model, tenant, adapter_id)
        with self.residency.hold(key, self.mirror.find(key, field="adapter")) as resident:
            yield resident

    def sync(self) -> int:
        """Apply what the shared store changed since the last sync (see :meth:`StoreMirror.sync`)."""
        return self.mirror.sync()

    def collect_garbage(self) -> int:
        return self.mirror.collect_garbage()

    def resident_bytes(self) -> int:
        return self.residency.resident_bytes()

    def disk_bytes(self) -> int:
        """Bytes of adapter payloads on the local disk."""
        return self.residency.disk_bytes()

    # -- queries and deletion ----------------------------------------------------------------------

    def get(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> AdapterInfo:
        self._model(model)
        record = self.mirror.find((model, tenant, adapter_id), field="adapter_id")
        with self._records.lock:
            return self._info(record)

    def list(self, model: str = "", tenant: str | None = DEFAULT_TENANT) -> list[AdapterInfo]:
        """A tenant's adapters (``tenant=None``: every tenant's), on one model or all."""
        if model:
            self._model(model)
        with self._records.lock:
            return [
                self._info(record)
                for key, record in sorted(self._records.entries.items())
                if not record.deleting and (not model or key[0] == model) and tenant in (None, key[1])
            ]

    def delete(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> None:
        self._model(model)
        key = (model, tenant, adapter_id)
        record = self.mirror.find(key, field="adapter_id")
        with self._records.lock:
            if record.deleting or self._records.entries.get(key) is not record:
                raise not_found(key, "adapter_id")
            record.deleting = True
            self._records.pending.add(key)
            finished = self._records.lock.wait_for(lambda: record.in_use == 0, timeout=DELETE_WAIT_SECONDS)
            if not finished:
                record.deleting = False
                self._records.pending.discard(key)
                raise Unavailable(
                    f"adapter '{adapter_id}' is still in use; retry the delete", retry_after=5.0
                )
        try:
            if self.shared is not None:
                try:
                    self.shared.withdraw(key)
                except StoreUnavailable as exc:
                    with self._records.lock:
                        record.deleting = False
                    raise store_down(exc, "deletes wait for it") from None
            self.store.remove(*key)
            with self._records.lock:
                self.residency.drop(key, record)
                self._records.entries.pop(key, None)
        finally:
            with self._records.lock:
                self._records.pending.discard(key)

    def counts(self) -> tuple[int, int]:
        """(registered, resident) adapters."""
        with self._records.lock:
            return len(self._records.entries), sum(
                1 for r in self._records.entries.values() if r.resident is not None
            )

    def _check_quotas(self, key: Key, size: int) -> None:
        """Refuse a registration that would take its tenant over a quota (call with the lock held);
        replacing an adapter counts its new size instead of its old one. With a shared store the
        records counted are the store's, as of the sync just before."""
        model, tenant, _ = key
        others = [k for k in (*self._records.entries, *self._records.pending) if k[1] == tenant and k != key]
        count_limit = self.limits.tenant_max_adapters
        on_model = sum(1 for k in others if k[0] == model)
        if count_limit and on_model >= count_limit:
            raise ResourceExhausted(
                f"tenant '{tenant}' has {on_model} adapters on model '{model}', its quota "
                f"(tenant_max_adapters = {count_limit}); delete one first",
                reason="QUOTA_ADAPTERS",
            )
        bytes_limit = self.limits.tenant_max_adapter_bytes
        stored = sum(self._records.entries[k].meta.size_bytes for k in others if k in self._records.entries)
        if bytes_limit and stored + size > bytes_limit:
            raise ResourceExhausted(
                f"tenant '{tenant}' stores {stored} bytes of adapters; {size} more would pass its quota "
                f"(tenant_max_adapter_bytes = {bytes_limit})",
                reason="QUOTA_ADAPTER_BYTES",
            )

    def _info(self, record: Record) -> AdapterInfo:
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
