"""The shared adapter store: every pod's adapters in one object store, laid out as on disk.

Keys under the store's prefix::

    objects/<model>/<tenant>/<sha256>-<version>   an adapter's payload, written once
    records/<model>/<tenant>/<adapter_id>.json    its meta (naming the object), written last
    changes/<ns>-<nonce>/<model>/<tenant>/<id>    one empty object per register or delete

A registration writes its payload under a key no other registration uses, then the record, then
a change entry; a reader that finds the record finds the whole payload. Every pod lists the
change entries written since its last look (``StartAfter``, one small request however many
adapters there are) and reads again the records they name, so all pods converge on the record
the store holds. Payloads no record names, older than a grace period longer than any upload,
and change entries past their retention are collected by any pod.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ortmux.worker.adapters.local_store import AdapterMeta, Key
from ortmux.worker.adapters.object_store import Conflict, Objects, StoreUnavailable

log = logging.getLogger(__name__)


RECORDS = "records/"
OBJECTS = "objects/"
CHANGES = "changes/"
DEFAULT_LOOKBACK_SECONDS = 60.0  # change entries are read again this far back: writers' clock skew
DEFAULT_CHANGE_RETENTION_SECONDS = 3600.0
DEFAULT_ORPHAN_GRACE_SECONDS = 3600.0
_READ_THREADS = 16


def record_key(key: Key) -> str:
    model, tenant, adapter_id = key
    return f"{RECORDS}{model}/{tenant}/{adapter_id}.json"


def object_key(meta: AdapterMeta) -> str:
    return f"{OBJECTS}{meta.model}/{meta.tenant}/{meta.sha256}-{meta.version}"


class SharedStore:
    def __init__(
        self,
        objects: Objects,
        *,
        lookback_seconds: float = DEFAULT_LOOKBACK_SECONDS,
        change_retention_seconds: float = DEFAULT_CHANGE_RETENTION_SECONDS,
        orphan_grace_seconds: float = DEFAULT_ORPHAN_GRACE_SECONDS,
    ) -> None:
        self.objects = objects
        self.description = objects.description
        self.lookback_ns = int(lookback_seconds * 1e9)
        self.retention_ns = int(change_retention_seconds * 1e9)
        self.orphan_grace_seconds = orphan_grace_seconds
        self._seen: dict[str, int] = {}  # change entries already applied -> their time
        self._cursor_ns = 0  # start of the last poll that succeeded; 0: none yet
        self._lock = threading.Lock()

    # -- writes --------------------------------------------------------------------------------------

    def publish(self, meta: AdapterMeta, payload: Path, *, replace: bool) -> None:
        """Write an adapter: its payload, then its record (refused with :class:`Conflict` when one
        exists and not ``replace``, where the store honours ``If-None-Match``), then a change entry."""
        key = meta.key
        self.objects.put_file(object_key(meta), payload)
        try:
            self.objects.put(record_key(key), meta.to_json(), if_absent=not replace)
        except Conflict:
            self.objects.delete(object_key(meta))
            raise
        self._announce(key)

    def withdraw(self, key: Key) -> None:
        """Delete an adapter's record and announce it; its payload goes with the next collection."""
        self.objects.delete(record_key(key))
        self._announce(key)

    def _announce(self, key: Key) -> None:
        model, tenant, adapter_id = key
        self.objects.put(
            f"{CHANGES}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}/{model}/{tenant}/{adapter_id}", b""
        )

    # -- reads ---------------------------------------------------------------------------------------

    def read(self, key: Key) -> AdapterMeta | None:
        """The adapter's record as the store holds it now; None when it has none."""
        found = self.objects.get(record_key(key))
        return None if found is None else AdapterMeta.from_json(found[0])

    def read_all(self) -> list[AdapterMeta]:
        """Every record in the store (listed, then read in parallel); resets the change cursor."""
        started = time.time_ns()
        keys = [info.key for info in self.objects.list(RECORDS) if info.key.endswith(".json")]
        with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="ortmux-store-read") as pool:
            found = list(pool.map(self.objects.get, keys))
        metas = []
        for name, item in zip(keys, found, strict=True):
            if item is None:
                continue  # deleted since the listing
            try:
                metas.append(AdapterMeta.from_json(item[0]))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping unreadable adapter record %s in %s: %s", name, self.description, exc)
        with self._lock:
            self._cursor_ns = started
        return metas

    def fetch(self, meta: AdapterMeta, sink: Callable[[bytes], None]) -> bool:
        """Stream an adapter's payload into ``sink``; False when its object is gone."""
        return self.objects.read_into(object_key(meta), sink) is not None

    def poll(self) -> set[Key] | None:
        """Adapters registered, replaced or deleted since the last poll; None when the last poll that
        succeeded is so old that change entries may have been collected since (read everything)."""
        started = time.time_ns()
        with self._lock:
            cursor = self._cursor_ns
        if not cursor or started - cursor > self.retention_ns - self.lookback_ns:
            return None
        since = f"{CHANGES}{max(cursor - self.lookback_ns, 0):020d}"
        changed: set[Key] = set()
        fresh: dict[str, int] = {}
        for info in self.objects.list(CHANGES, start_after=since):
            parsed = _parse_change(info.key)
            if parsed is None or info.key in self._seen:
                continue
            written, key = parsed
            fresh[info.key] = written
            changed.add(key)
        with self._lock:
            self._seen.update(fresh)
            floor = cursor - self.lookback_ns
            self._seen = {name: ns for name, ns in self._seen.items() if ns >= floor}
            self._cursor_ns = started
        return changed

    # -- collection ----------------------------------------------------------------------------------

    def collect_garbage(self, referenced: Iterable[AdapterMeta]) -> tuple[int, int]:
        """Delete payloads that no record in ``referenced`` (every record of the store) names and
        that are older than the grace period, and change entries past their retention. Returns
        (payloads, change entries) deleted."""
        now = time.time()
        named = {object_key(meta) for meta in referenced}
        payloads = 0
        for info in list(self.objects.list(OBJECTS)):
            if info.key not in named and now - info.modified > self.orphan_grace_seconds:
                self.objects.delete(info.key)
                payloads += 1
                log.info("collected orphaned adapter payload %s", info.key)
        changes = 0
        horizon = time.time_ns() - self.retention_ns
        for info in list(self.objects.list(CHANGES, start_after="")):
            parsed = _parse_change(info.key)
            if parsed is not None and parsed[0] < horizon:
                self.objects.delete(info.key)
                changes += 1
        return payloads, changes


def _parse_change(name: str) -> tuple[int, Key] | None:
    parts = name[len(CHANGES) :].split("/")
    if len(parts) != 4:
        return None
    stamp, model, tenant, adapter_id = parts
    try:
        return int(stamp.partition("-")[0]), (model, tenant, adapter_id)
    except ValueError:
        return None


__all__ = ["Conflict", "SharedStore", "StoreUnavailable", "object_key", "record_key"]
