"""The manager's side of a shared store: mirroring its records, looking up ids this pod does not
know, publishing registrations, applying what other pods changed, and collecting garbage.

A mixin of :class:`AdapterManager` (it shares the manager's records and lock): the manager holds
residency, registration and queries, this the store's consistency.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from ortmux.worker.adapters.objects import Conflict, StoreUnavailable
from ortmux.worker.adapters.records import (
    AdapterCounters,
    Record,
    exists_error,
    not_found,
    store_down,
)
from ortmux.worker.adapters.shared import SharedStore
from ortmux.worker.adapters.store import AdapterMeta, AdapterStore, Key
from ortmux.worker.errors import ResourceExhausted
from ortmux.worker.quotas import TokenBuckets

log = logging.getLogger(__name__)

NEGATIVE_SECONDS = 1.0  # how long "not in the store" is believed without looking again


class StoreMirror:
    store: AdapterStore
    shared: SharedStore | None
    counters: AdapterCounters
    _records: dict[Key, Record]
    _pending: set[Key]
    _missing: dict[Key, float]
    _lookups: TokenBuckets
    _complete: bool
    _lock: threading.Condition
    _drop_resident: Callable[[Key, Record], None]

    def _migrate(self, local: dict[Key, AdapterMeta]) -> None:
        """Copy the adapters of a local store into the shared store it becomes a cache of (an
        adapter the shared store has already is left as the store has it)."""
        assert self.shared is not None
        for key, meta in local.items():
            if not meta.version:
                meta.version = uuid.uuid4().hex
            try:
                self.shared.publish(meta, self.store.payload_path(*key), replace=False)
                log.info("adapter %s/%s/%s copied to %s", *key, self.shared.description)
            except Conflict:
                pass

    def _sync_for_registration(self, key: Key, replace: bool) -> None:
        """Bring the records up to date before a registration is checked against them (quotas
        count the store's adapters), and look the id up in the store itself."""
        assert self.shared is not None
        try:
            self.sync()
            if not replace and key not in self._records and self.shared.read(key) is not None:
                raise exists_error(key[2], key[0])
        except StoreUnavailable as exc:
            raise store_down(exc, "registrations wait for it") from None

    def _publish(self, meta: AdapterMeta, replace: bool) -> None:
        """Write a committed adapter to the shared store; on failure it leaves the local disk too."""
        assert self.shared is not None
        key = meta.key
        try:
            self.shared.publish(meta, self.store.payload_path(*key), replace=replace)
        except Conflict:
            self.store.remove(*key)
            raise exists_error(meta.adapter_id, meta.model) from None
        except StoreUnavailable as exc:
            self.store.remove(*key)
            raise store_down(exc, "registrations wait for it") from None

    # -- the shared store ----------------------------------------------------------------------------

    def _find(self, key: Key, field: str) -> Record:
        """The live record of ``key``; an id this pod does not know is looked up in the shared store
        (at most ``store_lookups_per_second`` per tenant; "not there" believed for a second)."""
        with self._lock:
            record = self._records.get(key)
            if record is not None and not record.deleting:
                return record
            if self.shared is None or record is not None or self._missing.get(key, 0.0) > time.monotonic():
                raise not_found(key, field)
            self._take_lookup(key[1])
        try:
            meta = self.shared.read(key)
        except StoreUnavailable as exc:
            raise store_down(exc, f"adapter '{key[2]}' is not known to this pod") from None
        with self._lock:
            if meta is None:
                self._missing[key] = time.monotonic() + NEGATIVE_SECONDS
                if len(self._missing) > 10_000:
                    now = time.monotonic()
                    self._missing = {k: t for k, t in self._missing.items() if t > now}
                raise not_found(key, field)
            return self._adopt(key, meta)

    def _take_lookup(self, tenant: str) -> None:
        wait = self._lookups.take(tenant)
        if wait:
            raise ResourceExhausted(
                f"tenant '{tenant}' looks up more unknown adapters than the "
                f"{self._lookups.rate:g} per second this pod allows (adapter_store_lookups_per_second)",
                reason="ADAPTER_LOOKUPS",
                retry_after=wait,
            )
        self.counters.store_lookups += 1

    def _adopt(self, key: Key, meta: AdapterMeta) -> Record:
        """Take the store's record of ``key`` (call with the lock held): a new or replaced adapter
        gets a fresh record; requests holding the old one finish on it."""
        record = self._records.get(key)
        if record is not None and record.meta.version == meta.version:
            return record
        if record is not None:
            self._drop_resident(key, record)
        fresh = Record(meta, last_used_at=time.time(), cached=False)
        self._records[key] = fresh
        self._missing.pop(key, None)
        return fresh

    def _forget(self, key: Key) -> bool:
        """Drop a deleted adapter (call with the lock held); True when its local files may go."""
        record = self._records.pop(key, None)
        if record is None:
            return False
        self._drop_resident(key, record)
        return not record.in_use

    def sync(self) -> int:
        """Apply what the shared store changed since the last sync; returns how many adapters
        changed. Raises :class:`StoreUnavailable` when the store cannot be read."""
        if self.shared is None:
            return 0
        changed = self.shared.poll()
        if changed is None:
            self._replace_all(self.shared.read_all(), {})
            return len(self._records)
        fresh = {key: self.shared.read(key) for key in changed if key not in self._pending}
        stale = []
        with self._lock:
            for key, meta in fresh.items():
                if key in self._pending:
                    continue
                old = self._records.get(key)
                if meta is None:
                    if self._forget(key):
                        stale.append(key)
                elif old is None or old.meta.version != meta.version:
                    self._adopt(key, meta)
                    if old is not None and not old.in_use:
                        stale.append(key)
        for key in stale:
            self.store.remove(*key)
        return len(fresh)

    def _replace_all(self, metas: list[AdapterMeta], local: dict[Key, AdapterMeta]) -> None:
        """Make the records the store's (a full read); local copies of other versions leave."""
        stale = []
        with self._lock:
            wanted = {meta.key: meta for meta in metas}
            for key in [k for k in self._records if k not in wanted and k not in self._pending]:
                if self._forget(key):
                    stale.append(key)
            for key, meta in wanted.items():
                if key in self._pending:
                    continue
                old = self._records.get(key)
                record = self._adopt(key, meta)
                if old is None and key in local:
                    record.cached = local[key].version == meta.version
                    record.last_used_at = meta.created_at
                if not record.cached and (key in local or (old is not None and not old.in_use)):
                    stale.append(key)
            stale += [key for key in local if key not in wanted]
            self._complete = True
        for key in stale:
            self.store.remove(*key)

    def collect_garbage(self) -> int:
        """Delete orphaned payloads and old change entries from the store; only once this pod's
        records mirror the whole store, so a payload some record names is never taken."""
        if self.shared is None or not self._complete:
            return 0
        with self._lock:
            metas = [record.meta for record in self._records.values()]
        payloads, _changes = self.shared.collect_garbage(metas)
        with self._lock:
            self.counters.collected_payloads += payloads
        return payloads
