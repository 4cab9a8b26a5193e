"""The model runner of generation: a decode loop's feeds (ids, mask, positions, the past cache,
each row's LoRA factors), one ONNX Runtime run, and its last position's logits and present cache.

A run that fails is retried by halves, so that only the rows it can be blamed on fail: a row is
blamed when it fails in a run of its own. The others get the tokens they would have had (each
row's output depends on its own inputs only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.lora.feeds import FeedBuffers, FeedPool, RowSpan, build_feeds
from ortmux.worker.generation.job import GenerationJob
from ortmux.worker.scheduler.decode_rows import Rows

log = logging.getLogger(__name__)

Cache = list[np.ndarray]  # per (layer, key|value): [rows, kv_heads, length, head_dim]


@dataclasses.dataclass
class RunResult:
    """What a run gave the rows that did not fail (``kept``, in order) and why the others did."""

    kept: list[int]
    logits: np.ndarray  # [len(kept), vocab]: each kept row's last position
    present: Cache  # the kept rows' present cache
    failed: dict[int, Exception] = dataclasses.field(default_factory=dict)


class DecodeRunner:
    def __init__(self, model: BaseModel, decoder: DecoderSpec, feed_pool: FeedPool) -> None:
        self.model = model
        self.decoder = decoder
        self._feed_pool = feed_pool

    def empty_cache(self, rows: int) -> Cache:
        """The past of sequences that have none yet: every layer's key and value, length 0."""
        decoder = self.decoder
        empty = np.zeros((rows, decoder.kv_heads, 0, decoder.head_dim), decoder.kv_dtype)
        return [empty] * (2 * decoder.layers)

    def run(
        self,
        jobs: Sequence[GenerationJob],
        ids: np.ndarray,
        mask: np.ndarray,
        past: Cache,
        rows: Rows | None = None,
    ) -> RunResult:
        """Run ``ids`` (``[rows, tokens]``) after ``past``; ``mask`` covers past and new tokens.
        ``rows``, when given, is the running group whose LoRA feeds are kept between its steps."""
        try:
            logits, present = self._run_once(jobs, ids, mask, past, rows)
            return RunResult(list(range(len(jobs))), logits, present)
        except Exception as exc:
            if len(jobs) == 1:
                return RunResult([], self._no_logits(), [], {0: exc})
            name = self.model.name
            log.warning("a run of %d rows of '%s' failed (%s); retrying by halves", len(jobs), name, exc)
        half = len(jobs) // 2
        parts = [
            (start, self.run(jobs[part], ids[part], mask[part], [layer[part] for layer in past]))
            for start, part in ((0, slice(0, half)), (half, slice(half, len(jobs))))
        ]
        kept = [start + i for start, part in parts for i in part.kept]
        failed = {start + i: exc for start, part in parts for i, exc in part.failed.items()}
        survivors = [part for _start, part in parts if part.kept]
        if not survivors:
            return RunResult([], self._no_logits(), [], failed)
        logits = np.concatenate([part.logits for part in survivors])
        present = [np.concatenate(layer) for layer in zip(*(part.present for part in survivors), strict=True)]
        return RunResult(kept, logits, present, failed)

    def _no_logits(self) -> np.ndarray:
        return np.zeros((0, 0), np.float32)

    def _run_once(
        self,
        jobs: Sequence[GenerationJob],
        ids: np.ndarray,
        mask: np.ndarray,
        past: Cache,
        rows: Rows | None,
    ) -> tuple[np.ndarray, Cache]:
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
