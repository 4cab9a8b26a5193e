"""A base model: cached optimized graph, shared arena, sessions, and validated runs."""

from __future__ import annotations

import fnmatch
import logging
import shutil
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from ortmux.worker.engine.arena import Arena
from ortmux.worker.engine.build import EntryBuilder, quantization
from ortmux.worker.engine.cache import (
    BASE_MODEL_FILE,
    CacheEntry,
    CacheKey,
    ModelCache,
    cpu_signature,
    mark_overridable,
)
from ortmux.worker.engine.decoder import DecoderSpec, find_decoder
from ortmux.worker.engine.kernels import refuse_own_domain
from ortmux.worker.engine.limits import find_limits
from ortmux.worker.engine.lora.feeds import FeedBuffers, RowSpan, build_feeds
from ortmux.worker.engine.lora.graph import (
    REWRITE_VERSION,
    LoraInput,
    has_batch_dimension,
)
from ortmux.worker.engine.lora.targets import LoraSite, Unadaptable
from ortmux.worker.engine.providers import CUDA
from ortmux.worker.engine.quantize import QUANTIZE_VERSION
from ortmux.worker.engine.quantized_ops import quantized_weights
from ortmux.worker.engine.runtime import RuntimeOptions, release_arena
from ortmux.worker.engine.specs import TensorSpec, leading_rows, validate_inputs, validate_output_names
from ortmux.worker.errors import InternalError, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

# ORT statuses that mean "the caller's tensors are wrong", as opposed to a fault of the worker.
_CALLER_FAULTS = (ort_state.InvalidArgument, ort_state.InvalidProtobuf)


class ModelSession:
    """One ONNX Runtime session on a base model, with the tensors only it uses kept alive."""

    def __init__(
        self, owner: BaseModel, session: ort.InferenceSession, own_arrays: Mapping[str, np.ndarray]
    ) -> None:
        self._owner = owner
        self.session = session
        self._own_arrays = dict(own_arrays)  # the session reads these buffers in place
        self.own_bytes = sum(array.nbytes for array in self._own_arrays.values())
        self._closed = False

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(names), dict(feeds), self._owner.run_options)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._session_closed()


def select_overridable(model: onnx.ModelProto, patterns: Sequence[str], source: Path) -> tuple[str, ...]:
    """Initializer names matching any glob pattern; each pattern must match something."""
    names = [tensor.name for tensor in model.graph.initializer]
    selected: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise InvalidArgument(f"overridable pattern '{pattern}' matches no initializer of {source}")
        selected.update(matched)
    return tuple(sorted(selected))


