"""The scheduler of generation: which generations wait and which run, what an iteration of the
decode loop prefills and steps.

Waiting generations sit in a fair queue (priority within a tenant, round robin across tenants
and adapters, deadlines, cancellation) and are admitted between steps while there are rows,
prefill tokens and KV room for them. Admitted prompts up to ``max_prefill_tokens`` are prefilled
together, grouped by what may share a run; a longer one is prefilled a chunk per iteration (the
oldest first), so it never stalls the running rows for long. Running rows sit in groups: rows of
one group share decode steps, left-padded to the group's longest, and a row that would make a
group's cache more than ``MAX_PADDING`` padding steps in a group of its own (a long prompt among
short ones costs the short rows one more run per step, not their every row padded to its length).

Not thread-safe: the decode loop calls it under its lock.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.errors import Cancelled, DeadlineExceeded, ResourceExhausted
from ortmux.worker.generation.job import GenerationJob
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.scheduler.decode_rows import Partial, Rows
from ortmux.worker.scheduler.fair_queue import FairQueue

T = TypeVar("T")

MAX_PADDING = 0.5  # the share of a group's (or a prefill batch's) cache that may be padding


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    max_running: int = 32  # rows of a decode step (all groups together)
    max_prefill_tokens: int = 2048  # prompt tokens prefilled between two steps
    max_waiting: int = 1024


class DecodeScheduler:
    def __init__(
        self,
        name: str,
        decoder: DecoderSpec,
        kv: KvPool,
        limits: DecodeLimits,
        make_room: Callable[[int], int] = lambda nbytes: 0,
        cached: Callable[[GenerationJob], int] = lambda job: 0,
        reserve: Callable[[GenerationJob], bool] | None = None,
        running: Callable[[], int] | None = None,
    ) -> None:
        self.name = name
        self.decoder = decoder
        self.kv = kv
        self.limits = limits
        self._make_room = make_room  # frees KV pool bytes held by cached prefixes; what it freed
        self._cached = cached  # prompt tokens of a job the prefix cache holds (not to prefill)
        # Takes a job's KV room at admission (default: its whole reservation from the KV pool)
        self._reserve = reserve or (lambda job: self.kv.reserve(job.kv_bytes))
        self._running = running  # how many rows run, where the caller keeps them (paged loop)
        self.groups: dict[tuple, Rows] = {}
        self.partial: list[Partial] = []  # long prompts being prefilled a chunk per iteration
        self._waiting: FairQueue[GenerationJob] = FairQueue()
        self._serial = itertools.count()

    @property
    def running(self) -> int:
        if self._running is not None:
            return self._running()
        return sum(len(rows.jobs) for rows in list(self.groups.values())) + len(self.partial)

    @property
    def waiting(self) -> int:
        return self._waiting.size

    @property
    def busy(self) -> bool:
        """Something runs (a group's steps or a long prompt's prefill)."""
        return bool(self.groups or self.partial)

    def submit(self, job: GenerationJob) -> None:
        if self._waiting.size >= self.limits.max_waiting:
            raise ResourceExhausted(
                f"{self._waiting.size} generations wait for model '{self.name}' already; retry shortly",
                retry_after=1.0,
            )
        self._waiting.push(job)

    def expired(self) -> list[tuple[GenerationJob, Exception]]:
        """Waiting generations to end now (deadline passed, caller gone), out of the queue."""
        now = time.monotonic()
        return [
            (job, gone(job, now, "while it waited"))  # type: ignore[misc]
            for job in self._waiting.remove(lambda job: gone(job, now) is not None)
        ]

    def admit(self) -> list[GenerationJob]:
        """Waiting generations that fit now (rows, prefill tokens, KV room), in fair order; their
        KV room is reserved."""
        admitted: list[GenerationJob] = []
        room = self.limits.max_running - self.running
        budget = self.limits.max_prefill_tokens

        def cost(job: GenerationJob) -> int:  # the tokens to prefill now; long prompts: a chunk
            return min(len(job.prompt_ids) - self._cached(job), self.limits.max_prefill_tokens)

        def fits(job: GenerationJob) -> bool:
            return len(admitted) < room and (not admitted or cost(job) <= budget)

        while True:
            job = self._waiting.pop(fits)
            if job is None:
                break
            if not self._reserve(job) and not (self._make_room(job.kv_bytes) and self._reserve(job)):
                self._waiting.push(job, front=True)  # waits for KV room, first of its key
                break
            job.admitted_at = time.monotonic()
            admitted.append(job)
            budget -= cost(job)
        return admitted

    def prefills(self, admitted: list[GenerationJob]) -> list[tuple[tuple, list[GenerationJob]]]:
        """The admitted prompts to prefill now, by what may share a run and then by length (a
        batch pads its prompts to its longest, at most ``MAX_PADDING`` of it); longer ones join
        the chunked prefills."""
        by_kind: dict[tuple, list[GenerationJob]] = {}
        for job in admitted:
            if len(job.prompt_ids) > self.limits.max_prefill_tokens:
                self.partial.append(Partial(job))
            else:
                by_kind.setdefault(job.group(self.decoder), []).append(job)
        return [
            (kind, batch)
            for kind, jobs in by_kind.items()
            for batch in pad_batches(jobs, lambda job: len(job.prompt_ids))
        ]

    def requeue(self, job: GenerationJob) -> None:
        """A preempted generation waits again, first of its key."""
        self._waiting.push(job, front=True)

    def resume(self, job: GenerationJob, done: int, cache: list) -> None:
        """An admitted prompt whose first ``done`` tokens' KV is ``cache`` already (a cached
        prefix): the rest is prefilled in chunks."""
        self.partial.append(Partial(job, done, cache))

    def prefill_chunks(self) -> list[tuple[Partial, list[int]]]:
        """This iteration's chunks of the prompts prefilled in chunks, oldest first, within
        ``max_prefill_tokens`` together (counted as read)."""
        planned, budget = [], self.limits.max_prefill_tokens
        for partial in self.partial:
            if budget <= 0:
                break
            chunk = partial.job.prompt_ids[partial.done : partial.done + budget]
            partial.done += len(chunk)
            budget -= len(chunk)
            planned.append((partial, chunk))
        return planned

    def drop_partial(self, partial: Partial) -> None:
        self.partial.remove(partial)

    def join(self, kind: tuple, rows: Rows) -> None:
        """Rows that have their first token join the group of their kind they pad least, if the
        group's cache stays at most ``MAX_PADDING`` padding; else they start a group of their own
        (a long row among short ones steps apart, rather than pad every short row to its length)."""
        if kind[0] == "own":
            self.groups[kind] = rows
            return
        shares = {
            key: padding_share(group, rows) for key, group in self.groups.items() if key[: len(kind)] == kind
        }
        best = min(shares, key=shares.__getitem__, default=None)
        if best is not None and shares[best] <= MAX_PADDING:
            self.groups[best].merge(rows)
        else:
            self.groups[(*kind, next(self._serial))] = rows

    def replace(self, key: tuple, rows: Rows) -> Rows:
        """``rows`` (the survivors of a failed step) run in place of the group's rows."""
        self.drop(key)
        self.groups[key] = rows
        return rows

    def drop(self, key: tuple) -> None:
        rows = self.groups.pop(key)
        if rows.buffers is not None:
            rows.buffers.close()

    def clear(self) -> list[GenerationJob]:
        """Every running generation, out of the running set."""
        jobs = [job for rows in self.groups.values() for job in rows.jobs]
        jobs += [partial.job for partial in self.partial]
        for key in list(self.groups):
            self.drop(key)
        self.partial.clear()
        return jobs


