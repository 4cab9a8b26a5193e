"""Adapters on disk: ``<root>/<model>/<adapter_id>/`` with ``meta.json`` and the adapter's files.

Every write is atomic: files are written and fsynced in a staging directory, which is renamed into
place; a replaced adapter is renamed aside before its successor takes its place. Leftovers of a
crash (staging, trash) are removed at start, so a crash never leaves half an adapter where a
worker would load it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from ortmux.worker.files import fsync_dir

log = logging.getLogger(__name__)

META_FILE = "meta.json"
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

    @classmethod
    def from_json(cls, data: bytes) -> AdapterMeta:
        values = json.loads(data)
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode()


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        for name in _WORK_DIRS:
            shutil.rmtree(root / name, ignore_errors=True)
            (root / name).mkdir(parents=True, exist_ok=True)

    def directory(self, model: str, adapter_id: str) -> Path:
        return self.root / model / adapter_id

    def save(self, meta: AdapterMeta, files: Mapping[str, bytes]) -> None:
        """Write an adapter atomically, replacing one of the same id if present."""
        staging = self.root / ".staging" / uuid.uuid4().hex
        staging.mkdir()
        try:
            # The staging directory is the atomic unit: files need fsync, not renames of their own.
            for name, data in [*files.items(), (META_FILE, meta.to_json())]:
                with open(staging / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_dir(staging)
            target = self.directory(meta.model, meta.adapter_id)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                self._trash(target)
            os.rename(staging, target)
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read_files(self, model: str, adapter_id: str) -> dict[str, bytes]:
        directory = self.directory(model, adapter_id)
        return {path.name: path.read_bytes() for path in directory.iterdir() if path.name != META_FILE}

    def remove(self, model: str, adapter_id: str) -> None:
        directory = self.directory(model, adapter_id)
        if directory.exists():
            self._trash(directory)

    def scan(self) -> Iterator[AdapterMeta]:
        """Every stored adapter; unreadable entries are logged and skipped."""
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for directory in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                try:
                    yield AdapterMeta.from_json((directory / META_FILE).read_bytes())
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.error("skipping unreadable adapter at %s: %s", directory, exc)

    def _trash(self, directory: Path) -> None:
        trash = self.root / ".trash" / f"{directory.name}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, trash)
        fsync_dir(directory.parent)
        shutil.rmtree(trash, ignore_errors=True)


def now() -> float:
    return time.time()
