"""The KV cache's bound for the whole process (``kv_cache_bytes``): a generation reserves
(prompt + max_new_tokens) x the model's KV bytes per token when it is admitted, so a running
sequence never has to be preempted, and gives it back when it ends.

Every model's decode loop draws on the one pool; a loop whose waiting generations find no room
sleeps until some is given back (``on_release``), instead of polling."""

from __future__ import annotations

import threading
from collections.abc import Callable


class KvPool:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.reserved_bytes = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.reserved_bytes + nbytes > self.limit_bytes:
                return False
            self.reserved_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.reserved_bytes -= nbytes
            listeners = list(self._listeners)
        for wake in listeners:
            wake()

    def on_release(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake`` whenever room is given back; returns what stops that."""
        with self._lock:
            self._listeners.append(wake)

        def stop() -> None:
            with self._lock:
                if wake in self._listeners:
                    self._listeners.remove(wake)

        return stop
