"""The adapter store on real files: staging, commit, and what a failed disk sync leaves."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from ortmux.worker.adapters.local_store import PAYLOAD_FILE, AdapterMeta, AdapterStore
from ortmux.worker.errors import ResourceExhausted

from ..conftest import small_tmpfs


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
    pending = store.begin(len(data))
    for start in range(0, len(data), 1 << 20):
        pending.write(data[start : start + (1 << 20)])
    return pending


SHM = Path("/dev/shm")


@pytest.fixture(params=["disk", "tmpfs"])
def root(request: pytest.FixtureRequest, tmp_path: Path):
    """A store root on the test's disk (direct I/O) and on tmpfs (where the store may fall back to
    buffered writes)."""
    if request.param == "disk":
        yield tmp_path
        return
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        pytest.skip("no writable /dev/shm")
    directory = SHM / f"ortmux-test-{os.getpid()}-{tmp_path.name}"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("size", [1, 4095, 4096, 1 << 20, (1 << 20) + 1, (3 << 20) + 123])
def test_a_committed_payload_is_read_back_exactly(root: Path, size: int) -> None:
    store = AdapterStore(root)
    data = os.urandom(size)
    pending = _write(store, data)
    received = pending.finish()
    assert received[:] == data
    pending.commit(_meta("a", len(data)))
    pending.abort()  # a no-op once committed
    assert received[:] == data  # still readable: adapters keep views of it
    assert store.read_payload("m", "default", "a") == data
    assert [meta.adapter_id for meta in store.scan()] == ["a"]
    assert not any((root / ".staging").iterdir())


def test_more_bytes_than_declared_are_refused(tmp_path: Path) -> None:
    pending = AdapterStore(tmp_path).begin(10)
    pending.write(b"x" * 6)
    with pytest.raises(ValueError, match="passed the declared 10"):
        pending.write(b"x" * 6)
    with pytest.raises(ValueError, match="6 of 10 bytes"):
        pending.finish()
    pending.abort()
    assert not any((tmp_path / ".staging").iterdir())


def test_a_failed_sync_fails_the_upload_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that cannot sync must fail the registration, never move the adapter into place."""
    store = AdapterStore(tmp_path)

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_sync)
    data = os.urandom(3 << 20)
    pending = _write(store, data)
    with pytest.raises(OSError, match="Input/output error"):
        pending.finish()
        pending.commit(_meta("a", len(data)))
    pending.abort()
    assert list(store.scan()) == []
    assert not (store.directory("m", "default", "a") / PAYLOAD_FILE).exists()
    assert not any((tmp_path / ".staging").iterdir())


@pytest.mark.parametrize("size", [1, 4096, (3 << 20) + 123])
def test_uploads_past_the_upload_memory_go_to_their_staging_file(root: Path, size: int) -> None:
    store = AdapterStore(root, upload_memory_bytes=1 << 20)
    holder = store.begin(1 << 20)  # takes all of it
    assert holder.in_memory and store.upload_memory.held_bytes == 1 << 20
    data = os.urandom(size)
    pending = _write(store, data)
    assert not pending.in_memory and store.upload_memory.spilled == 1
    received = pending.finish()
    assert received[:] == data  # a read-only mapping of the staged file
    pending.commit(_meta("a", size))
    assert store.read_payload("m", "default", "a") == data
    holder.abort()
    assert store.upload_memory.held_bytes == 0
    assert not any((root / ".staging").iterdir())


def test_upload_memory_comes_back_after_commit_and_abort(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, upload_memory_bytes=10 << 20)
    committed, aborted = _write(store, os.urandom(3 << 20)), _write(store, os.urandom(5 << 20))
    assert store.upload_memory.held_bytes == 8 << 20
    committed.finish()
    committed.commit(_meta("a", 3 << 20))
    aborted.abort()
    assert store.upload_memory.held_bytes == 0


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(tmp_path: Path, in_memory: bool) -> None:
    with small_tmpfs(tmp_path / "small", 2 << 20) as small:
        store = AdapterStore(small, upload_memory_bytes=(8 << 20) if in_memory else 1)
        pending = store.begin(4 << 20)
        assert pending.in_memory == in_memory
        with pytest.raises(ResourceExhausted, match=r"adapter storage at .* is full") as caught:
            for _ in range(4):
                pending.write(os.urandom(1 << 20))
            pending.finish()
        assert caught.value.reason == "STORAGE_FULL"
        pending.abort()  # every buffer released (a BufferError here was the old failure)
        assert store.upload_memory.held_bytes == 0
        assert not any((small / ".staging").iterdir())
        data = os.urandom(100_000)  # the store still works once the space is there
        pending = _write(store, data)
        pending.finish()
        pending.commit(_meta("a", len(data)))
        assert store.read_payload("m", "default", "a") == data


def test_one_adapter_directory_serves_one_worker_at_a_time(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ortmux.worker.errors import FailedPrecondition

    first = AdapterStore(tmp_path / "adapters")
    holder = (
        "import sys, time; from pathlib import Path;"
        "from ortmux.worker.adapters.local_store import AdapterStore;"
        "held = AdapterStore(Path(sys.argv[1])); print('held', flush=True); time.sleep(30)"
    )
    with pytest.raises(FailedPrecondition, match="in use by another worker process"):
        AdapterStore(tmp_path / "adapters")
    first.close()
    other = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "adapters")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        with pytest.raises(FailedPrecondition, match="give each worker its own data_dir"):
            AdapterStore(tmp_path / "adapters")
    finally:
        other.kill()
        other.wait()
    AdapterStore(tmp_path / "adapters").close()  # free again once the other process is gone
