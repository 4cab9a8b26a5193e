"""The decode loop on a paged KV cache (engine/paged.py, generation/kv_blocks.py): the loop of
scheduler/decode_loop.py, with each sequence's KV in blocks it holds instead of a padded tensor.

- Admission takes the blocks a generation's context needs now (not its ``max_new_tokens``);
  a sequence takes one more block each time its length crosses a block.
- Prompts (and long prompts' chunks, up to ``max_prefill_tokens`` an iteration) are prefilled
  in runs of similar lengths; every decoding row then shares one step whatever its length, each
  attending over its own positions (adapters that need a run of their own step alone).
- When a row needs a block and none is free (after the prefix cache gave back what it could),
  the newest sequence is preempted: its blocks are freed and it waits again, first of its key,
  to recompute its prompt and the tokens it generated, then goes on from where it was (greedy
  and seeded sampling give the same tokens).
- A cached prefix is copied into the sequence's first blocks; a prompt prefilled the first time
  gives its full blocks to the prefix cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from ortmux.worker.engine.lora.feeds import FeedBuffers, FeedPool, RowSpan, build_feeds
from ortmux.worker.engine.paged import BLOCK_TOKENS
from ortmux.worker.engine.paged_model import PagedModel
from ortmux.worker.generation.job import GenerationJob
from ortmux.worker.generation.kv_blocks import BlockPool, blocks_for
from ortmux.worker.scheduler.decode_loop import DecodeLoop, GenerationObserver
from ortmux.worker.scheduler.decode_output import next_chunks
from ortmux.worker.scheduler.decode_scheduler import gone, pad_batches

log = logging.getLogger(__name__)


class PagedDecodeLoop(DecodeLoop):
    def __init__(
        self,
        model,
        decoder,
        paged: PagedModel,
        kv,
        limits,
        feed_pool: FeedPool,
        observer: GenerationObserver,
        pad_id: int = 0,
        prefix=None,
    ) -> None:
        self.paged = paged
        self.blocks = BlockPool(decoder, kv)
        self.filling: list[GenerationJob] = []  # admitted; their context is being prefilled
        self.decoding: list[GenerationJob] = []  # have their next token; step together
        self._buffers = FeedBuffers(feed_pool)
        self._feeds_of: list[GenerationJob] = []  # the rows the kept LoRA feeds were built for
        self._feeds: dict[str, np.ndarray] = {}
        self.preemptions = 0
        super().__init__(model, decoder, kv, limits, feed_pool, observer, pad_id, prefix)

    def _scheduler_hooks(self) -> dict:
        return {"reserve": self._admit_blocks, "running": self._rows, "make_room": lambda nbytes: 0}

    @property
    def executes(self) -> PagedModel:
        return self.paged

    def _rows(self) -> int:
        return len(self.filling) + len(self.decoding)

    # -- blocks -----------------------------------------------------------------------------------

    def _take(self, count: int) -> list[int] | None:
        """``count`` blocks, the prefix cache giving back room if it must."""
        ids = self.blocks.allocate(count)
        if ids is None and self.prefix is not None and self.prefix.evict(count * self.blocks.block_bytes):
            ids = self.blocks.allocate(count)
        return ids

    def _admit_blocks(self, job: GenerationJob) -> bool:
        """Blocks for the context and the first position after it (so that a sequence alone,
        which the data plane checked fits, never preempts itself)."""
        ids = self._take(blocks_for(len(job.context_ids()) + 1))
        if ids is None:
            return False
        job.blocks, job.kv_len = ids, 0
        return True

    def _release(self, job: GenerationJob) -> None:
        self.blocks.free(job.blocks)
        job.blocks = []

    def _preempt(self, job: GenerationJob) -> None:
        """``job`` gives its blocks back and waits to recompute its context."""
        for rows in (self.filling, self.decoding):
            if job in rows:
                rows.remove(job)
        self._release(job)
        job.kv_len = 0
        job.preemptions += 1
        self.preemptions += 1
        self._observer.preempted()
        self.scheduler.requeue(job)

    def _grow(self, jobs: Sequence[GenerationJob]) -> list[GenerationJob]:
        """Each of ``jobs`` with room for one more position (the newest preempted while blocks
        run out); the jobs that step."""
        for job in sorted(jobs, key=lambda job: job.admitted_at):
            while job.kv_len + 1 > len(job.blocks) * BLOCK_TOKENS and job in self.decoding:
                ids = self._take(1)
                if ids is not None:
                    job.blocks += ids
                    continue
                newest = max([*self.filling, *self.decoding], key=lambda other: other.admitted_at)
                self._preempt(newest)
        return [job for job in jobs if job in self.decoding]

    # -- an iteration -----------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self.filling or self.decoding)

    def _clear(self) -> list[GenerationJob]:
        jobs = [*self.filling, *self.decoding]
        self.filling.clear()
        self.decoding.clear()
        return jobs

    def _iterate(self, admitted: list[GenerationJob]) -> None:
        for job in admitted:
            self._start(job)
        self._fill()
        self._step_rows()

    def _start(self, job: GenerationJob) -> None:
        """An admitted generation starts filling, after a cached prefix if there is one."""
        if self.prefix is not None and job.prefix_keys is not None and not job.generated:
            hit = self.prefix.lookup(job.prefix_keys, len(job.prompt_ids))
            self._observer.prefix(hit.tokens if hit else 0, len(job.prompt_ids))
            if hit is not None:
                count = hit.tokens // BLOCK_TOKENS
                self.blocks.write(job.blocks[:count], [part[0] for part in hit.cache])
                job.kv_len = hit.tokens
        self.filling.append(job)

    def _fill(self) -> None:
        """This iteration's prefill chunks (oldest first, ``max_prefill_tokens`` together), run
        in batches of similar lengths; a context all in has its next token sampled."""
        now = time.monotonic()
        for job in list(self.filling):
            error = gone(job, now, "while its prompt was read")
            if error is not None:
                self.filling.remove(job)
                self._end(job, error=error)
        planned, budget = [], self.limits.max_prefill_tokens
        for job in self.filling:
            if budget <= 0:
                break
            chunk = job.context_ids()[job.kv_len : job.kv_len + budget]
            budget -= len(chunk)
            planned.append((job, chunk))
        alone = [[item] for item in planned if item[0].group(self.decoder)[0] == "own"]
        shared = [item for item in planned if item[0].group(self.decoder)[0] != "own"]
        for batch in [*alone, *pad_batches(shared, lambda item: len(item[1]))]:
            jobs = [job for job, _chunk in batch]
            logits = self._run(jobs, [chunk for _job, chunk in batch])
            for row, (job, chunk) in enumerate(batch):
                if job.ended or row not in logits:
                    continue
                job.kv_len += len(chunk)
                if job.kv_len < len(job.context_ids()):
                    continue
                self.filling.remove(job)
                if not job.generated:
                    self._give_prefix(job)
                self._emit_rows([job], logits[row][np.newaxis])

    def _give_prefix(self, job: GenerationJob) -> None:
        if self.prefix is not None and job.prefix_keys is not None:
            full = len(job.prompt_ids) // BLOCK_TOKENS
            if full:
                self.prefix.insert(job.prefix_keys[:full], self.blocks.read(job.blocks[:full]))

    def _step_rows(self) -> None:
        now = time.monotonic()
        for job in list(self.decoding):
            error = gone(job, now, "while it ran")
            if error is not None:
                self.decoding.remove(job)
                self._end(job, error=error)
        jobs = self._grow(list(self.decoding))
        alone = [[job] for job in jobs if job.group(self.decoder)[0] == "own"]
        shared = [job for job in jobs if job.group(self.decoder)[0] != "own"]
        for batch in [*alone, *([shared] if shared else [])]:
            started = time.perf_counter()
            logits = self._run(batch, [[job.generated[-1]] for job in batch], keep_feeds=batch is shared)
            self._observer.step(len(batch), time.perf_counter() - started)
            kept = [row for row in range(len(batch)) if row in logits]
            for row in kept:
                batch[row].kv_len += 1
            if kept:
                self._emit_rows([batch[row] for row in kept], np.stack([logits[row] for row in kept]))

    def _emit_rows(self, jobs: list[GenerationJob], logits: np.ndarray) -> None:
        """Each row's next token, sent; rows that finished end, the others decode on."""
        for job, chunk in zip(jobs, next_chunks(jobs, logits, self._observer), strict=True):
            if chunk.finish_reason:
                if job in self.decoding:
                    self.decoding.remove(job)
                self._end(job, chunk=chunk)
            else:
                job.events.put(chunk)
                if job not in self.decoding:
                    self.decoding.append(job)

    # -- runs -------------------------------------------------------------------------------------

    def _run(
        self, jobs: list[GenerationJob], chunks: list[list[int]], keep_feeds: bool = False
    ) -> dict[int, np.ndarray]:
        """One run of ``chunks`` (each row's next tokens after its ``kv_len``); each row's logits
        by row. A failed run is retried a row at a time, so only the rows it can be blamed on
        end (their KV blocks hold nothing the others read)."""
        try:
            return dict(enumerate(self._run_once(jobs, chunks, keep_feeds)))
        except Exception as exc:
            if len(jobs) == 1:
                log.error("a run of model '%s' failed for one generation: %s", self.name, exc, exc_info=exc)
                for rows in (self.filling, self.decoding):
                    if jobs[0] in rows:
                        rows.remove(jobs[0])
                self._end(jobs[0], error=self._failure(exc))
                return {}
            log.warning(
                "a run of %d rows of '%s' failed (%s); retrying each alone", len(jobs), self.name, exc
            )
        self._feeds_of = []
        results = {}
        for row, (job, chunk) in enumerate(zip(jobs, chunks, strict=True)):
            got = self._run([job], [chunk])
            if 0 in got:
                results[row] = got[0]
        return results

    def _run_once(self, jobs: list[GenerationJob], chunks: list[list[int]], keep_feeds: bool) -> np.ndarray:
        rows, width = len(jobs), max(len(chunk) for chunk in chunks)
        ids = np.full((rows, width), self._pad_id, np.int64)
        positions = np.zeros((rows, width), np.int64)
        lens = np.zeros((rows, 2), np.int64)
        tables = np.zeros((rows, max(len(job.blocks) for job in jobs)), np.int64)
        for row, (job, chunk) in enumerate(zip(jobs, chunks, strict=True)):
            ids[row, : len(chunk)] = chunk
            positions[row, : len(chunk)] = np.arange(job.kv_len, job.kv_len + len(chunk))
            lens[row] = (job.kv_len, len(chunk))
            tables[row, : len(job.blocks)] = job.blocks
        extra = dict(jobs[0].feeds)
        if any(job.lora for job in jobs):
            extra.update(self._lora_feeds(jobs, keep_feeds))
        inputs = self.paged.inputs(ids, positions, self.blocks.addresses, tables, lens)
        return self.paged.run(inputs, extra or None)

    def _lora_feeds(self, jobs: list[GenerationJob], keep: bool) -> dict[str, np.ndarray]:
        """Each row's factors; the decoding rows keep theirs while they stay the same rows."""
        spans = [RowSpan(i, i + 1, job.lora) for i, job in enumerate(jobs) if job.lora]
        if not keep:
            return build_feeds(self.model.lora_inputs, len(jobs), spans)
        same = len(jobs) == len(self._feeds_of) and all(
            a is b for a, b in zip(jobs, self._feeds_of, strict=True)
        )
        if not same:  # (the jobs themselves are held: an id is reused once its job is gone)
            self._feeds = build_feeds(self.model.lora_inputs, len(jobs), spans, self._buffers)
            self._feeds_of = list(jobs)
        return self._feeds

    def close(self, timeout: float = 30.0) -> None:
        super().close(timeout)
        self._buffers.close()
        self.paged.close()
