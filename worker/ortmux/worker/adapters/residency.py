"""The manager's residency: holding an adapter for a run, loading it (from the local disk, or
fetched from the shared store into it) when it is not in memory, the memory budget's LRU, and the
local disk's bound when it caches a shared store.

An object the :class:`~ortmux.worker.adapters.manager.AdapterManager` owns, over the records it
shares with the manager and the store mirror (:class:`~ortmux.worker.adapters.records.Records`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ortmux.worker.adapters import loading
from ortmux.worker.adapters.formats import Payload
from ortmux.worker.adapters.loading import Resident
from ortmux.worker.adapters.local_store import AdapterStore, Key
from ortmux.worker.adapters.object_store import StoreUnavailable
from ortmux.worker.adapters.records import AdapterLimits, Record, Records, store_down
from ortmux.worker.adapters.shared_store import SharedStore
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.errors import Unavailable

log = logging.getLogger(__name__)


class Residency:
    def __init__(
        self,
        records: Records,
        store: AdapterStore,
        shared: SharedStore | None,
        limits: AdapterLimits,
        models: Callable[[str], BaseModel],
    ) -> None:
        self._records = records
        self.store = store
        self.shared = shared
        self.limits = limits
        self._model = models
        self._lru: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._resident_bytes = 0

    @contextmanager
    def hold(self, key: Key, record: Record) -> Iterator[Resident]:
        """Hold an adapter for one run: loaded if it was evicted, and never deleted meanwhile."""
        with self._records.lock:
            record.in_use += 1
            record.last_used_at = time.time()
        try:
            yield self._ensure_resident(key, record)
        finally:
            with self._records.lock:
                record.in_use -= 1
                self._records.lock.notify_all()

    def _ensure_resident(self, key: Key, record: Record) -> Resident:
        with self._records.lock:
            if record.resident is not None:
                self._lru.move_to_end(key)
                return record.resident
        with record.loading:  # one load per adapter, however many requests wait for it
            with self._records.lock:
                if record.resident is not None:
                    return record.resident
            started = time.perf_counter()
            resident, *_ = loading.load(
                self._model(key[0]), record.meta, self._payload(key, record), self.limits.max_adapter_bytes
            )
            with self._records.lock:
                if record.evicted:
                    self._records.counters.reloads += 1
                self._records.counters.load_seconds_total += time.perf_counter() - started
                self.make_resident(key, record, resident)
        self.trim_disk()
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
                    with self._records.lock:
                        record.verified = True
                        self._records.counters.disk_hits += 1
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
                    f"adapter '{key[2]}' changed in the adapter store while it was loading; retry",
                    retry_after=0.5,
                )
            payload = pending.finish(sync=False)
            pending.commit(meta, sync=False)
        finally:
            pending.abort()
        with self._records.lock:
            record.cached = record.verified = True
            self._records.counters.disk_misses += 1
        return payload

    def make_resident(self, key: Key, record: Record, resident: Resident) -> None:
        """Keep ``resident`` in memory (call with the lock held), evicting others past the budget."""
        record.resident = resident
        resident.sha256 = record.meta.sha256
        self._resident_bytes += resident.nbytes
        self._lru[key] = None
        self._lru.move_to_end(key)
        self._evict_over_budget(keep=key)

    def _evict_over_budget(self, keep: Key) -> None:
        for key in list(self._lru):
            if self._resident_bytes <= self.limits.memory_budget_bytes:
                return
            record = self._records.entries[key]
            if key == keep or record.meta.pinned or record.in_use:
                continue
            self.drop(key, record)
            record.evicted = True
            self._records.counters.evictions += 1

    def drop(self, key: Key, record: Record) -> None:
        """Let the adapter's memory go (call with the lock held); it loads again on its next use."""
        if record.resident is not None:
            self._resident_bytes -= record.resident.nbytes
            record.resident = None
        self._lru.pop(key, None)

    def trim_disk(self) -> None:
        """Remove the least recently used cached payloads past ``disk_bytes`` (shared store only:
        without one the disk is the only copy); resident, pinned and busy adapters stay."""
        if self.shared is None or not self.limits.disk_bytes:
            return
        with self._records.lock:
            cached = [(key, r) for key, r in self._records.entries.items() if r.cached]
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
                    self._records.counters.disk_evictions += 1
        for key in victims:
            self.store.remove(*key)

    def resident_bytes(self) -> int:
        with self._records.lock:
            return self._resident_bytes

    def disk_bytes(self) -> int:
        """Bytes of adapter payloads on the local disk."""
        with self._records.lock:
            return sum(r.meta.size_bytes for r in self._records.entries.values() if r.cached)
