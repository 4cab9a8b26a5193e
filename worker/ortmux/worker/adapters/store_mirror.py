"""The manager's side of a shared store: mirroring its records, looking up ids this pod does not
know, publishing registrations, applying what other pods changed, and collecting garbage.

An object the adapter manager owns, over the records it shares with the manager and the
residency (:class:`~ortmux.worker.adapters.records.Records`): the manager holds registration and
queries, the residency memory and disk, this the store's consistency.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from ortmux.worker.adapters.local_store import AdapterMeta, AdapterStore, Key
from ortmux.worker.adapters.object_store import Conflict, StoreUnavailable
from ortmux.worker.adapters.records import (
    Record,
    Records,
    exists_error,
    not_found,
    store_down,
    validate_adapter_id,
)
from ortmux.worker.adapters.shared_store import SharedStore
from ortmux.worker.errors import ResourceExhausted
from ortmux.worker.quotas import TokenBuckets

log = logging.getLogger(__name__)

NEGATIVE_SECONDS = 1.0  # how long "not in the store" is believed without looking again


class StoreMirror:
    def __init__(
        self,
        records: Records,
        store: AdapterStore,
        shared: SharedStore | None,
        lookups_per_second: float,
        drop_resident: Callable[[Key, Record], None],
    ) -> None:
        """``drop_resident`` lets an adapter's memory go (the residency's), when the store
        replaced or deleted it."""
        self._records = records
        self.store = store
        self.shared = shared
        self._drop_resident = drop_resident
        self._missing: dict[Key, float] = {}  # ids the store did not have -> when that expires
        self._lookups = TokenBuckets(lookups_per_second)  # per tenant
        self.complete = shared is None  # the records mirror every record of the store

    def known(self, key: Key) -> None:
        """``key`` exists now (registered here): forget that the store lacked it."""
        self._missing.pop(key, None)

    def migrate(self, local: dict[Key, AdapterMeta]) -> None:
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

    def sync_for_registration(self, key: Key, replace: bool) -> None:
        """Bring the records up to date before a registration is checked against them (quotas
        count the store's adapters), and look the id up in the store itself."""
        assert self.shared is not None
        try:
            self.sync()
            if not replace and key not in self._records.entries and self.shared.read(key) is not None:
                raise exists_error(key[2], key[0])
        except StoreUnavailable as exc:
            raise store_down(exc, "registrations wait for it") from None

    def publish(self, meta: AdapterMeta, replace: bool) -> None:
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

    def find(self, key: Key, field: str) -> Record:
        """The live record of ``key``; an id this pod does not know is looked up in the shared store
        (at most ``store_lookups_per_second`` per tenant; "not there" believed for a second)."""
        validate_adapter_id(key[2], field)
        with self._records.lock:
            record = self._records.entries.get(key)
            if record is not None and not record.deleting:
                return record
            if self.shared is None or record is not None or self._missing.get(key, 0.0) > time.monotonic():
                raise not_found(key, field)
            self._take_lookup(key[1])
        try:
            meta = self.shared.read(key)
        except StoreUnavailable as exc:
            raise store_down(exc, f"adapter '{key[2]}' is not known to this pod") from None
        with self._records.lock:
            if meta is None:
                self._missing[key] = time.monotonic() + NEGATIVE_SECONDS
                if len(self._missing) > 10_000:
                    now = time.monotonic()
                    self._missing = {k: t for k, t in self._missing.items() if t > now}
                raise not_found(key, field)
            return self.adopt(key, meta)

    def _take_lookup(self, tenant: str) -> None:
        wait = self._lookups.take(tenant)
        if wait:
            raise ResourceExhausted(
                f"tenant '{tenant}' looks up more unknown adapters than the "
                f"{self._lookups.rate:g} per second this pod allows (adapter_store_lookups_per_second)",
                reason="ADAPTER_LOOKUPS",
                retry_after=wait,
            )
        self._records.counters.store_lookups += 1

    def adopt(self, key: Key, meta: AdapterMeta) -> Record:
        """Take the store's record of ``key`` (call with the lock held): a new or replaced adapter
        gets a fresh record; requests holding the old one finish on it."""
        record = self._records.entries.get(key)
        if record is not None and record.meta.version == meta.version:
            return record
        if record is not None:
            self._drop_resident(key, record)
        fresh = Record(meta, last_used_at=time.time(), cached=False)
        self._records.entries[key] = fresh
        self._missing.pop(key, None)
        return fresh

    def _forget(self, key: Key) -> bool:
        """Drop a deleted adapter (call with the lock held); True when its local files may go."""
        record = self._records.entries.pop(key, None)
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
            self.replace_all(self.shared.read_all(), {})
            return len(self._records.entries)
        fresh = {key: self.shared.read(key) for key in changed if key not in self._records.pending}
        stale = []
        with self._records.lock:
            for key, meta in fresh.items():
                if key in self._records.pending:
                    continue
                old = self._records.entries.get(key)
                if meta is None:
                    if self._forget(key):
                        stale.append(key)
                elif old is None or old.meta.version != meta.version:
                    self.adopt(key, meta)
                    if old is not None and not old.in_use:
                        stale.append(key)
        for key in stale:
            self.store.remove(*key)
        return len(fresh)

    def replace_all(self, metas: list[AdapterMeta], local: dict[Key, AdapterMeta]) -> None:
        """Make the records the store's (a full read); local copies of other versions leave."""
        stale = []
        with self._records.lock:
            wanted = {meta.key: meta for meta in metas}
            for key in [
                k for k in self._records.entries if k not in wanted and k not in self._records.pending
            ]:
                if self._forget(key):
                    stale.append(key)
            for key, meta in wanted.items():
                if key in self._records.pending:
                    continue
                old = self._records.entries.get(key)
                record = self.adopt(key, meta)
                if old is None and key in local:
                    record.cached = local[key].version == meta.version
                    record.last_used_at = meta.created_at
                if not record.cached and (key in local or (old is not None and not old.in_use)):
                    stale.append(key)
            stale += [key for key in local if key not in wanted]
            self.complete = True
        for key in stale:
            self.store.remove(*key)

    def collect_garbage(self) -> int:
        """Delete orphaned payloads and old change entries from the store; only once this pod's
        records mirror the whole store, so a payload some record names is never taken."""
        if self.shared is None or not self.complete:
            return 0
        with self._records.lock:
            metas = [record.meta for record in self._records.entries.values()]
        payloads, _changes = self.shared.collect_garbage(metas)
        with self._records.lock:
            self._records.counters.collected_payloads += payloads
        return payloads
