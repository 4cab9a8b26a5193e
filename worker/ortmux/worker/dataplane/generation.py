"""The generation path, free of any protocol: a generation request checked (model, prompt,
sampling, context, KV room), admitted (memory, quotas), given its adapter for its whole life,
handed to its model's decode loop, and answered as a stream of chunks that closing cancels."""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack

import numpy as np

from ortmux.worker.adapters.local_store import DEFAULT_TENANT
from ortmux.worker.adapters.manager import AdapterManager
from ortmux.worker.dataplane.models import ModelManagement
from ortmux.worker.dataplane.requests import fairness_key
from ortmux.worker.engine.base_model import BaseModel
from ortmux.worker.engine.decoder import DecoderSpec
from ortmux.worker.engine.lora.feeds import FeedPool
from ortmux.worker.engine.memory import MemoryGuard
from ortmux.worker.engine.paged import BLOCK_TOKENS, PAGED_OP
from ortmux.worker.engine.paged_model import PagedModel, paged_or_reason
from ortmux.worker.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from ortmux.worker.generation.chat import ChatTemplate
from ortmux.worker.generation.job import Chunk, GenerationJob
from ortmux.worker.generation.kv import KvPool
from ortmux.worker.generation.kv_blocks import blocks_for
from ortmux.worker.generation.model_files import GenerationConfig, TextTokenizer, read_generation_config
from ortmux.worker.generation.prefix_cache import PrefixCache, block_keys, scope_of
from ortmux.worker.generation.sampling import Sampler, SamplingParams
from ortmux.worker.generation.text import TextStream
from ortmux.worker.observability.metrics import Metrics
from ortmux.worker.quotas import RequestQuotas, TokenQuota
from ortmux.worker.request_bounds import MAX_STOP, MAX_STOP_CHARS, check_length
from ortmux.worker.scheduler.decode_loop import DecodeLoop
from ortmux.worker.scheduler.decode_scheduler import DecodeLimits
from ortmux.worker.scheduler.paged_loop import PagedDecodeLoop

MAX_NEW_TOKENS = 1 << 16


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str | None = None
    input_ids: Sequence[int] | None = None
    messages: Sequence[Mapping[str, object]] | None = None  # a chat, rendered with the model's template
    adapter: str = ""
    max_new_tokens: int = 16
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    priority: int = 0
    request_id: str = ""
    tenant: str = ""
    deadline: float | None = None  # time.monotonic()
    is_active: Callable[[], bool] = lambda: True


@dataclasses.dataclass(frozen=True)
class ModelGeneration:
    """What a model can do for generation, as GetModel tells it."""

    decoder: DecoderSpec | None
    problem: str  # why it cannot generate ("" when it can)
    config: GenerationConfig
    tokenizer: TextTokenizer | None
    chat: ChatTemplate | None = None
    paged: PagedModel | None = None  # its paged KV cache's sessions, or None: the dense cache
    kv_cache_reason: str = ""  # why it takes the path it takes

    @property
    def kv_cache(self) -> str:
        return "" if self.decoder is None else "paged" if self.paged is not None else "dense"

    @property
    def context_length(self) -> int:
        return self.config.context_length


class GenerationStream:
    """The chunks of one generation, as they come; ``close()`` cancels it (the decode loop frees
    its sequence within a step)."""

    def __init__(self, job: GenerationJob, cancelled: threading.Event) -> None:
        self._job = job
        self._cancelled = cancelled

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            item = self._job.events.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        """The same chunks, awaited on the running event loop: no thread waits for them."""
        while True:
            item = await self._job.events.aget()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self._cancelled.set()


