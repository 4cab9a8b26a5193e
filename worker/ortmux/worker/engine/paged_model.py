"""A base model's paged graphs (engine/paged.py) as sessions: written once into the model's
cache entry beside its graphs (atomically; they map the same weight file), checked against the
dense graph on a probe, then run with the KV pool's blocks.

The LoRA graph and the base-only graph are both rewritten, so base rows keep the faster graph as
they do on the dense path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from ortmux.worker.engine import kernels
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.cache import BASE_MODEL_FILE, MODEL_FILE
from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.paged import (
    BLOCK_TOKENS,
    LAST,
    LENS,
    POOLS,
    PROBE_TOLERANCE,
    REWRITE_VERSION,
    TABLES,
    NotPaged,
    PagedGraph,
    max_difference,
    rewrite,
    save_atomic,
)
from ortmux.worker.engine.providers import CUDA

log = logging.getLogger(__name__)

PROBE_LENGTHS = (5, 19, 2)  # rows of different lengths, one crossing a block


class PagedModel:
    """The paged sessions of one decoder; NotPaged (with the reason) when it keeps the dense path."""

    def __init__(self, model: BaseModel, decoder: DecoderSpec, window: int = 0) -> None:
        if model.runtime.providers[0] == CUDA:
            raise NotPaged("the paged attention kernel runs on CPU; CUDA workers keep the dense cache")
        if kernels.library() is None:
            raise NotPaged("the worker's operator library could not be built (see the log)")
        if not decoder.position_ids:
            raise NotPaged("it takes no position_ids (rows of different lengths cannot share a run)")
        if np.dtype(decoder.kv_dtype) != np.float32:
            raise NotPaged(f"its cache is {decoder.kv_dtype}; the paged kernel reads float32")
        self.model = model
        self.decoder = decoder
        directory = model.entry.directory
        tag = f"{REWRITE_VERSION}-w{window}"
        main = self._graph(directory / MODEL_FILE, directory / f"paged-{tag}.onnx", decoder, window)
        self._main = model.new_session(graph=main[0])
        self.last_index = main[1].last_index
        self._plain = self._main
        if (directory / BASE_MODEL_FILE).is_file():
            base = self._graph(
                directory / BASE_MODEL_FILE, directory / f"paged_base-{tag}.onnx", decoder, window
            )
            self._plain = model.new_session(graph=base[0])
        try:
            difference = self._probe()
        except Exception:
            self.close()
            raise
        if difference > PROBE_TOLERANCE:
            self.close()
            raise NotPaged(f"its paged graph differs from the dense one by {difference:.1e} on a probe")
        log.info("model '%s': paged KV cache (probe difference %.1e)", model.name, difference)

    @staticmethod
    def _graph(source: Path, target: Path, decoder: DecoderSpec, window: int) -> tuple[Path, PagedGraph]:
        graph = rewrite(onnx.load(str(source), load_external_data=False), decoder, window)
        if not target.is_file():
            save_atomic(graph.model, target)
        return target, graph

    def run(
        self, inputs: Mapping[str, np.ndarray], extra_feeds: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """One run: ``input_ids`` / ``position_ids`` ``[rows, tokens]`` right-padded, the pool
        addresses (``POOLS``), each row's blocks (``TABLES``) and its past length and real tokens
        (``LENS``). The logits of each row's last real token, ``[rows, vocab]``."""
        real = inputs[LENS][:, 1]
        feeds = dict(inputs)
        if self.last_index:
            feeds[LAST] = (real - 1).reshape(-1, 1).astype(np.int64)
        if extra_feeds:
            feeds.update(extra_feeds)
        session = self._main if extra_feeds else self._plain
        logits = self.model.execute(session, [self.decoder.logits], feeds)[self.decoder.logits]
        if self.last_index:
            return logits[:, -1, :]
        return logits[np.arange(len(real)), real - 1, :]

    @classmethod
    def prefill_inputs(
        cls, prompts: Sequence[Sequence[int]], pools: np.ndarray, tables: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The inputs of a first run of ``prompts`` (no past), right-padded to the longest."""
        ids = np.zeros((len(prompts), max(len(prompt) for prompt in prompts)), np.int64)
        positions = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            positions[row, : len(prompt)] = np.arange(len(prompt))
        lens = np.array([[0, len(prompt)] for prompt in prompts], np.int64)
        return cls.inputs(ids, positions, pools, tables, lens)

    @staticmethod
    def inputs(
        ids: np.ndarray, positions: np.ndarray, pools: np.ndarray, tables: np.ndarray, lens: np.ndarray
    ) -> dict[str, np.ndarray]:
        return {"input_ids": ids, "position_ids": positions, POOLS: pools, TABLES: tables, LENS: lens}

    def close(self) -> None:
        for session in {id(s): s for s in (self._main, self._plain)}.values():
            session.close()

    def _probe(self) -> float:
        """The largest difference from the dense graph's logits (relative), over a prefill of rows
        of different lengths in one run and then one step of each."""
        decoder, model = self.decoder, self.model
        vocab = next(spec.shape[-1] for spec in model.outputs if spec.name == decoder.logits)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, max(1, min(vocab if vocab > 0 else 97, 97)), n) for n in PROBE_LENGTHS]
        longest = max(PROBE_LENGTHS) + 1
        width = (longest + BLOCK_TOKENS - 1) // BLOCK_TOKENS
        blocks = width * len(prompts)
        shape = (decoder.layers, 2, blocks, decoder.kv_heads, BLOCK_TOKENS, decoder.head_dim)
        pool = np.zeros(shape, np.float32)
        pools = np.array(
            [[pool[i, 0].ctypes.data, pool[i, 1].ctypes.data, blocks] for i in range(decoder.layers)]
        )
        tables = np.arange(blocks, dtype=np.int64).reshape(len(prompts), width)
        paged = self.run(self.prefill_inputs(prompts, pools.astype(np.int64), tables))
        worst = 0.0
        nexts = []
        for row, prompt in enumerate(prompts):
            dense, past = self._dense(prompt, None)
            worst = max(worst, max_difference(dense, paged[row]))
            nexts.append((int(np.argmax(dense)), past))
        step_ids = np.array([[token] for token, _past in nexts], np.int64)
        step_positions = np.array([[len(p)] for p in prompts], np.int64)
        step_lens = np.array([[len(p), 1] for p in prompts], np.int64)
        stepped = self.run(self.inputs(step_ids, step_positions, pools.astype(np.int64), tables, step_lens))
        for row, (token, past) in enumerate(nexts):
            dense, _past = self._dense(np.array([token]), past, start=len(prompts[row]))
            worst = max(worst, max_difference(dense, stepped[row]))
        return worst

    def _dense(
        self, ids: np.ndarray, past: Sequence[np.ndarray] | None, start: int = 0
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        decoder = self.decoder
        total = start + len(ids)
        feeds = {
            "input_ids": ids.reshape(1, -1).astype(np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(start, total, dtype=np.int64).reshape(1, -1),
        }
        empty = np.zeros((1, decoder.kv_heads, 0, decoder.head_dim), np.float32)
        names = decoder.cache_names()
        for i, (name, _present) in enumerate(names):
            feeds[name] = past[i] if past is not None else empty
        out = self.model.run(feeds, [decoder.logits, *(present for _name, present in names)])
        return out[decoder.logits][0, -1], [out[present] for _name, present in names]


def paged_or_reason(model: BaseModel, decoder: DecoderSpec, window: int = 0) -> PagedModel | str:
    """The decoder's paged sessions, or why it keeps the dense path (logged once)."""
    try:
        return PagedModel(model, decoder, window)
    except NotPaged as exc:
        reason = str(exc)
    except Exception as exc:  # a rewrite that does not load is the dense path's, not a failure
        reason = f"its paged graph does not load ({exc})"
    log.info("model '%s' keeps the dense KV cache: %s", model.name, reason)
    return reason
