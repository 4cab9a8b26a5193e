"""Process-wide ONNX Runtime setup: one global thread pool and one shared CPU allocator.

ONNX Runtime creates its environment on the first session; both settings must be in place before
that, and hold for the life of the process. Every ortmux session then uses the global pool
(``use_per_session_threads = False``) and the shared allocator (``session.use_env_allocators``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import threading

import numpy as np
import onnx
import onnxruntime as ort

from ortmux.worker.engine import kernels

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_lock = threading.Lock()
_configured: tuple[int, int] | None = None


def configure_process(intra_op_threads: int, inter_op_threads: int = 1) -> tuple[int, int]:
    """Set the global pool sizes and register the shared CPU allocator, once per process; and
    stop numpy asking for transparent huge pages (see :func:`_no_huge_page_advice`).

    Later calls keep the first sizes (ONNX Runtime cannot change them) and log a warning when
    they ask for others. Returns the sizes in force.
    """
    global _configured
    with _lock:
        wanted = (intra_op_threads, inter_op_threads)
        if _configured is None:
            _no_huge_page_advice()
            ort.set_global_thread_pool_sizes(intra_op_threads, inter_op_threads)
            cpu = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))
            _configured = wanted
            log.info("ONNX Runtime global thread pool: %d intra-op, %d inter-op threads", *wanted)
        elif wanted != _configured:
            log.warning("thread pool sizes %s asked for, but %s are already in force", wanted, _configured)
        return _configured


def _no_huge_page_advice() -> None:
    """numpy advises huge pages for every array of 4 MiB or more. Where the kernel then compacts
    memory on the faulting thread (``transparent_hugepage/defrag`` = ``madvise``, a common
    default), taking such an array can stall for tens of milliseconds: an adapter's factors, a
    batch's inputs. Plain pages cost the same every time. (``NUMPY_MADVISE_HUGEPAGE=1`` in the
    environment keeps numpy's advice.)"""
    if os.environ.get("NUMPY_MADVISE_HUGEPAGE"):
        return
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        try:
            from numpy.core.multiarray import _set_madvise_hugepage
        except ImportError:
            return
    _set_madvise_hugepage(False)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created: providers in priority order and the global pool's size."""

    providers: tuple[str, ...]
    intra_op_threads: int = 0
    optimization_level: str = "all"
    # Base-only runs: "shared" strips the LoRA graph's branches (one copy of the weights);
    # "separate" optimizes the original graph on its own, keeping fusions the branches block.
    base_graph: str = "shared"
    # Float bases quantized once when they enter the cache: none, int8 or int4 (engine/quantize.py).
    quantize: str = "none"
    # LoRA branches: "kernel" reads each row's factors in place (engine/kernels; CPU), "matmul"
    # feeds copies of them to ONNX Runtime's MatMul. "kernel" falls back to "matmul" with a
    # warning where the kernel cannot serve (no C compiler, CUDA first).
    lora_branch: str = "kernel"

    def lora_branch_in_force(self) -> str:
        """The branch in force: "kernel" when asked for, on CPU, and its library builds."""
        if self.lora_branch != "kernel":
            return "matmul"
        if self.providers and self.providers[0] != "CPUExecutionProvider":
            _warn_once(
                f"LoRA kernel off: it runs on CPU and {self.providers[0]} comes first; branches use MatMul"
            )
            return "matmul"
        return "kernel" if kernels.library() is not None else "matmul"

    def graph_optimization_level(self) -> ort.GraphOptimizationLevel:
        """The level the cache optimizes at (sessions on cached models run at ORT_DISABLE_ALL)."""
        return OPTIMIZATION_LEVELS[self.optimization_level]

    def session_options(self, optimization: ort.GraphOptimizationLevel) -> ort.SessionOptions:
        """Options for a session on the shared pool and allocator, at the given optimization level."""
        configure_process(self.intra_op_threads)
        options = ort.SessionOptions()
        options.use_per_session_threads = False
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.graph_optimization_level = optimization
        options.log_severity_level = 3
        if self.lora_branch_in_force() == "kernel":
            options.register_custom_ops_library(str(kernels.library()))
        return options


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the heap that loading freed back to the system (glibc keeps it otherwise).

    Loading parses the model file into memory (all of it when its weights are embedded, as most
    quantized files have them), and the cache may optimize it in this process; glibc keeps the
    freed space mapped, about the model's size in private memory for the worker's lifetime."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


_shrinker: tuple[ort.InferenceSession, ort.RunOptions] | None = None
_shrinker_lock = threading.Lock()


def release_arena() -> None:
    """Hand back what the shared CPU arena holds beyond what runs in progress use, and the heap
    glibc kept: after a large or failed run, the process returns to its resting size.

    ONNX Runtime's arena keeps every region it grew for a run. Shrinking it is a run option
    (``memory.enable_memory_arena_shrinkage``) that frees the arena's unused regions when that
    run ends; since all sessions share one arena, a run of a one-node session does it. Shrinking
    after every run would cost large runs their page faults again (+67% at 32 x 128 tokens on the
    demo, measured), so the memory guard asks for it only past a level."""
    global _shrinker
    with _shrinker_lock:
        if _shrinker is None:
            graph = onnx.helper.make_graph(
                [onnx.helper.make_node("Identity", ["x"], ["y"])],
                "ortmux-arena-release",
                [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
            )
            model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
            model.ir_version = 8
            options = RuntimeOptions(("CPUExecutionProvider",)).session_options(
                ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            )
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            shrink = ort.RunOptions()
            shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            _shrinker = (session, shrink)
        session, shrink = _shrinker
    session.run(None, {"x": np.zeros(1, np.float32)}, shrink)
    release_freed_memory()
