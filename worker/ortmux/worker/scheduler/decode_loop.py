"""Continuous batching for generation: per model, one loop runs decode steps over the running
sequences, one token per row, each row with its own adapter or none (the per-row LoRA feeds Infer
uses). Waiting generations are admitted between steps from the scheduler's fair queue (priority,
tenants, deadlines, cancellation), prefilled together and joined to the running rows; finished or
cancelled sequences leave at once.

A prompt longer than ``max_prefill_tokens`` is prefilled a chunk per iteration, between the
steps of the running rows, so it never stalls them for long.

Rows of different lengths share a step: the cache is left-padded, the attention mask hides the
padding, and position ids come from the mask (a model without position ids runs each sequence in
steps of its own). Adapters that must have a run to themselves (whole-run feeds, shared
activations) decode in steps of their own. The KV cache stays in the worker: a step's present
becomes the next step's past without a copy while the rows stay the same; it is re-laid only
when rows join or leave.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.lora.feeds import FeedBuffers, FeedPool, RowSpan, build_feeds
from ortmux.worker.errors import Cancelled, DeadlineExceeded, InternalError, ResourceExhausted, Unavailable
from ortmux.worker.generation.job import Chunk, GenerationJob
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.scheduler.decode_rows import Partial, Rows
from ortmux.worker.scheduler.fair_queue import FairQueue

log = logging.getLogger(__name__)


class GenerationObserver(Protocol):
    """What the loop reports (the metrics)."""

    def step(self, rows: int, seconds: float) -> None: ...

    def token(self, first: bool, seconds: float) -> None: ...


BLOCKED_POLL_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    max_running: int = 32  # rows of a decode step (all groups together)
    max_prefill_tokens: int = 2048  # prompt tokens prefilled between two steps
    max_waiting: int = 1024


class DecodeLoop:
    def __init__(
        self,
        model: BaseModel,
        decoder: DecoderSpec,
        kv: KvPool,
        limits: DecodeLimits,
        feed_pool: FeedPool,
        observer: GenerationObserver,
        pad_id: int = 0,
    ) -> None:
        self.name = model.name
        self.model = model
        self.decoder = decoder
        self.kv = kv
        self.limits = limits
        self._feed_pool = feed_pool
        self._observer = observer
        self._pad_id = pad_id
        self._waiting: FairQueue[GenerationJob] = FairQueue()
        self._groups: dict[tuple, Rows] = {}
        self._partial: list[Partial] = []  # long prompts being prefilled a chunk per iteration
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
    def running(self) -> int:
        return sum(len(rows.jobs) for rows in list(self._groups.values())) + len(self._partial)

    @property
    def waiting(self) -> int:
        return self._waiting.size

    def submit(self, job: GenerationJob) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable(f"model '{self.name}' is shutting down", retry_after=1.0)
            if self._waiting.size >= self.limits.max_waiting:
                raise ResourceExhausted(
                    f"{self._waiting.size} generations wait for model '{self.name}' already; retry shortly",
                    retry_after=1.0,
                )
            self._waiting.push(job)
            self._blocked = False
            self._cond.notify_all()

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

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._groups and not self._partial and (self._blocked or not self._waiting.size):
                    if self._closed and not self._waiting.size:
                        return
                    self._cond.wait(BLOCKED_POLL_SECONDS if self._waiting.size else None)
                    self._blocked = False
                admitted = self._admit()
                self._blocked = not (admitted or self._groups or self._partial)
            chunk = self.limits.max_prefill_tokens
            try:
                self._prefill([job for job in admitted if len(job.prompt_ids) <= chunk])
                self._partial += [Partial(job) for job in admitted if len(job.prompt_ids) > chunk]
                self._advance_partial()
                for key in list(self._groups):
                    self._step(key)
            except Exception as exc:  # a fault of the worker: every generation it touched ends
                log.exception("decode step of model '%s' failed", self.name)
                error = InternalError(f"model '{self.name}' failed to generate: {exc}")
                touched = [*admitted, *(j for rows in self._groups.values() for j in rows.jobs)]
                for job in touched + [partial.job for partial in self._partial]:
                    self._end(job, error=error)
                self._groups.clear()
                self._partial.clear()

    def _admit(self) -> list[GenerationJob]:
        """Waiting generations that fit now (rows, prefill tokens, KV room), in fair order."""
        now = time.monotonic()
        for job in self._waiting.remove(lambda job: _gone(job, now) is not None):
            self._end(job, error=_gone(job, now, "while it waited"))
        admitted: list[GenerationJob] = []
        room = self.limits.max_running - self.running
        budget = self.limits.max_prefill_tokens

        def fits(job: GenerationJob) -> bool:
            cost = min(len(job.prompt_ids), self.limits.max_prefill_tokens)  # long prompts: a chunk
            return len(admitted) < room and (not admitted or cost <= budget)

        while True:
            job = self._waiting.pop(fits)
            if job is None:
                break
            if not self.kv.reserve(job.kv_bytes):
                self._waiting.push(job, front=True)  # waits for KV room, first of its key
                break
            job.admitted_at = time.monotonic()
            admitted.append(job)
            budget -= min(len(job.prompt_ids), self.limits.max_prefill_tokens)
        return admitted

    def _advance_partial(self) -> None:
        """One chunk (``max_prefill_tokens``) of the oldest long prompt; once it is all in, its
        first token is sampled and it joins its group's decode steps."""
        if not self._partial:
            return
        partial = self._partial[0]
        job = partial.job
        gone = _gone(job, time.monotonic(), "while its prompt was read")
        if gone is not None:
            self._partial.pop(0)
            self._end(job, error=gone)
            return
        chunk = job.prompt_ids[partial.done : partial.done + self.limits.max_prefill_tokens]
        partial.done += len(chunk)
        mask = np.ones((1, partial.done), np.int64)
        past = partial.cache or self._empty_cache(1)
        logits, partial.cache = self._run([job], np.array([chunk], np.int64), mask, past, None)
        if partial.done < len(job.prompt_ids):
            return
        self._partial.pop(0)
        rows = Rows([job], partial.cache, mask)
        self._emit(rows, logits)
        if rows.jobs:
            self._join(job.group(self.decoder), rows)

    def _prefill(self, jobs: list[GenerationJob]) -> None:
        by_group: dict[tuple, list[GenerationJob]] = {}
        for job in jobs:
            by_group.setdefault(job.group(self.decoder), []).append(job)
        for key, members in by_group.items():
            length = max(len(job.prompt_ids) for job in members)
            ids = np.full((len(members), length), self._pad_id, np.int64)
            mask = np.zeros((len(members), length), np.int64)
            for row, job in enumerate(members):
                ids[row, length - len(job.prompt_ids) :] = job.prompt_ids
                mask[row, length - len(job.prompt_ids) :] = 1
            logits, present = self._run(members, ids, mask, self._empty_cache(len(members)), None)
            rows = Rows(members, present, mask)
            self._emit(rows, logits)
            if rows.jobs:
                self._join(key, rows)

    def _empty_cache(self, rows: int) -> list[np.ndarray]:
        """The past of sequences that have none yet: every layer's key and value, length 0."""
        decoder = self.decoder
        empty = np.zeros((rows, decoder.kv_heads, 0, decoder.head_dim), decoder.kv_dtype)
        return [empty] * (2 * decoder.layers)

    def _join(self, key: tuple, rows: Rows) -> None:
        if key in self._groups:
            self._groups[key].merge(rows)
        else:
            self._groups[key] = rows

    def _step(self, key: tuple) -> None:
        rows = self._groups[key]
        now = time.monotonic()
        errors = {i: error for i, job in enumerate(rows.jobs) if (error := _gone(job, now, "while it ran"))}
        if errors:
            for i, error in errors.items():
                self._end(rows.jobs[i], error=error)
            rows.keep([i for i in range(len(rows.jobs)) if i not in errors])
        if not rows.jobs:
            self._drop_group(key)
            return
        last = np.array([[job.generated[-1]] for job in rows.jobs], np.int64)
        mask = np.concatenate([rows.mask, np.ones((len(rows.jobs), 1), np.int64)], axis=1)
        started = time.perf_counter()
        logits, present = self._run(rows.jobs, last, mask, rows.cache, rows)
        self._observer.step(len(rows.jobs), time.perf_counter() - started)
        rows.cache, rows.mask = present, mask
        self._emit(rows, logits)
        if not rows.jobs:
            self._drop_group(key)

    def _drop_group(self, key: tuple) -> None:
        rows = self._groups.pop(key)
        if rows.buffers is not None:
            rows.buffers.close()

    def _run(
        self,
        jobs: Sequence[GenerationJob],
        ids: np.ndarray,
        mask: np.ndarray,
        past: list[np.ndarray],
        rows: Rows | None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One run: the last position's logits per row, and the present cache."""
        decoder = self.decoder
        inputs = {"input_ids": ids, "attention_mask": mask}
        if decoder.position_ids:
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            inputs["position_ids"] = np.ascontiguousarray(positions[:, -ids.shape[1] :])
        names = decoder.cache_names()
        for (past_name, _present), value in zip(names, past, strict=True):
            inputs[past_name] = value
        feeds = dict(jobs[0].feeds)
        if any(job.lora for job in jobs):
            feeds.update(self._lora_feeds(jobs, rows))
        outputs = self.model.run(inputs, [decoder.logits, *(p for _n, p in names)], extra_feeds=feeds or None)
        logits = outputs[decoder.logits][:, -1, :]
        return logits, [outputs[present] for _name, present in names]

    def _lora_feeds(self, jobs: Sequence[GenerationJob], rows: Rows | None) -> dict[str, np.ndarray]:
        """Each row's factors; a running group keeps its feeds while its rows stay the same."""
        if rows is not None and rows.feeds is not None:
            return rows.feeds
        spans = [RowSpan(i, i + 1, job.lora) for i, job in enumerate(jobs) if job.lora]
        if rows is None:
            return build_feeds(self.model.lora_inputs, len(jobs), spans)
        if rows.buffers is None:
            rows.buffers = FeedBuffers(self._feed_pool)
        rows.feeds = build_feeds(self.model.lora_inputs, len(jobs), spans, rows.buffers)
        return rows.feeds

    def _emit(self, rows: Rows, logits: np.ndarray) -> None:
        """Each row's next token, sent; rows that finished leave."""
        now = time.monotonic()
        finished = []
        for index, job in enumerate(rows.jobs):
            token = job.sampler.next_token(logits[index])
            job.generated.append(token)
            if not job.first_token_at:
                job.first_token_at = now
                self._observer.token(True, now - job.enqueued_at)
            else:
                self._observer.token(False, now - job.last_token_at)
            job.last_token_at = now
            reason = ""
            if token in job.eos_ids:
                reason, text = "eos", job.text.finish()
            elif token in job.stop_ids:
                reason, text = "stop", job.text.finish()
            else:
                text, stopped = job.text.push(token)
                if stopped:
                    reason = "stop"
                elif len(job.generated) >= job.max_new_tokens:
                    reason = "length"
                    text += job.text.finish()
            if reason:
                finished.append(index)
                self._end(job, chunk=self._last_chunk(job, token, text, reason))
            else:
                job.events.put(Chunk((token,), text))
        if finished:
            rows.keep([i for i in range(len(rows.jobs)) if i not in finished])

    def _last_chunk(self, job: GenerationJob, token: int, text: str, reason: str) -> Chunk:
        return Chunk(
            (token,),
            text,
            reason,
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=len(job.generated),
            queue_seconds=(job.admitted_at or job.enqueued_at) - job.enqueued_at,
            first_token_seconds=job.first_token_at - job.enqueued_at,
        )

    def _end(self, job: GenerationJob, chunk: Chunk | None = None, error: Exception | None = None) -> None:
        """The generation's last event and the release of what it holds; once only (a failed step
        ends every generation it touched, some of which may have just finished)."""
        if job.ended:
            return
        job.ended = True
        if job.admitted_at:
            self.kv.release(job.kv_bytes)
        job.events.put(chunk if chunk is not None else error)
        job.events.put(None)
        try:
            job.on_done()
        except Exception:
            log.exception("releasing a generation of '%s' failed", self.name)


def _gone(job: GenerationJob, now: float, when: str = "") -> Exception | None:
    """Why ``job`` is to end now (its deadline passed, its caller went away), or None."""
    if job.deadline is not None and now >= job.deadline:
        return DeadlineExceeded(f"the generation's deadline passed {when}")
    if not job.is_active():
        return Cancelled(f"the caller cancelled the generation {when}")
    return None
