"""Adapters on disk: ``<root>/<model>/<tenant>/<adapter_id>/`` holding ``payload`` (the bytes exactly as
uploaded) and ``meta.json``.

An upload streams into a staging directory while it arrives, so the payload is written once and
in the shadow of the network transfer. Once the adapter is checked, its meta is written, both
files and the directory are fsynced, and the directory is renamed into place; an adapter it
replaces is renamed aside first. Leftovers of a crash (staging, trash) are removed at start, so
a crash never leaves half an adapter where a worker would load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ortmux.worker.adapters.formats import Payload
from ortmux.worker.errors import FailedPrecondition, ResourceExhausted
from ortmux.worker.files import fsync_dir

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"  # the one tenant of a worker without API keys
Key = tuple[str, str, str]  # (model, tenant, adapter id)
META_FILE = "meta.json"
PAYLOAD_FILE = "payload"
_WORK_DIRS = (".staging", ".trash")
CACHE_MARKER = ".cache-of"  # names the shared store this directory caches
LOCK_FILE = ".lock"  # held by the one worker process that uses the directory
_FULL = (errno.ENOSPC, errno.EDQUOT)
DEFAULT_UPLOAD_MEMORY_BYTES = 512 << 20


@contextlib.contextmanager
def storage_errors(root: Path) -> Iterator[None]:
    """A full file system (or quota) as RESOURCE_EXHAUSTED naming the storage; other OS errors
    pass through."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        raise ResourceExhausted(
            f"adapter storage at {root} is full ({exc.strerror}); delete adapters or give the "
            "volume more space",
            reason="STORAGE_FULL",
            retry_after=30.0,
        ) from None