class BaseModel:
    """One served base model. ``run`` is safe to call from many threads at once."""

    def __init__(
        self,
        name: str,
        path: Path,
        runtime: RuntimeOptions,
        cache: ModelCache,
        overridable_patterns: Sequence[str] = (),
        max_sequence_length: int = 0,
    ) -> None:
        if not path.is_file():
            raise NotFound(f"model '{name}': no file at {path}", field="path")
        started = time.perf_counter()
        self.name = name
        self.path = path
        self.runtime = runtime
        self._cache = cache
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # projection_values
        self.sessions = 0
        try:
            self.sha256 = cache.content_sha256(path)
            source_model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # unreadable file, not protobuf, broken external data, ...
            raise InvalidArgument(f"model '{name}' at {path} cannot be read: {exc}", field="path") from None
        refuse_own_domain(name, source_model)
        self.overridable = select_overridable(source_model, overridable_patterns, path)
        self.limits = find_limits(source_model, path, max_sequence_length)
        self.initializer_names = frozenset(tensor.name for tensor in source_model.graph.initializer)
        self.quantized = quantized_weights(source_model)  # quantized initializer -> the op reading it
        quantize = quantization(name, runtime, source_model, self.quantized, self.overridable)
        mark_overridable(source_model, self.overridable)
        self._graph: onnx.ModelProto | None = source_model
        self.lora_inputs: list[LoraInput] = []
        self.key = CacheKey(
            model_sha256=self.sha256,
            onnxruntime_version=ort.__version__,
            providers=runtime.providers,
            optimization_level=runtime.optimization_level,
            cpu=cpu_signature(),
            overridable=self.overridable,
            quantize=f"{quantize}-{QUANTIZE_VERSION}" if quantize else "",
            rewrite=f"lora-{REWRITE_VERSION}-{runtime.base_graph}-{runtime.lora_branch_in_force()}"
            if has_batch_dimension(source_model)
            else "",
        )
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4  # failures are raised to the caller and logged here
        self.entry, self._base = self._open()
        self.quantized = dict(self.entry.extra.get("quantized", self.quantized))
        if not self.entry.cached:  # built aside because the cache was full: removed with the model
            weakref.finalize(self, shutil.rmtree, str(self.entry.directory), True)
        # Base-only runs use the graph without LoRA branches; both map the same data file.
        base_graph = self.entry.directory / BASE_MODEL_FILE
        self._plain = self.new_session(graph=base_graph) if base_graph.is_file() else self._base
        self.providers: tuple[str, ...] = tuple(self._base.session.get_providers())
        lora_names = {name for lora in self.lora_inputs for name in lora.names}
        self.inputs = tuple(
            TensorSpec.from_ort(arg) for arg in self._base.session.get_inputs() if arg.name not in lora_names
        )
        self._graph = None  # only needed to optimize; the cached model serves from here on
        session = self._base.session
        overridable = [arg for arg in session.get_overridable_initializers() if arg.name not in lora_names]
        weights = [TensorSpec.from_ort(arg) for arg in overridable]
        self._weights = {spec.name: (spec.dtype, spec.shape) for spec in weights}
        self._feedable = {spec.name: (spec.dtype, spec.shape) for spec in [*self.inputs, *weights]}
        self.outputs = tuple(TensorSpec.from_ort(arg) for arg in self._base.session.get_outputs())
        # Its past/present pairs if it is a decoder with past, else why it cannot generate.
        self.decoder: DecoderSpec | str = find_decoder(self.inputs, self.outputs)
        self.load_seconds = time.perf_counter() - started
        log.info(
            "model '%s' ready in %.3f s (%s, optimized in %.1f s) on %s; arena %d bytes",
            name,
            self.load_seconds,
            "cache hit" if self.entry.hit else "cache miss",
            self.entry.build_seconds,
            ", ".join(self.providers),
            self.arena.total_bytes,
        )

    @property
    def cache_hit(self) -> bool:
        return self.entry.hit

    @property
    def batchable(self) -> bool:
        """Requests can share runs: every input and output leads with one dynamic batch dimension."""
        specs = [*self.inputs, *self.outputs]
        leading = {spec.dim_names[0] if spec.dim_names else None for spec in specs}
        return bool(specs) and all(spec.shape and spec.shape[0] < 0 for spec in specs) and len(leading) == 1

    def feedable_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Tensors a run may feed, by name: the inputs and the overridable weights (dtype, shape)."""
        return dict(self._feedable)

    def weight_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The overridable weights alone (dtype, shape): what an adapter may replace. Never the
        model's inputs, which requests give and the worker checks (ids, lengths, KV)."""
        return dict(self._weights)

    @property
    def lora_sites(self) -> list[LoraSite]:
        return [lora.site for lora in self.lora_inputs]

    @property
    def unadaptable(self) -> list[Unadaptable]:
        """MatMul/Gemm projections that cannot take a LoRA branch, with the reason."""
        return [Unadaptable(**values) for values in self.entry.extra.get("unadaptable", [])]

    @property
    def fused(self) -> list[str]:
        """Fused nodes (ONNX Runtime's Attention, ...) whose projection weights no branch reaches."""
        return list(self.entry.extra.get("fused", []))

    def projection_values(self, site: LoraSite) -> tuple[np.ndarray, np.ndarray]:
        """A float projection's weight as it applies it, [in, out] float32, and its bias ([out],
        zeros where it has none), read from the model file (once per weight)."""
        with self._lock:
            cached = self._values.get((site.weight, site.bias))
        if cached is None:
            names = [site.weight, *([site.bias] if site.bias else [])]
            source = onnx.load(str(self.path), load_external_data=False)
            tensors = {tensor.name: tensor for tensor in source.graph.initializer if tensor.name in names}
            arrays = [
                numpy_helper.to_array(tensors[name], base_dir=str(self.path.parent)).astype(np.float32)
                for name in names
            ]
            weight = arrays[0].reshape(site.weight_shape or arrays[0].shape)
            weight = weight.T if site.transposed else weight
            bias = arrays[1] if site.bias else np.zeros(site.out_features, np.float32)
            cached = (np.ascontiguousarray(weight), bias)
            with self._lock:
                self._values[(site.weight, site.bias)] = cached
        return cached

    def _open(self) -> tuple[CacheEntry, ModelSession]:
        """The cache entry and the base session; an entry that fails to load is rebuilt once."""
        for attempt in (1, 2):
            assert self._graph is not None, "the graph is kept until the first successful load"
            build = EntryBuilder(self.name, self.path, self.runtime, self.key, self._graph)
            entry = self._cache.get_or_build(self.key, build, label=f"model '{self.name}'")
            device = "cuda" if self.runtime.providers[0] == CUDA else "cpu"
            try:
                self.entry = entry
                self.lora_inputs = [LoraInput.from_json(v) for v in entry.extra.get("lora_inputs", [])]
                self.arena = Arena(entry, device=device)
                return entry, self.new_session()
            except Exception as exc:
                if attempt == 2 or not entry.hit:
                    raise InvalidArgument(
                        f"model '{self.name}' at {self.path} does not load: {exc}"
                    ) from None
                log.warning("cached model for '%s' does not load (%s); rebuilding", self.name, exc)
                self._cache.discard(entry.directory)
        raise AssertionError("unreachable")

    def new_session(
        self, own_tensors: Mapping[str, np.ndarray] | None = None, *, graph: Path | None = None
    ) -> ModelSession:
        """A session on the cached model over the shared arena, plus tensors only it replaces.

        ``own_tensors`` must name overridable initializers; the session reads them in place.
        ``graph`` picks another graph file of the cache entry (default: the full graph).
        """
        options = self.runtime.session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        self.arena.attach(options)
        own_arrays = {}
        own_values = []  # OrtValues must outlive session creation; the arrays outlive the session
        for name, array in (own_tensors or {}).items():
            if name not in self.overridable:
                raise InvalidArgument(
                    f"'{name}' is not an overridable tensor of model '{self.name}'", field=name
                )
            own_arrays[name] = np.ascontiguousarray(array)
            own_values.append(ort.OrtValue.ortvalue_from_numpy(own_arrays[name]))
            options.add_initializer(name, own_values[-1])
        session = ort.InferenceSession(
            str(graph or self.entry.model_path), options, providers=list(self.runtime.providers)
        )
        with self._lock:
            self.sessions += 1
        return ModelSession(self, session, own_arrays)

    def _session_closed(self) -> None:
        with self._lock:
            self.sessions -= 1

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] = (),
        session: ModelSession | None = None,
        lora_spans: Sequence[RowSpan] = (),
        extra_feeds: Mapping[str, np.ndarray] | None = None,
        buffers: FeedBuffers | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the model's specs and run them; outputs by name.

        ``lora_spans`` gives rows of the batch their LoRA factors (rows not covered get none);
        ``extra_feeds`` adds tensors beyond the model's inputs (an ORT adapter's parameters).
        """
        validate_inputs(self.name, self.inputs, inputs)
        names = validate_output_names(self.name, self.outputs, output_names)
        feeds = dict(inputs)
        if self.lora_inputs:
            feeds.update(build_feeds(self.lora_inputs, leading_rows(inputs), lora_spans, buffers))
        if extra_feeds:
            feeds.update(extra_feeds)
        chosen = session or (self._base if len(feeds) > len(inputs) else self._plain)
        return self.execute(chosen, names, feeds)

    def execute(
        self, session: ModelSession, names: Sequence[str], feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One run of ``session`` on feeds already checked; its failures as the worker's errors."""
        try:
            results = session.run(names, feeds)
        except _CALLER_FAULTS as exc:
            raise InvalidArgument(f"model '{self.name}' refused the inputs: {_ort_message(exc)}") from None
        except Exception as exc:
            if isinstance(exc, MemoryError) or "Failed to allocate memory" in str(exc):
                release_arena()  # the run's partial allocations stay in the arena otherwise
                raise ResourceExhausted(
                    f"model '{self.name}' could not allocate the memory this run needs "
                    f"({_ort_message(exc)}); send smaller requests",
                    reason="OUT_OF_MEMORY",
                    retry_after=1.0,
                ) from None
            log.exception("model '%s' failed to run", self.name)
            raise InternalError(f"model '{self.name}' failed to run: {_ort_message(exc)}") from None
        return dict(zip(names, results, strict=True))


def _ort_message(exc: BaseException) -> str:
    """ORT's message without its '[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :' prefix."""
    text = str(exc)
    marker = " : "
    if text.startswith("[ONNXRuntimeError]") and text.count(marker) >= 3:
        return text.split(marker, 3)[3].strip()
    return text
