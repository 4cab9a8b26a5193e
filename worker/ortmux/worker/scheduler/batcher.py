"""A standalone batcher for one base model: a bounded queue, per-request futures, batches closed
by size or delay, fair draws across tenants, deadlines, and errors fanned out.

Requests queue per fairness key (tenant, or adapter) in the scheduler's
:class:`~ortmux.worker.scheduler.fair_queue.FairQueue`, which the generation loop shares. The
runner thread opens a batch with the next request in round-robin order across keys (priority
orders a key's own requests only) and fills it, still round-robin, with requests of the same
signature until it holds ``max_batch_rows`` rows (or ``max_batch_tokens`` tokens) or
``max_delay`` has passed since it opened. Requests that cannot share a run (other sizes, adapters
fed to the whole run, models without a batch dimension) run alone through the same queue.
Before a run, requests whose deadline passed or whose caller went away are dropped and answered.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from ortmux.worker.errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    ResourceExhausted,
    Unavailable,
    WorkerError,
)
from ortmux.worker.scheduler.fair_queue import FairQueue
from ortmux.worker.scheduler.request import BatchResult, QueuedRequest

log = logging.getLogger(__name__)

# Runs requests as one batch; one result per request: its outputs, or the error it gets alone.
RunBatch = Callable[[Sequence[QueuedRequest]], Sequence[dict | Exception]]


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    max_batch_rows: int = 32
    max_batch_tokens: int = 1 << 62  # rows x dynamic sizes (batch x sequence) per run
    max_delay: float = 0.0
    max_queue: int = 1024
    # Rows one key may put in a batch while other keys are active (sent within ``active_window``
    # seconds); 0: no cap. A cap keeps runs short for light tenants at a cost in throughput.
    fair_share_rows: int = 0
    active_window: float = 1.0


@dataclasses.dataclass
class BatcherCounters:
    batches: int = 0
    rows: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0


class Batcher:
    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        limits: BatchLimits,
        observe: Callable[[Sequence[QueuedRequest], float, float], None] | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self.counters = BatcherCounters()
        self._run_batch = run_batch
        self._observe = observe
        self._queue: FairQueue[QueuedRequest] = FairQueue()
        self._forming = 0  # requests taken into the batch being formed: still queued to callers
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"ortmux-batcher-{name}", daemon=True)
        # Answers (futures, their callbacks, metrics) are given on a thread of their own, so the
        # batcher starts its next run as soon as ONNX Runtime returns.
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._answerer = threading.Thread(
            target=self._answer_loop, name=f"ortmux-answers-{name}", daemon=True
        )
        self._thread.start()
        self._answerer.start()

    @property
    def depth(self) -> int:
        with self._cond:
            return self._queue.size + self._forming

    def submit(self, request: QueuedRequest) -> QueuedRequest:
        """Queue a request; its future resolves to a BatchResult or raises an ortmux error."""
        with self._cond:
            if self._closed:
                raise Unavailable(f"model '{self.name}' is shutting down")
            if self._queue.size + self._forming >= self.limits.max_queue:
                self.counters.rejected += 1
                raise ResourceExhausted(
                    f"the queue of model '{self.name}' is full ({self.limits.max_queue} requests); "
                    "retry shortly",
                    retry_after=max(self.limits.max_delay * 4, 0.01),
                )
            self._queue.push(request)
            self._cond.notify_all()
        return request

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests; queued ones still run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._answers.put(None)
        self._answerer.join(timeout)

    # -- the runner thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[QueuedRequest] | None:
        with self._cond:
            while not self._queue.size:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.pop()
            assert first is not None
            batch = [first]
            self._forming = 1
            rows, tokens = first.rows, first.tokens
            signature = first.signature()
            opened = time.monotonic()
            capped = self._share_cap(opened)
            taken = collections.Counter({first.fairness_key: first.rows})
            while rows < self.limits.max_batch_rows and signature[0] != "alone":
                full = {key for key, count in taken.items() if capped and count >= capped}
                room = (self.limits.max_batch_rows - rows, self.limits.max_batch_tokens - tokens)

                def fits(r: QueuedRequest, room: tuple[int, int] = room) -> bool:
                    return r.signature() == signature and r.rows <= room[0] and r.tokens <= room[1]

                candidate = self._queue.pop(fits, skip=full)
                if candidate is not None:
                    batch.append(candidate)
                    self._forming += 1
                    rows += candidate.rows
                    tokens += candidate.tokens
                    taken[candidate.fairness_key] += candidate.rows
                    continue
                remaining = self.limits.max_delay - (time.monotonic() - opened)
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._forming = 0
            return batch

    def _share_cap(self, now: float) -> int:
        """Rows per key in the batch being formed: the fair share while several keys are active."""
        if not self.limits.fair_share_rows:
            return 0
        active = self._queue.active_keys(self.limits.active_window)
        return self.limits.fair_share_rows if active > 1 else 0

    def _run(self, batch: list[QueuedRequest]) -> None:
        now = time.monotonic()
        live = []
        for request in batch:
            if request.expired(now):
                self.counters.expired += 1
                request.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it was queued")
                )
            elif not request.is_active():
                self.counters.cancelled += 1
                request.future.set_exception(
                    Cancelled("the caller cancelled the request while it was queued")
                )
            else:
                live.append(request)
        if not live:
            return
        started = time.monotonic()
        try:
            outputs = self._run_batch(live)
        except Exception as exc:
            error = exc if isinstance(exc, WorkerError) else InternalError(f"batch run failed: {exc}")
            if not isinstance(exc, WorkerError):
                log.exception("batch of %d requests on '%s' failed", len(live), self.name)
            for request in live:
                request.future.set_exception(error)
            return
        finished = time.monotonic()
        rows = sum(request.rows for request in live)
        self.counters.batches += 1
        self.counters.rows += rows
        self._answers.put((live, outputs, started, finished, rows))

    def _answer_loop(self) -> None:
        while True:
            item = self._answers.get()
            if item is None:
                return
            live, outputs, started, finished, rows = item
            if self._observe is not None:
                try:
                    self._observe(live, started, finished)
                except Exception:  # metrics must never keep a request from its answer
                    log.exception("observing a batch of '%s' failed", self.name)
            for request, result in zip(live, outputs, strict=True):
                if isinstance(result, Exception):
                    request.future.set_exception(result)
                    continue
                request.future.set_result(
                    BatchResult(
                        outputs=result,
                        queue_seconds=started - request.enqueued_at,
                        compute_seconds=finished - started,
                        batch_rows=rows,
                    )
                )
