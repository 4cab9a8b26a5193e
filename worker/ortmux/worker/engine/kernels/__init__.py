"""The worker's own ONNX Runtime operators, compiled from C on the machine that runs them.

``LoraBranch`` (lora_branch.c) computes a projection's LoRA branch for every row of a run from
per-row addresses of the adapters' factors, so a mixed-adapter run reads each adapter's factors
where they lie instead of copying them into per-run feeds (docs/lora-kernel.md).
``PagedAttention`` (paged_attention.c) is a decoder layer's attention over the KV cache's blocks,
each row over its own length (engine/paged.py, docs/kv-cache.md). One library holds both
(ops.c registers them).

:func:`library` finds the compiled library: beside this module when the install built it
(``python -m ortmux.worker.engine.kernels``), else in a per-user cache directory, compiling it
there on first use with the system's C compiler (well under a second). Where that cannot happen
(no compiler, a runtime without the API it needs), it returns None and says why once; the worker
then serves LoRA branches with ONNX Runtime's MatMul (copied factors), as exact and slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort

from ortmux.worker.errors import InvalidArgument

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = tuple(HERE / name for name in ("ops.c", "lora_branch.c", "paged_attention.c"))
HEADERS = (HERE / "ortmux_api.h",)
DOMAIN = "ortmux"
OP = "LoraBranch"
# The C API version the library asks for (KernelContext_ParallelFor): ONNX Runtime 1.17 or newer.
MIN_ORT = (1, 17)
FLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-std=c11")


def refuse_own_domain(name: str, model: onnx.ModelProto) -> None:
    """InvalidArgument when a model as given uses the worker's own operator domain: its operators
    trust the address tables the worker alone builds, so a graph of a user's holding them (with
    a table as a graph input) would read whatever memory a request pointed it at."""
    domains = {opset.domain for opset in model.opset_import}
    domains |= {function.domain for function in model.functions}
    for graph in [model.graph, *(function for function in model.functions)]:
        for node in _nodes(graph):
            domains.add(node.domain)
    if DOMAIN in domains:
        raise InvalidArgument(
            f"model '{name}' uses the operator domain '{DOMAIN}', which is the worker's own; "
            "export the model with standard ONNX or ONNX Runtime operators",
            field="path",
        )


def _nodes(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.NodeProto]:
    """Every node of a graph or function, those of its subgraphs (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in _GRAPH_ATTRIBUTES else []:
                yield from _nodes(subgraph)


_GRAPH_ATTRIBUTES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _tag() -> str:
    """What the compiled file depends on: the source and the machine's architecture."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    return f"{platform.machine()}-{digest.hexdigest()[:16]}"


def _file_name() -> str:
    return f"libortmux_ops-{_tag()}.so"


def build(directory: Path) -> Path:
    """Compile the library into ``directory`` (atomically: a reader sees all of it or nothing)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / _file_name()
    handle, scratch = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=directory)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, "-o", scratch, *(str(path) for path in SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _cache_directory() -> Path:
    """A per-user directory under the temporary directory, or, where that name is taken by a
    directory another user could write (a shared /tmp), a fresh private one: the worker loads
    code from it."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    directory = Path(tempfile.gettempdir()) / f"ortmux-kernels-{uid}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        status = directory.lstat()
        if directory.is_symlink() or status.st_uid != uid or status.st_mode & 0o022:
            raise PermissionError(f"{directory} is not this user's own")
    except OSError as exc:
        log.warning("LoRA kernel: %s; building in a private directory", exc)
        return Path(tempfile.mkdtemp(prefix="ortmux-kernels-"))
    return directory


@functools.cache
def library() -> Path | None:
    """The compiled LoraBranch library, or None (with one warning saying why)."""
    version = tuple(int(part) for part in ort.__version__.split(".")[:2])
    if version < MIN_ORT:
        log.warning("LoRA kernel off: ONNX Runtime %s predates its C API 17", ort.__version__)
        return None
    if sys.platform != "linux":
        log.warning("LoRA kernel off: built for Linux only; branches use MatMul on copied factors")
        return None
    if (HERE / _file_name()).is_file():
        return HERE / _file_name()
    try:
        cache = _cache_directory()
        if (cache / _file_name()).is_file():
            return cache / _file_name()
        return build(cache)
    except Exception as exc:  # no compiler, read-only temp, ...
        log.warning("LoRA kernel off (%s); branches use MatMul on copied factors", exc)
        return None


def main() -> None:
    """Build the library beside this module (what an image build runs, so pods compile nothing)."""
    print(build(HERE))
