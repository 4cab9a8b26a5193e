"""Building a base model's cache entry: quantize (``--quantize``), add the LoRA branches,
optimize and prepack, and derive the graph base-only runs execute. Done once per node and key."""

from __future__ import annotations

import collections
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx

from ortmux.worker.engine.cache import BASE_DATA_FILE, BASE_MODEL_FILE, MODEL_FILE, CacheKey, optimize_into
from ortmux.worker.engine.lora.graph import LoraInput, rewrite, strip_branches
from ortmux.worker.engine.lora.targets import SiteReport, carry_names, find_sites, projection_names
from ortmux.worker.engine.providers import CUDA
from ortmux.worker.engine.quantize import quantize_model
from ortmux.worker.engine.quantized_ops import (
    CPU_ONLY,
    cpu_only_ops,
    projection_counts,
    quantized_weights,
)
from ortmux.worker.engine.runtime import RuntimeOptions
from ortmux.worker.errors import InvalidArgument

log = logging.getLogger(__name__)


def quantization(
    name: str,
    runtime: RuntimeOptions,
    model: onnx.ModelProto,
    quantized: Mapping[str, str],
    overridable: Sequence[str],
) -> str:
    """The quantization the worker applies to ``model`` ("" for none: not asked, or the model
    comes quantized). Dynamic int8 runs on CPU kernels only: refused as ``--quantize`` on a CUDA
    worker, served with a warning when the model comes quantized that way."""
    quantize = runtime.quantize if runtime.quantize != "none" and not projection_counts(quantized) else ""
    if quantize and overridable:
        raise InvalidArgument(
            f"model '{name}': --quantize {quantize} and --overridable do not combine (an overridable "
            "weight must stay float); serve the float model with --overridable, or quantized without it",
            field="quantize",
        )
    if runtime.providers[0] != CUDA:
        return quantize
    if quantize == "int8":
        raise InvalidArgument(
            f"model '{name}': --quantize int8 makes a dynamic int8 model, whose operators "
            f"({', '.join(sorted(CPU_ONLY))}) ONNX Runtime runs on CPU only, copying activations "
            "around each one; on CUDA use --quantize int4 (MatMulNBits has a CUDA kernel) or none",
            field="quantize",
        )
    cpu_only = cpu_only_ops(model)
    if cpu_only:
        log.warning(
            "model '%s' holds operators ONNX Runtime runs on CPU only (%s): on %s they run on the "
            "CPU with host copies around each; a 4-bit MatMulNBits or float16 model serves faster",
            name,
            ", ".join(f"{count} {op}" for op, count in cpu_only.items()),
            CUDA,
        )
    return quantize


