"""Continuous batching for generation: per model, one loop thread runs the iterations of its
scheduler's plan (scheduler/decode_scheduler.py: admission from the fair queue, prefills,
chunked long prompts, the running groups) on its model runner (scheduler/decode_runner.py: feeds
and one run), and turns each run's logits into its rows' chunks (scheduler/decode_output.py: the
batched sampler and each row's detokenizer); finished or cancelled sequences leave at once.

Rows of different lengths share a step: the cache is left-padded, the attention mask hides the
padding, and position ids come from the mask (a model without position ids runs each sequence in
steps of its own). Adapters that must have a run to themselves (whole-run feeds, shared
activations) decode in steps of their own. The KV cache stays in the worker: a step's present
becomes the next step's past without a copy while the rows stay the same; it is re-laid only
when rows join or leave.

A run that fails fails only the rows it can be blamed on (the runner retries it by halves); the
other rows go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.lora.feeds import FeedPool
from ortmux.worker.errors import InternalError, Unavailable, WorkerError
from ortmux.worker.generation.job import Chunk, GenerationJob
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.generation.prefix_cache import PrefixCache
from ortmux.worker.scheduler.decode_output import next_chunks
from ortmux.worker.scheduler.decode_rows import Rows
from ortmux.worker.scheduler.decode_runner import DecodeRunner, RunResult
from ortmux.worker.scheduler.decode_scheduler import DecodeLimits, DecodeScheduler, gone

log = logging.getLogger(__name__)


class GenerationObserver(Protocol):
    """What the loop reports (the metrics)."""

    def step(self, rows: int, seconds: float) -> None: ...

    def token(self, first: bool, seconds: float) -> None: ...

    def prefix(self, hit_tokens: int, prompt_tokens: int) -> None: ...

    def preempted(self) -> None: ...


BLOCKED_POLL_SECONDS = 0.1


class DecodeLoop:
    blocks = None  # the paged KV cache's blocks (scheduler/paged_loop.py); the dense loop has none

    def __init__(
        self,
        model: BaseModel,
        decoder: DecoderSpec,
        kv: KvPool,
        limits: DecodeLimits,
        feed_pool: FeedPool,
        observer: GenerationObserver,
        pad_id: int = 0,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.name = model.name
        self.model = model
        self.decoder = decoder
        self.kv = kv
        self.limits = limits
        self.prefix = prefix  # cached prompt prefixes (generation/prefix_cache.py), or none
        hooks = {"make_room": self._make_room, "cached": self._cached_tokens, **self._scheduler_hooks()}
        self.scheduler = DecodeScheduler(model.name, decoder, kv, limits, **hooks)
        self.runner = DecodeRunner(model, decoder, feed_pool)
        self._observer = observer
        self._pad_id = pad_id
        self._cond = threading.Condition()
        self._closed = False
        # Waiting generations found no room (KV, rows) and nothing runs: sleep until room is given
        # back (by any model's loop), a generation arrives, or BLOCKED_POLL_SECONDS pass (to end
        # those whose deadline passed or whose caller went away meanwhile).
        self._blocked = False
        self._stop_listening = kv.on_release(self._wake)
        self._thread = threading.Thread(target=self._loop, name=f"ortmux-decode-{self.name}", daemon=True)
        self._thread.start()

    @property
    def executes(self) -> BaseModel:
        """What runs this loop's steps (its ``run`` takes the feeds by name)."""
        return self.runner.model

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting

    def submit(self, job: GenerationJob) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable(f"model '{self.name}' is shutting down", retry_after=1.0)
            self.scheduler.submit(job)
            self._blocked = False
            self._cond.notify_all()

    def _scheduler_hooks(self) -> dict:
        """What the scheduler asks this loop (a paged loop admits by blocks)."""
        return {}

    def _make_room(self, nbytes: int) -> int:
        return self.prefix.evict(nbytes) if self.prefix is not None else 0

    def _cached_tokens(self, job: GenerationJob) -> int:
        if self.prefix is None or job.prefix_keys is None:
            return 0
        return self.prefix.cached_tokens(job.prefix_keys, len(job.prompt_ids))

    def _wake(self) -> None:
        with self._cond:
            self._blocked = False
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Take no more generations; those admitted and waiting still run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._stop_listening()
        if self.prefix is not None and not self._thread.is_alive():
            self.prefix.clear()

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cond:
                while not self._busy() and (self._blocked or not scheduler.waiting):
                    if self._closed and not scheduler.waiting:
                        return
                    self._cond.wait(BLOCKED_POLL_SECONDS if scheduler.waiting else None)
                    self._blocked = False
                for job, error in scheduler.expired():
                    self._end(job, error=error)
                admitted = scheduler.admit()
                self._blocked = not (admitted or self._busy())
            try:
                self._iterate(admitted)
            except Exception as exc:  # a fault of the loop itself: every generation it holds ends
                log.exception("decode loop of model '%s' failed", self.name)
                error = InternalError(f"model '{self.name}' failed to generate: {exc}")
                for job in [*admitted, *self._clear()]:
                    self._end(job, error=error)

    # -- one iteration on the dense cache (a subclass pages it: scheduler/paged_loop.py) -------

    def _busy(self) -> bool:
        return self.scheduler.busy

    def _clear(self) -> list[GenerationJob]:
        return self.scheduler.clear()

    def _release(self, job: GenerationJob) -> None:
        self.kv.release(job.kv_bytes)

    def _iterate(self, admitted: list[GenerationJob]) -> None:
        scheduler = self.scheduler
        for key, jobs in scheduler.prefills(self._resumed(admitted)):
            self._prefill(key, jobs)
        self._advance_partials()
        for key in list(scheduler.groups):
            self._step(key)

    def _resumed(self, admitted: list[GenerationJob]) -> list[GenerationJob]:
        """The admitted generations without a cached prefix; those with one resume after it."""
        if self.prefix is None:
            return admitted
        fresh = []
        for job in admitted:
            hit = None
            if job.prefix_keys is not None:
                hit = self.prefix.lookup(job.prefix_keys, len(job.prompt_ids))
                self._observer.prefix(hit.tokens if hit else 0, len(job.prompt_ids))
            if hit is None:
                fresh.append(job)
            else:
                self.scheduler.resume(job, hit.tokens, hit.cache)
        return fresh

    def _cache_prompt(self, job: GenerationJob, cache: list[np.ndarray], row: int, end: int) -> None:
        """The prompt's full blocks into the prefix cache: row ``row`` of ``cache``, whose columns
        up to ``end`` hold the prompt's tokens last."""
        if self.prefix is not None and job.prefix_keys is not None:
            start = end - len(job.prompt_ids)
            self.prefix.insert(job.prefix_keys, [part[row, :, start:end] for part in cache])

    def _prefill(self, key: tuple, jobs: list[GenerationJob]) -> None:
        length = max(len(job.prompt_ids) for job in jobs)
        ids = np.full((len(jobs), length), self._pad_id, np.int64)
        mask = np.zeros((len(jobs), length), np.int64)
        for row, job in enumerate(jobs):
            ids[row, length - len(job.prompt_ids) :] = job.prompt_ids
            mask[row, length - len(job.prompt_ids) :] = 1
        result = self.runner.run(jobs, ids, mask, self.runner.empty_cache(len(jobs)))
        rows = self._survivors(jobs, result, mask)
        if rows is not None:
            for row, job in enumerate(rows.jobs):
                self._cache_prompt(job, rows.cache, row, rows.mask.shape[1])
            self._emit(rows, result.logits)
            if rows.jobs:
                self.scheduler.join(key, rows)

    def _advance_partials(self) -> None:
        """This iteration's chunks of the prompts read in chunks (long ones, and those resuming
        after a cached prefix); a prompt all in has its first token sampled and joins its group's
        decode steps."""
        for partial, chunk in self.scheduler.prefill_chunks():
            job = partial.job
            error = gone(job, time.monotonic(), "while its prompt was read")
            if error is None:
                mask = np.ones((1, partial.done), np.int64)
                past = partial.cache or self.runner.empty_cache(1)
                result = self.runner.run([job], np.array([chunk], np.int64), mask, past)
                error = self._failure(result.failed[0]) if result.failed else None
            if error is not None:
                self.scheduler.drop_partial(partial)
                self._end(job, error=error)
                continue
            partial.cache = result.present
            if partial.done < len(job.prompt_ids):
                continue
            self.scheduler.drop_partial(partial)
            self._cache_prompt(job, partial.cache, 0, partial.done)
            rows = Rows([job], partial.cache, mask)
            self._emit(rows, result.logits)
            if rows.jobs:
                self.scheduler.join(job.group(self.decoder), rows)

    def _step(self, key: tuple) -> None:
        rows = self.scheduler.groups[key]
        now = time.monotonic()
        errors = {i: error for i, job in enumerate(rows.jobs) if (error := gone(job, now, "while it ran"))}
        if errors:
            for i, error in errors.items():
                self._end(rows.jobs[i], error=error)
            rows.keep([i for i in range(len(rows.jobs)) if i not in errors])
        if not rows.jobs:
            self.scheduler.drop(key)
            return
        last = np.array([[job.generated[-1]] for job in rows.jobs], np.int64)
        mask = np.concatenate([rows.mask, np.ones((len(rows.jobs), 1), np.int64)], axis=1)
        started = time.perf_counter()
        result = self.runner.run(rows.jobs, last, mask, rows.cache, rows)
        self._observer.step(len(rows.jobs), time.perf_counter() - started)
        if result.failed:
            survivors = self._survivors(rows.jobs, result, mask)
            if survivors is None:
                self.scheduler.drop(key)
                return
            rows = self.scheduler.replace(key, survivors)
        else:
            rows.cache, rows.mask = result.present, mask
        self._emit(rows, result.logits)
        if not rows.jobs:
            self.scheduler.drop(key)

    def _survivors(self, jobs: Sequence[GenerationJob], result: RunResult, mask: np.ndarray) -> Rows | None:
        """The rows a run did not fail, with their present cache; the others end."""
        for index, exc in result.failed.items():
            log.error("a run of model '%s' failed for one generation: %s", self.name, exc, exc_info=exc)
            self._end(jobs[index], error=self._failure(exc))
        if not result.failed:
            return Rows(list(jobs), result.present, mask)
        if not result.kept:
            return None
        rows = Rows([jobs[i] for i in result.kept], result.present, mask[result.kept])
        rows.keep(list(range(len(result.kept))))  # leading columns that are all padding go
        return rows

    def _failure(self, exc: Exception) -> WorkerError:
        if isinstance(exc, WorkerError):
            return exc
        return InternalError(f"model '{self.name}' failed to generate: {exc}")

    def _emit(self, rows: Rows, logits: np.ndarray) -> None:
        """Each row's next token and text, sent; rows that finished leave."""
        chunks = next_chunks(rows.jobs, logits, self._observer)
        finished = []
        for index, (job, chunk) in enumerate(zip(rows.jobs, chunks, strict=True)):
            if chunk.finish_reason:
                finished.append(index)
                self._end(job, chunk=chunk)
            else:
                job.events.put(chunk)
        if finished:
            rows.keep([i for i in range(len(rows.jobs)) if i not in finished])

    def _end(self, job: GenerationJob, chunk: Chunk | None = None, error: Exception | None = None) -> None:
        """The generation's last event and the release of what it holds; once only."""
        if job.ended:
            return
        job.ended = True
        if job.admitted_at:
            self._release(job)
        job.events.put(chunk if chunk is not None else error)
        job.events.put(None)
        try:
            job.on_done()
        except Exception:
            log.exception("releasing a generation of '%s' failed", self.name)
