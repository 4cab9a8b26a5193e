"""What a step's logits make of its rows: each row's next token (the batched sampler), its new
text (the row's incremental detokenizer) and whether it is finished (eos, a stop token or string,
its length), as the chunk its caller is sent."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ortmux.worker.generation.job import Chunk, GenerationJob
from ortmux.worker.generation.sampling import sample


class TokenObserver(Protocol):
    def token(self, first: bool, seconds: float) -> None: ...


def next_chunks(jobs: Sequence[GenerationJob], logits: np.ndarray, observer: TokenObserver) -> list[Chunk]:
    """Each row's chunk for this step (a finished row's says why it finished), in row order.
    Appends each row's token to its job and times it."""
    now = time.monotonic()
    tokens = sample(logits, [job.sampler for job in jobs])
    chunks = []
    for job, token in zip(jobs, tokens, strict=True):
        job.generated.append(token)
        if not job.first_token_at:
            job.first_token_at = now
            observer.token(True, now - job.enqueued_at)
        else:
            observer.token(False, now - job.last_token_at)
        job.last_token_at = now
        chunks.append(_chunk(job, token))
    return chunks


def _chunk(job: GenerationJob, token: int) -> Chunk:
    if token in job.eos_ids:
        return _last(job, token, job.text.finish(), "eos")
    if token in job.stop_ids:
        return _last(job, token, job.text.finish(), "stop")
    text, stopped = job.text.push(token)
    if stopped:
        return _last(job, token, text, "stop")
    if len(job.generated) >= job.max_new_tokens:
        return _last(job, token, text + job.text.finish(), "length")
    return Chunk((token,), text)


def _last(job: GenerationJob, token: int, text: str, reason: str) -> Chunk:
    return Chunk(
        (token,),
        text,
        reason,
        prompt_tokens=len(job.prompt_ids),
        completion_tokens=len(job.generated),
        queue_seconds=(job.admitted_at or job.enqueued_at) - job.enqueued_at,
        first_token_seconds=job.first_token_at - job.enqueued_at,
    )