class UploadMemory:
    """The bytes that uploads in progress hold in memory, all of them together."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0
        self.spilled = 0  # uploads received into their staging file because memory was taken
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held_bytes + size > self.limit_bytes:
                self.spilled += 1
                return False
            self.held_bytes += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held_bytes -= size


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
    version: str = ""  # unique per registration: tells a replaced adapter from its predecessor

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

    @property
    def key(self) -> Key:
        return (self.model, self.tenant, self.adapter_id)


class PendingAdapter:
    """An adapter being received into a staging directory as its bytes arrive.

    While the store's upload memory allows, the bytes gather in memory, where the adapter is
    parsed from, and go to the staging file around the page cache (``O_DIRECT``) where the file
    system allows it: buffered writes would first fill fresh page-cache pages with a copy of every
    byte, then flush them. Past that memory the upload is written straight to its staging file and
    parsed from a read-only mapping of it, so uploads never hold more memory than the limit.
    :meth:`finish` syncs what is left; :meth:`commit` moves it into place; :meth:`abort` removes it.
    """

    FLUSH_BYTES = 1 << 20  # written in whole multiples of this (a multiple of any block size)

    def __init__(self, store: AdapterStore, size: int) -> None:
        self._store = store
        self._size = size
        self._filled = 0
        self._written = 0
        self._fd = -1
        self._closed = False
        self._committed = False
        self._held = size if store.upload_memory.take(size) else 0
        self._buffer: mmap.mmap | None = None
        self.directory = store.root / ".staging" / uuid.uuid4().hex
        try:
            with storage_errors(store.root):
                self.directory.mkdir()
                path = self.directory / PAYLOAD_FILE
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                if self._held:
                    # Private anonymous memory, page-aligned as direct I/O needs; untouched pages
                    # cost nothing.
                    self._buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if size else None
                    try:
                        self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
                    except OSError as exc:  # a file system without direct I/O (tmpfs, some overlays)
                        if exc.errno != errno.EINVAL:
                            raise
                if self._fd < 0:
                    self._fd = os.open(path, flags, 0o644)
        except BaseException:
            self.abort()
            raise

    @property
    def in_memory(self) -> bool:
        return bool(self._held)

    def write(self, chunk: bytes | memoryview) -> None:
        count = len(chunk)
        if self._filled + count > self._size:
            raise ValueError(f"{self._filled + count} bytes passed the declared {self._size}")
        if self._buffer is None:
            with storage_errors(self._store.root):
                _write_all(self._fd, memoryview(chunk), self._filled)
            self._filled += count
            self._written = self._filled
            return
        self._buffer[self._filled : self._filled + count] = chunk
        self._filled += count
        if self._filled - self._written >= self.FLUSH_BYTES:
            self._write_out(self._filled - self._filled % self.FLUSH_BYTES)

    def finish(self, *, sync: bool = True) -> Payload:
        """The payload is complete: its last bytes go to disk and the file is synced (unless not
        ``sync``: a cache fill, checked again after a restart); returns the received bytes (parse
        them, or keep views of them: they live as long as those views)."""
        if self._filled != self._size:
            raise ValueError(f"payload has {self._filled} of {self._size} bytes")
        with storage_errors(self._store.root):
            if self._written < self._size:
                self._write_out(self._size)
            if sync:
                os.fdatasync(self._fd)
        if self._buffer is not None:
            return self._buffer
        return mmap.mmap(self._fd, self._size, prot=mmap.PROT_READ) if self._size else b""

    def _write_out(self, end: int) -> None:
        """Write bytes [written, end) at the file's offset ``written`` (kept block-aligned)."""
        assert self._buffer is not None
        with storage_errors(self._store.root), memoryview(self._buffer) as whole:
            if end % self.FLUSH_BYTES == 0:
                with whole[self._written : end] as part:
                    _write_all(self._fd, part, self._written)
            else:  # the tail: direct I/O takes whole blocks, so pad a copy and cut the file after
                tail = mmap.mmap(-1, -(-(end - self._written) // mmap.PAGESIZE) * mmap.PAGESIZE)
                try:
                    tail[: end - self._written] = whole[self._written : end]
                    with memoryview(tail) as padded:
                        _write_all(self._fd, padded, self._written)
                finally:
                    tail.close()
                os.ftruncate(self._fd, end)
        self._written = end

    def commit(self, meta: AdapterMeta, *, sync: bool = True) -> None:
        """Write the meta and move the adapter into place atomically (after :meth:`finish`);
        not ``sync``: without waiting for the disk (see :meth:`finish`)."""
        self._close()
        with storage_errors(self._store.root):
            with open(self.directory / META_FILE, "wb") as handle:
                handle.write(meta.to_json())
                if sync:
                    handle.flush()
                    os.fsync(handle.fileno())
            if sync:
                fsync_dir(self.directory)
            target = self._store.directory(meta.model, meta.tenant, meta.adapter_id)
            target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self._store.trash(target)
        os.rename(self.directory, target)
        if sync:
            fsync_dir(target.parent)
        self._committed = True

    def abort(self) -> None:
        """Remove what was staged and release its memory (no-op after commit: the committed
        adapter may be served from the payload :meth:`finish` returned)."""
        self._close()
        if self._committed:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._buffer is not None:
            with contextlib.suppress(BufferError):  # views still in use: it goes when they do
                self._buffer.close()
            self._buffer = None

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
            if self._held:
                self._store.upload_memory.give_back(self._held)
                self._held = 0


def _exclusive(path: Path):
    """Hold ``path`` locked for this store's lifetime: two workers on one adapter directory would
    remove each other's staging and serve each other's half-made state."""
    handle = path.open("a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FailedPrecondition(
            f"adapter directory {path.parent} is in use by another worker process: give each worker "
            "its own data_dir (several pods share adapters through adapter_store)"
        ) from None
    return handle


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    """``pwrite`` every byte of ``view`` at ``offset``; falls back to buffered I/O where the file
    system refuses direct I/O at the first write. Every slice it takes is released before it
    returns or raises, so the caller can close the memory behind ``view`` even after an error."""
    done = 0
    while done < len(view):
        with view[done:] as rest:
            try:
                count = os.pwrite(fd, rest, offset + done)
            except OSError as exc:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & getattr(os, "O_DIRECT", 0):
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                continue
        done += count


class AdapterStore:
    def __init__(self, root: Path, upload_memory_bytes: int = DEFAULT_UPLOAD_MEMORY_BYTES) -> None:
        self.root = root
        self.upload_memory = UploadMemory(upload_memory_bytes)
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = _exclusive(root / LOCK_FILE)
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

    def close(self) -> None:
        """Let another worker use this directory (the lock also goes when the process ends)."""
        self._lock_file.close()

    def is_cache_of(self, store_url: str) -> bool:
        """Whether this directory already serves as the local cache of ``store_url`` (and so holds
        nothing the shared store lacks on purpose)."""
        try:
            return (self.root / CACHE_MARKER).read_text().strip() == store_url
        except FileNotFoundError:
            return False

    def mark_cache_of(self, store_url: str) -> None:
        marker = self.root / CACHE_MARKER
        marker.with_suffix(".tmp").write_text(store_url + "\n")
        os.replace(marker.with_suffix(".tmp"), marker)
        fsync_dir(self.root)

    def begin(self, size: int) -> PendingAdapter:
        """Start receiving an adapter of ``size`` bytes."""
        return PendingAdapter(self, size)

    def directory(self, model: str, tenant: str, adapter_id: str) -> Path:
        return self.root / model / tenant / adapter_id

    def payload_path(self, model: str, tenant: str, adapter_id: str) -> Path:
        return self.directory(model, tenant, adapter_id) / PAYLOAD_FILE

    def read_payload(self, model: str, tenant: str, adapter_id: str) -> bytes:
        return self.payload_path(model, tenant, adapter_id).read_bytes()

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