def pad_batches(items: Sequence[T], length: Callable[[T], int]) -> list[list[T]]:
    """``items`` in batches padded to their longest, at most ``MAX_PADDING`` of each batch
    padding (longest first; items of one length keep their order)."""
    batches: list[list[T]] = []
    batch: list[T] = []
    for item in sorted(items, key=lambda item: -length(item)):  # stable
        lengths = [length(each) for each in (*batch, item)]
        if batch and 1 - sum(lengths) / (len(lengths) * lengths[0]) > MAX_PADDING:
            batches.append(batch)
            batch = []
        batch.append(item)
    if batch:
        batches.append(batch)
    return batches


def gone(job: GenerationJob, now: float, when: str = "") -> Exception | None:
    """Why ``job`` is to end now (its deadline passed, its caller went away), or None."""
    if job.deadline is not None and now >= job.deadline:
        return DeadlineExceeded(f"the generation's deadline passed {when}")
    if not job.is_active():
        return Cancelled(f"the caller cancelled the generation {when}")
    return None


def padding_share(group: Rows, rows: Rows) -> float:
    """The share of padding in the cache of ``group`` and ``rows`` merged (left-padded to the
    longer)."""
    width = max(group.mask.shape[1], rows.mask.shape[1])
    tokens = int(group.mask.sum()) + int(rows.mask.sum())
    return 1 - tokens / (width * (len(group.jobs) + len(rows.jobs)))
