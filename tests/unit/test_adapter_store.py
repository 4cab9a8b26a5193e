"""The adapter store on real files: staging, commit, and what a failed disk sync leaves."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ortmux.worker.adapters.store import PAYLOAD_FILE, AdapterMeta, AdapterStore


def _meta(adapter_id: str, size: int) -> AdapterMeta:
    return AdapterMeta(
        model="m",
        adapter_id=adapter_id,
        format="weight_override",
        rank=0,
        targets=["w"],
        size_bytes=size,
        sha256="0" * 64,
        pinned=False,
        created_at=0.0,
        files=[],
    )


def _write(store: AdapterStore, data: bytes):
    pending = store.begin()
    for start in range(0, len(data), 1 << 20):
        pending.write(data[start : start + (1 << 20)])
    return pending


def test_a_committed_payload_is_read_back_exactly(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    data = os.urandom((9 << 20) + 123)  # past two background syncs, and a tail
    pending = _write(store, data)
    mapped = pending.finish()
    assert mapped[:] == data
    pending.commit(_meta("a", len(data)))
    pending.abort()  # a no-op once committed
    assert store.read_payload("m", "default", "a") == data
    assert [meta.adapter_id for meta in store.scan()] == ["a"]
    assert not any((tmp_path / ".staging").iterdir())


@pytest.mark.parametrize("size", [1 << 20, 5 << 20], ids=["final sync", "sync during the upload"])
def test_a_failed_background_sync_fails_the_commit_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Linux reports a writeback error to one sync call only: the background sync that sees it must
    hand it to the commit, or the adapter would be moved into place with bytes not on disk."""
    store = AdapterStore(tmp_path)

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    data = os.urandom(size)
    pending = _write(store, data)
    with pytest.raises(OSError, match="Input/output error"):
        pending.finish()
        pending.commit(_meta("a", len(data)))
    pending.abort()
    assert list(store.scan()) == []
    assert not (store.directory("m", "default", "a") / PAYLOAD_FILE).exists()
    assert not any((tmp_path / ".staging").iterdir())