class EntryBuilder:
    """Builds the cache entry of model ``name`` from ``graph`` (the model as loaded, overridable
    weights marked) into the directory the cache gives it; returns the manifest's record."""

    def __init__(
        self, name: str, path: Path, runtime: RuntimeOptions, key: CacheKey, graph: onnx.ModelProto
    ) -> None:
        self.name = name
        self.path = path
        self.runtime = runtime
        self.key = key
        self._graph = graph

    def __call__(self, directory: Path) -> dict:
        """Build the cache entry: quantize (``--quantize``), rewrite, optimize, prepack, save.
        Records the LoRA inputs, so a cache hit needs neither the rewrite nor its shape inference."""
        log.info("optimizing model '%s' from %s (large models take minutes)", self.name, self.path)
        options = self.runtime.session_options(self.runtime.graph_optimization_level())
        with self._source(directory) as (source, data_dir):
            graph, lora_inputs, report = self._rewrite(source)
            try:
                optimize_into(graph, data_dir, directory, options=options, providers=self.runtime.providers)
            except Exception as exc:
                raise InvalidArgument(
                    f"model '{self.name}' at {self.path} does not load: {exc}", field="path"
                ) from None
            extra: dict = {
                "lora_inputs": [lora.to_json() for lora in lora_inputs],
                "unadaptable": [dataclasses.asdict(item) for item in report.unadaptable],
                "fused": report.fused,
                "quantized": quantized_weights(source),
            }
            if lora_inputs:
                extra["base_graph"] = self._build_base_graph(directory, lora_inputs, source, data_dir)
        return extra

    @contextmanager
    def _source(self, directory: Path) -> Iterator[tuple[onnx.ModelProto, Path]]:
        """The graph the entry is built from and the directory of its external data: the model as
        given, or (``--quantize``) its quantized form in a scratch directory beside the entry."""
        if not self.key.quantize:
            yield self._graph, self.path.parent
            return
        kind = self.key.quantize.rsplit("-", 1)[0]
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=directory.parent) as scratch:
            started = time.perf_counter()
            path = quantize_model(kind, self.path, Path(scratch), label=f"model '{self.name}'")
            log.info("model '%s' quantized (%s) in %.1f s", self.name, kind, time.perf_counter() - started)
            yield onnx.load(str(path), load_external_data=False), path.parent

    def _build_base_graph(
        self, directory: Path, lora_inputs: list[LoraInput], source: onnx.ModelProto, data_dir: Path
    ) -> str:
        """The graph base-only runs execute, and how it was made.

        ``shared``: the LoRA graph without its branches, on the LoRA graph's weights. The branches
        may keep ONNX Runtime from fusing what they sit between (MatMul + bias, Add +
        LayerNormalization, attention patterns); ``separate`` then optimizes the original graph on
        its own, at the price of its own weight file (a second copy, mapped like the first). The
        log says which fusions the shared graph misses."""
        optimized = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
        try:
            stripped = strip_branches(optimized, lora_inputs)
        except ValueError as exc:
            log.warning("model '%s': %s", self.name, exc)
            stripped = None
        options = self.runtime.session_options(self.runtime.graph_optimization_level())
        scratch = directory / ".base"
        scratch.mkdir()
        try:
            optimize_into(
                source,
                data_dir,
                scratch,
                options=options,
                providers=self.runtime.providers,
                data_file=BASE_DATA_FILE,
            )
            plain = onnx.load(str(scratch / MODEL_FILE), load_external_data=False)
            missed = _operator_difference(stripped, plain)
            if stripped is not None and self.runtime.base_graph == "shared":
                onnx.save(stripped, str(directory / BASE_MODEL_FILE))
                if missed:
                    log.info(
                        "model '%s': base-only runs miss fusions the LoRA branches block (%s); "
                        "base_graph=separate keeps them at the cost of a second weight file",
                        self.name,
                        missed,
                    )
                return "shared"
            (scratch / MODEL_FILE).rename(directory / BASE_MODEL_FILE)
            if (scratch / BASE_DATA_FILE).exists():
                (scratch / BASE_DATA_FILE).rename(directory / BASE_DATA_FILE)
            log.info(
                "model '%s': base-only runs use the original graph optimized on its own (%s)",
                self.name,
                missed or "same operators",
            )
            return "separate"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _rewrite(self, graph: onnx.ModelProto) -> tuple[onnx.ModelProto, list[LoraInput], SiteReport]:
        """Every adaptable projection gets a LoRA branch (done once, when the cache builds)."""
        if not self.key.rewrite:
            return graph, [], SiteReport([], [], [])
        try:
            report = find_sites(graph)
            if graph is not self._graph:  # quantized by the worker
                report = carry_names(report, projection_names(self._graph))
            branch = self.runtime.lora_branch_in_force()
            rewritten, inputs = rewrite(graph, report, branch)
            if branch == "kernel" and inputs and not inputs[0].table:
                log.info("model '%s': LoRA branches use MatMul (the kernel computes float32 only)", self.name)
            return rewritten, inputs, report
        except Exception as exc:  # a graph the rewrite cannot handle is served without LoRA
            log.warning("model '%s' is served without LoRA adapters: %s", self.name, exc)
            return graph, [], SiteReport([], [], [])


def _operators(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node if node.op_type != "Identity")


def _operator_difference(stripped: onnx.ModelProto | None, plain: onnx.ModelProto) -> str:
    """What the original graph optimized on its own fuses beyond the stripped graph ("" if nothing)."""
    if stripped is None:
        return "the LoRA graph's branches could not be stripped"
    more = _operators(plain) - _operators(stripped)
    return ", ".join(f"{count} more {op}" for op, count in sorted(more.items()))