class GenerationPath:
    def __init__(
        self,
        models: ModelManagement,
        adapters: AdapterManager,
        metrics: Metrics,
        kv: KvPool,
        limits: DecodeLimits | None = None,
        quotas: RequestQuotas | None = None,
        feed_pool: FeedPool | None = None,
        memory: MemoryGuard | None = None,
        tokens: TokenQuota | None = None,
        max_seconds: float = 0.0,
        prefix_cache: bool = True,
        prefix_cache_shared_base: bool = False,
        paged_kv_cache: bool = True,
    ) -> None:
        self.models = models
        self.adapters = adapters
        self.metrics = metrics
        self.kv = kv
        self.limits = limits or DecodeLimits()
        self.quotas = quotas or RequestQuotas()
        self.feed_pool = feed_pool or FeedPool(1 << 30)
        self.memory = memory or MemoryGuard(0)
        self.tokens = tokens or TokenQuota()
        self.max_seconds = max_seconds  # the worker's own bound on one generation (0: none)
        self.prefix_cache = prefix_cache
        self.prefix_cache_shared_base = prefix_cache_shared_base
        self.paged_kv_cache = paged_kv_cache
        self._loops: dict[str, DecodeLoop] = {}
        # per model object: what its files say, read once (a model loaded again is read again)
        self._files: weakref.WeakKeyDictionary[BaseModel, ModelGeneration] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.draining = False

    def describe(self, model: BaseModel) -> ModelGeneration:
        """Whether ``model`` generates, its context length and tokenizer (read once per model)."""
        with self._lock:
            known = self._files.get(model)
        if known is None:
            decoder = model.decoder
            config = read_generation_config(model.path)
            if not config.context_length and model.limits.sequence:
                config = dataclasses.replace(config, context_length=model.limits.sequence)
            paged, reason = self._kv_path(model, decoder, config)
            known = ModelGeneration(
                decoder if isinstance(decoder, DecoderSpec) else None,
                decoder if isinstance(decoder, str) else "",
                config,
                TextTokenizer.beside(model.path),
                ChatTemplate.beside(model.path),
                paged,
                reason,
            )
            with self._lock:
                self._files[model] = known
        return known

    def _kv_path(
        self, model: BaseModel, decoder: DecoderSpec | str, config: GenerationConfig
    ) -> tuple[PagedModel | None, str]:
        """The paged sessions of a decoder and why, or None and why it keeps the dense cache."""
        if not isinstance(decoder, DecoderSpec):
            return None, ""
        if not self.paged_kv_cache:
            return None, "the paged_kv_cache setting is off"
        if config.window_problem:
            return None, config.window_problem
        found = paged_or_reason(model, decoder, config.sliding_window)
        if isinstance(found, str):
            return None, found
        window = f", sliding window {config.sliding_window}" if config.sliding_window else ""
        return found, f"attention rewritten to {PAGED_OP}{window}"

    def loops(self) -> list[DecodeLoop]:
        with self._lock:
            return list(self._loops.values())

    def close_model(self, name: str) -> None:
        with self._lock:
            loop = self._loops.pop(name, None)
        if loop is not None:
            loop.close()

    def close(self) -> None:
        for loop in self.loops():
            loop.close()

    def generate(self, request: GenerationRequest) -> GenerationStream:
        for field in ("model", "adapter", "request_id"):
            check_length(getattr(request, field), field)
        model = self.models.get(request.model)
        info = self.describe(model)
        if info.decoder is None:
            raise FailedPrecondition(f"model '{model.name}' cannot generate: {info.problem}", field="model")
        prompt = self._prompt_ids(model, info, request)
        self._check(request, info, len(prompt))
        positions = len(prompt) + request.max_new_tokens
        if info.paged is not None:  # held in whole blocks
            positions = blocks_for(positions) * BLOCK_TOKENS
        kv_bytes = positions * info.decoder.kv_bytes_per_token
        if kv_bytes > self.kv.limit_bytes:
            raise ResourceExhausted(
                f"the generation needs {kv_bytes} bytes of KV cache ({len(prompt)} prompt + "
                f"{request.max_new_tokens} new tokens), over the worker's {self.kv.limit_bytes} "
                "(kv_cache_bytes); ask for fewer tokens",
                field="max_new_tokens",
                retry_after=1.0,
            )
        if self.draining:
            raise Unavailable("the worker is shutting down; send the generation elsewhere", retry_after=1.0)
        tenant = request.tenant or DEFAULT_TENANT
        self.memory.admit()
        job: GenerationJob | None = None

        def unused() -> int:
            return request.max_new_tokens - (len(job.generated) if job is not None else 0)

        held = ExitStack()  # what the generation holds until it ends, given back in reverse
        try:
            self.tokens.take(tenant, request.max_new_tokens)
            held.callback(lambda: self.tokens.give_back(tenant, unused()))  # what it did not generate
            self.quotas.admit(tenant)
            held.callback(self.quotas.release, tenant)
            adapter = (
                held.enter_context(self.adapters.use(model.name, request.adapter, tenant))
                if request.adapter
                else None
            )
            cancelled = threading.Event()
            active = request.is_active
            job = GenerationJob(
                prompt_ids=prompt,
                max_new_tokens=request.max_new_tokens,
                sampler=Sampler(request.sampling),
                text=TextStream(info.tokenizer, request.stop),
                stop_ids=frozenset(request.stop_ids),
                eos_ids=frozenset(info.config.eos_ids),
                kv_bytes=kv_bytes,
                lora=adapter.lora if adapter else {},
                feeds=adapter.feeds if adapter else {},
                exclusive=bool(adapter and adapter.exclusive),
                prefix_keys=self._prefix_keys(adapter.sha256 if adapter else "", tenant, prompt),
                fairness_key=fairness_key(tenant, request.adapter),
                priority=request.priority,
                deadline=self._deadline(request.deadline),
                is_active=lambda: not cancelled.is_set() and active(),
                on_done=held.close,
            )
            self._loop(model, info).submit(job)
        except BaseException:
            held.close()
            raise
        return GenerationStream(job, cancelled)

    def _deadline(self, asked: float | None) -> float | None:
        """The caller's deadline, or the worker's own (``max_generation_seconds``) if sooner."""
        if not self.max_seconds:
            return asked
        own = time.monotonic() + self.max_seconds
        return own if asked is None else min(asked, own)

    def _prefix_keys(self, adapter_sha256: str, tenant: str, prompt: list[int]) -> tuple[bytes, ...] | None:
        """The keys of the prompt's blocks in the prefix cache (hashed here, not on the decode
        loop's thread), or None when the cache is off."""
        if not self.prefix_cache:
            return None
        return block_keys(scope_of(adapter_sha256, tenant, self.prefix_cache_shared_base), prompt)

    def _loop(self, model: BaseModel, info: ModelGeneration) -> DecodeLoop:
        assert info.decoder is not None
        with self._lock:
            loop = self._loops.get(model.name)
            if loop is None:
                pad = info.config.pad_id if info.config.pad_id is not None else 0
                observer = self.metrics.generation_observer(model.name)
                prefix = PrefixCache(self.kv) if self.prefix_cache else None
                if info.paged is not None:
                    loop = PagedDecodeLoop(
                        model,
                        info.decoder,
                        info.paged,
                        self.kv,
                        self.limits,
                        self.feed_pool,
                        observer,
                        pad,
                        prefix,
                    )
                else:
                    loop = DecodeLoop(
                        model, info.decoder, self.kv, self.limits, self.feed_pool, observer, pad, prefix
                    )
                self._loops[model.name] = loop
            return loop

    @staticmethod
    def _prompt_ids(model: BaseModel, info: ModelGeneration, request: GenerationRequest) -> list[int]:
        given = [kind is not None for kind in (request.prompt, request.input_ids, request.messages)]
        if sum(given) != 1:
            raise InvalidArgument("give exactly one of prompt (text) or input_ids", field="prompt")
        if request.input_ids is None and info.tokenizer is None:
            raise FailedPrecondition(
                f"model '{model.name}' has no tokenizer.json beside it: send input_ids, not text",
                field="prompt",
            )
        if request.messages is not None:
            if info.chat is None:
                raise FailedPrecondition(
                    f"model '{model.name}' has no chat template (chat_template.jinja or "
                    "tokenizer_config.json beside it): send a completion prompt instead",
                    field="messages",
                )
            assert info.tokenizer is not None
            ids = info.tokenizer.encode(info.chat.render(request.messages), add_special_tokens=False)
        elif request.prompt is not None:
            assert info.tokenizer is not None
            ids = info.tokenizer.encode(request.prompt)
        else:
            ids = [int(i) for i in request.input_ids or ()]
        if not ids or request.prompt == "":
            raise InvalidArgument("the prompt is empty", field="prompt")
        for vocab in (r for r in model.limits.id_ranges if r.input == "input_ids"):
            vocab.check(model.name, np.array(ids), label="input_ids", field="input_ids")
        if min(ids) < 0:  # a model whose ids index no table the worker found
            raise InvalidArgument(f"input_ids holds {min(ids)}; token ids are 0 or more", field="input_ids")
        return ids

    @staticmethod
    def _check(request: GenerationRequest, info: ModelGeneration, prompt_tokens: int) -> None:
        if not 1 <= request.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidArgument(
                f"max_new_tokens must be 1 to {MAX_NEW_TOKENS}, got {request.max_new_tokens}",
                field="max_new_tokens",
            )
        request.sampling.check()
        if len(request.stop) > MAX_STOP or len(request.stop_ids) > MAX_STOP:
            raise InvalidArgument(f"at most {MAX_STOP} stop strings and {MAX_STOP} stop ids", field="stop")
        if any(len(stop) > MAX_STOP_CHARS for stop in request.stop):
            raise InvalidArgument(f"a stop string is longer than {MAX_STOP_CHARS} characters", field="stop")
        context = info.context_length
        if context and prompt_tokens + request.max_new_tokens > context:
            raise InvalidArgument(
                f"{prompt_tokens} prompt tokens + max_new_tokens {request.max_new_tokens} exceed the "
                f"model's context of {context} tokens",
                field="max_new_tokens",
            )
