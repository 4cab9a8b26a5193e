"""The thread that keeps a pod's adapters in step with the shared store, and collects its garbage."""

from __future__ import annotations

import logging
import random
import threading
import time

from ortmux.worker.adapters.manager import AdapterManager
from ortmux.worker.adapters.object_store import StoreUnavailable

log = logging.getLogger(__name__)


class SyncLoop:
    """Polls the store's change log every ``interval`` seconds (half the promised sync bound) and
    collects orphans every ``gc_seconds`` (jittered, so pods do not collect in step). A store that
    stops answering is logged once per outage and tried again at every tick; nothing restarts."""

    def __init__(self, adapters: AdapterManager, sync_seconds: float, gc_seconds: float) -> None:
        self._adapters = adapters
        self._interval = sync_seconds / 2
        self._gc_seconds = gc_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ortmux-adapter-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        failing = False
        next_gc = time.monotonic() + self._gc_seconds * random.uniform(0.5, 1.0)
        while not self._stop.wait(self._interval):
            try:
                self._adapters.sync()
                if time.monotonic() >= next_gc:
                    self._adapters.collect_garbage()
                    next_gc = time.monotonic() + self._gc_seconds * random.uniform(0.8, 1.2)
                if failing:
                    log.info("adapter store answers again")
                failing = False
            except StoreUnavailable as exc:
                self._adapters.counters.sync_errors += 1
                if not failing:
                    log.error("%s; adapters known to this pod keep serving", exc)
                failing = True
            except Exception:
                self._adapters.counters.sync_errors += 1
                log.exception("adapter sync failed")
