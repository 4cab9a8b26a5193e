"""Adapters on disk: ``<root>/<model>/<tenant>/<adapter_id>/`` holding ``payload`` (the bytes exactly as
uploaded) and ``meta.json``.

An upload streams into a staging directory while it arrives, so the payload is written once and
in the shadow of the network transfer. Once the adapter is checked, its meta is written, both
files and the directory are fsynced, and the directory is renamed into place; an adapter it
replaces is renamed aside first. Leftovers of a crash (staging, trash) are removed at start, so
a crash never leaves half an adapter where a worker would load it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ortmux.worker.files import fsync_dir

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"  # the one tenant of a worker without API keys
META_FILE = "meta.json"
PAYLOAD_FILE = "payload"
_WORK_DIRS = (".staging", ".trash")


@dataclasses.dataclass
class AdapterMeta:
    model: str
    adapter_id: str
    format: str
    rank: int
    targets: list[str]
    size_bytes: int
    sha256: str
    pinned: bool
    created_at: float
    files: list[tuple[str, int]]  # named files back to back in the payload; [] = one file or archive
    module_mapping_json: str = ""
    tenant: str = DEFAULT_TENANT

    @classmethod
    def from_json(cls, data: bytes) -> AdapterMeta:
        values = json.loads(data)
        meta = cls(
            **{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values}
        )
        meta.files = [(str(name), int(size)) for name, size in meta.files]
        return meta

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode()


class PendingAdapter:
    """An adapter being written: its payload streams into a staging directory.

    Written bytes are synced to disk in the background every ``SYNC_EVERY_BYTES`` while the upload
    goes on, and the tail while the adapter is checked; :meth:`commit` waits for those syncs, so
    nothing moves into place before its bytes are on disk.
    """

    SYNC_EVERY_BYTES = 4 << 20

    def __init__(self, store: AdapterStore) -> None:
        self._store = store
        self.directory = store.root / ".staging" / uuid.uuid4().hex
        self.directory.mkdir()
        self._handle = open(self.directory / PAYLOAD_FILE, "w+b", buffering=0)  # noqa: SIM115 (closed in commit/abort)
        self._unsynced = 0
        self._sync: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        while view:
            view = view[self._handle.write(view) :]
        self._unsynced += len(chunk)
        if self._unsynced >= self.SYNC_EVERY_BYTES and (self._sync is None or not self._sync.is_alive()):
            self._sync_in_background()

    def finish(self) -> mmap.mmap:
        """The payload is complete: map it read-only and flush what is not on disk yet meanwhile.

        The map reads the pages just written from the page cache; joining the chunks instead
        would fault in and copy a fresh buffer the size of the upload.
        """
        self._join_sync()
        self._sync_in_background()
        return mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)

    def _sync_in_background(self) -> None:
        self._unsynced = 0
        fd = self._handle.fileno()

        def sync() -> None:
            try:
                os.fdatasync(fd)
            except OSError as exc:  # reported once per file: kept for commit to raise
                self._sync_error = exc

        self._sync = threading.Thread(target=sync, name="ortmux-adapter-sync", daemon=True)
        self._sync.start()

    def _join_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None
        if self._sync_error is not None:
            raise self._sync_error

    def commit(self, meta: AdapterMeta) -> None:
        """Wait for the payload to be on disk, write the meta and move the adapter into place
        atomically."""
        self._join_sync()
        self._handle.close()
        with open(self.directory / META_FILE, "wb") as handle:
            handle.write(meta.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.directory)
        target = self._store.directory(meta.model, meta.tenant, meta.adapter_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self._store.trash(target)
        os.rename(self.directory, target)
        fsync_dir(target.parent)

    def abort(self) -> None:
        if self._sync is not None:
            self._sync.join()
        if not self._handle.closed:
            self._handle.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for name in _WORK_DIRS:
            shutil.rmtree(root / name, ignore_errors=True)
            (root / name).mkdir(parents=True, exist_ok=True)
        self._adopt_untenanted()

    def _adopt_untenanted(self) -> None:
        """Move adapters stored before tenants existed (``<model>/<id>/``) to the default tenant."""
        for meta in sorted(self.root.glob(f"*/*/{META_FILE}")):
            directory, model_dir = meta.parent, meta.parent.parent
            if model_dir.name.startswith("."):
                continue
            target = model_dir / DEFAULT_TENANT / directory.name
            if target.exists():
                log.error("adapter %s has a twin at %s; left where it is", directory, target)
                continue
            target.parent.mkdir(exist_ok=True)
            os.rename(directory, target)
            fsync_dir(model_dir)
            fsync_dir(target.parent)
            log.info("adapter %s/%s moved to tenant '%s'", model_dir.name, directory.name, DEFAULT_TENANT)

    def begin(self) -> PendingAdapter:
        return PendingAdapter(self)

    def directory(self, model: str, tenant: str, adapter_id: str) -> Path:
        return self.root / model / tenant / adapter_id

    def read_payload(self, model: str, tenant: str, adapter_id: str) -> bytes:
        return (self.directory(model, tenant, adapter_id) / PAYLOAD_FILE).read_bytes()

    def remove(self, model: str, tenant: str, adapter_id: str) -> None:
        directory = self.directory(model, tenant, adapter_id)
        if directory.exists():
            self.trash(directory)

    def scan(self) -> Iterator[AdapterMeta]:
        """Every stored adapter; unreadable entries are logged and skipped."""
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for directory in sorted(p for p in model_dir.glob("*/*") if p.is_dir()):
                try:
                    yield AdapterMeta.from_json((directory / META_FILE).read_bytes())
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.error("skipping unreadable adapter at %s: %s", directory, exc)

    def trash(self, directory: Path) -> None:
        trash = self.root / ".trash" / f"{directory.name}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, trash)
        fsync_dir(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)
