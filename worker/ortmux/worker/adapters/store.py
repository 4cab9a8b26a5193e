"""Adapters on disk: ``<root>/<model>/<adapter_id>/`` holding ``payload`` (the bytes exactly as
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
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ortmux.worker.files import fsync_dir

log = logging.getLogger(__name__)

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
    """An adapter being written: its payload streams into a staging directory."""

    def __init__(self, store: AdapterStore) -> None:
        self._store = store
        self.directory = store.root / ".staging" / uuid.uuid4().hex
        self.directory.mkdir()
        self._handle = open(self.directory / PAYLOAD_FILE, "wb")  # noqa: SIM115 (closed in finish/abort)

    def write(self, chunk: bytes) -> None:
        self._handle.write(chunk)

    def finish(self) -> None:
        """The payload is complete: flush it to disk."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def commit(self, meta: AdapterMeta) -> None:
        """Write the meta and move the adapter into place atomically."""
        with open(self.directory / META_FILE, "wb") as handle:
            handle.write(meta.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.directory)
        target = self._store.directory(meta.model, meta.adapter_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            self._store.trash(target)
        os.rename(self.directory, target)
        fsync_dir(target.parent)

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for name in _WORK_DIRS:
            shutil.rmtree(root / name, ignore_errors=True)
            (root / name).mkdir(parents=True, exist_ok=True)

    def begin(self) -> PendingAdapter:
        return PendingAdapter(self)

    def directory(self, model: str, adapter_id: str) -> Path:
        return self.root / model / adapter_id

    def read_payload(self, model: str, adapter_id: str) -> bytes:
        return (self.directory(model, adapter_id) / PAYLOAD_FILE).read_bytes()

    def remove(self, model: str, adapter_id: str) -> None:
        directory = self.directory(model, adapter_id)
        if directory.exists():
            self.trash(directory)

    def scan(self) -> Iterator[AdapterMeta]:
        """Every stored adapter; unreadable entries are logged and skipped."""
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for directory in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                try:
                    yield AdapterMeta.from_json((directory / META_FILE).read_bytes())
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.error("skipping unreadable adapter at %s: %s", directory, exc)

    def trash(self, directory: Path) -> None:
        trash = self.root / ".trash" / f"{directory.name}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, trash)
        fsync_dir(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)
