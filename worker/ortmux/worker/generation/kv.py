"""The KV cache's bound for the whole process (``kv_cache_bytes``): a generation reserves
(prompt + max_new_tokens) x the model's KV bytes per token when it is admitted, so a running
sequence never has to be preempted, and gives it back when it ends."""

from __future__ import annotations

import threading


class KvPool:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.reserved_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.reserved_bytes + nbytes > self.limit_bytes:
                return False
            self.reserved_bytes += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.reserved_bytes -= nbytes
