"""The manager's residency: holding an adapter for a run, loading it (from the local disk, or
fetched from the shared store into it) when it is not in memory, the memory budget's LRU, and the
local disk's bound when it caches a shared store.

A mixin of :class:`~ortmux.worker.adapters.manager.AdapterManager`, like
:class:`~ortmux.worker.adapters.mirror.StoreMirror`: it shares the manager's records and lock.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ortmux.worker.adapters import loading
from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.loading import Resident
from ortmux.worker.adapters.objects import StoreUnavailable
from ortmux.worker.adapters.records import AdapterCounters, AdapterLimits, Record, store_down
from ortmux.worker.adapters.shared import SharedStore
from ortmux.worker.adapters.store import DEFAULT_TENANT, AdapterStore, Key
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.errors import Unavailable

log = logging.getLogger(__name__)


class Residency:
    store: AdapterStore
    shared: SharedStore | None
    counters: AdapterCounters
    limits: AdapterLimits
    _model: Callable[[str], BaseModel]
    _records: dict[Key, Record]
    _lru: collections.OrderedDict[Key, None]
    _resident_bytes: int
    _lock: threading.Condition
    _find: Callable[..., Record]  # the mirror's lookup

    @contextmanager
    def use(self, model: str, adapter_id: str, tenant: str = DEFAULT_TENANT) -> Iterator[Resident]:
        """Hold an adapter for one run: loaded if it was evicted, and never deleted meanwhile."""
        key = (model, tenant, adapter_id)
        record = self._find(key, field="adapter")
        with self._lock:
            record.in_use += 1
            record.last_used_at = time.time()
        try:
            yield self._ensure_resident(key, record)
        finally:
            with self._lock:
                record.in_use -= 1
                self._lock.notify_all()

    def _ensure_resident(self, key: Key, record: Record) -> Resident:
        with self._lock:
            if record.resident is not None:
                self._lru.move_to_end(key)
                return record.resident
        with record.loading:  # one load per adapter, however many requests wait for it
            with self._lock:
                if record.resident is not None:
                    return record.resident
            started = time.perf_counter()
            resident, *_ = loading.load(
                self._model(key[0]), record.meta, self._payload(key, record), self.limits.max_adapter_bytes
            )
            with self._lock:
                if record.evicted:
                    self.counters.reloads += 1
                self.counters.load_seconds_total += time.perf_counter() - started
                self._make_resident(key, record, resident)
        self._trim_disk()
        return resident

    def _payload(self, key: Key, record: Record) -> Payload:
        """The adapter's bytes from the local disk, or fetched from the shared store into it.

        Fetched copies are written without waiting for the disk (the store has the adapter); a
        copy this process did not write is checked against its sha256 before its first use, so
        one torn by a crash is fetched again."""
        if self.shared is None or record.cached:
            try:
                payload = self.store.read_payload(*key)
                if (
                    self.shared is None
                    or record.verified
                    or hashlib.sha256(payload).hexdigest() == record.meta.sha256
                ):
                    with self._lock:
                        record.verified = True
                        self.counters.disk_hits += 1
                    return payload
                log.warning("adapter %s/%s/%s on disk does not match its sha256; fetching it again", *key)
            except FileNotFoundError:
                if self.shared is None:
                    raise
        meta = record.meta
        pending = self.store.begin(meta.size_bytes)
        try:
            digest = hashlib.sha256()

            def received(chunk: bytes) -> None:
                digest.update(chunk)
                pending.write(chunk)

            try:
                found = self.shared.fetch(meta, received)
            except StoreUnavailable as exc:
                raise store_down(exc, f"adapter '{key[2]}' is not on this pod's disk") from None
            if not found or digest.hexdigest() != meta.sha256:
                raise Unavailable(
                    f"adapter '{key[2]}' changed in {self.shared.description} while it was loading; retry",
                    retry_after=0.5,
                )
            payload = pending.finish(sync=False)
            pending.commit(meta, sync=False)
        finally:
            pending.abort()
        with self._lock:
            record.cached = record.verified = True
            self.counters.disk_misses += 1
        return payload

    def _make_resident(self, key: Key, record: Record, resident: Resident) -> None:
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

    def _drop_resident(self, key: Key, record: Record) -> None:
        if record.resident is not None:
            self._resident_bytes -= record.resident.nbytes
            record.resident = None
        self._lru.pop(key, None)

    def _trim_disk(self) -> None:
        """Remove the least recently used cached payloads past ``disk_bytes`` (shared store only:
        without one the disk is the only copy); resident, pinned and busy adapters stay."""
        if self.shared is None or not self.limits.disk_bytes:
            return
        with self._lock:
            cached = [(key, r) for key, r in self._records.items() if r.cached]
            total = sum(r.meta.size_bytes for _, r in cached)
            if total <= self.limits.disk_bytes:
                return  # the common case: no sort of every cached record
            victims = []
            for key, record in sorted(cached, key=lambda item: item[1].last_used_at):
                if total <= self.limits.disk_bytes:
                    break
                if record.resident is None and not record.meta.pinned and not record.in_use:
                    record.cached = False
                    total -= record.meta.size_bytes
                    victims.append(key)
                    self.counters.disk_evictions += 1
        for key in victims:
            self.store.remove(*key)

    def resident_bytes(self) -> int:
        with self._lock:
            return self._resident_bytes

    def disk_bytes(self) -> int:
        """Bytes of adapter payloads on the local disk."""
        with self._lock:
            return sum(r.meta.size_bytes for r in self._records.values() if r.cached)
