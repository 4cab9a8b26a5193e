"""The worker's memory guard: new requests are refused before the kernel's OOM killer would take
the pod (and everything in flight on it), and what a large run made ONNX Runtime's arena keep is
handed back.

The limit comes from the ``memory_limit_bytes`` setting, by default 90% of the container's cgroup
memory limit (``memory.max``, or ``memory.limit_in_bytes`` under cgroup v1). It is checked against
the process's resident memory when a request arrives (reading ``/proc/self/statm`` costs
microseconds): past it, RESOURCE_EXHAUSTED with a retry delay. After a run the arena is shrunk
when the process is past three quarters of the limit, and after every run that failed to
allocate memory.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ortmux.worker.engine.runtime import release_arena
from ortmux.worker.errors import ResourceExhausted

log = logging.getLogger(__name__)

_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
_UNLIMITED = 1 << 60
DEFAULT_SHARE = 0.9  # of the cgroup's limit, when memory_limit_bytes is 0
RELEASE_SHARE = 0.75  # of the guard's limit: past it, runs hand the arena's spare memory back
RETRY_SECONDS = 1.0


def cgroup_limit_bytes() -> int | None:
    """The container's memory limit, if one is set."""
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _UNLIMITED:
            return int(text)
        return None
    return None


def resident_bytes() -> int:
    """The process's resident memory."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryGuard:
    """Refuses new work past ``limit_bytes`` of resident memory (0: no guard)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = max(limit_bytes, 0)
        self.refusals = 0
        self.releases = 0
        self._lock = threading.Lock()

    @classmethod
    def from_setting(cls, memory_limit_bytes: int) -> MemoryGuard:
        """``memory_limit_bytes`` as the setting gives it: -1 off, 0 from the cgroup, else bytes."""
        if memory_limit_bytes > 0:
            return cls(memory_limit_bytes)
        cgroup = cgroup_limit_bytes() if memory_limit_bytes == 0 else None
        if cgroup is None:
            return cls(0)
        guard = cls(int(cgroup * DEFAULT_SHARE))
        log.info("memory guard at %d bytes (90%% of the container's limit)", guard.limit_bytes)
        return guard

    def admit(self) -> None:
        """ResourceExhausted when the worker is past its limit."""
        if not self.limit_bytes:
            return
        used = resident_bytes()
        if used >= self.limit_bytes:
            with self._lock:
                self.refusals += 1
            release_arena()  # what finished runs left in the arena goes back, if any did
            raise ResourceExhausted(
                f"the worker is using {used >> 20} MiB, past its memory limit of "
                f"{self.limit_bytes >> 20} MiB (memory_limit_bytes); retry shortly",
                reason="MEMORY_LIMIT",
                retry_after=RETRY_SECONDS,
            )

    def after_run(self) -> None:
        """Hand the arena's spare memory back when the process is past the release level."""
        if self.limit_bytes and resident_bytes() >= self.limit_bytes * RELEASE_SHARE:
            with self._lock:
                self.releases += 1
            release_arena()
