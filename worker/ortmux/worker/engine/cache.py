"""The optimized-model cache: optimize and prepack a base model once per node, reuse it after.

An entry is a directory ``<cache>/<key digest>/`` holding the optimized model, its external data
(optimized weights and prepacked blobs, which sessions memory-map) and a manifest. The key covers
everything that changes the optimized result. Entries appear atomically (built in a temporary
directory, fsynced, renamed); builders of the same key on one node serialize on a file lock, and
an entry that is partial, corrupt or built for another key is logged, discarded and rebuilt.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxruntime as ort

from ortmux.worker.engine.quantized_ops import unsavable_prepacking
from ortmux.worker.files import fsync_dir, write_atomically

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MODEL_FILE = "model.onnx"
BASE_MODEL_FILE = "model_base.onnx"  # the same graph without LoRA branches, when it has them
DATA_FILE = "model.onnx.data"
BASE_DATA_FILE = "model_base.onnx.data"  # weights of a base graph optimized on its own, if any
MANIFEST_FILE = "manifest.json"
_SAMPLES = 32
_SAMPLE_BYTES = 64 * 1024
_HEARTBEAT_SECONDS = 15.0
_FULL_BELOW_BYTES = 16 << 20  # a build that failed with less free space than this ran out of it


class CacheEntryInvalid(Exception):
    """An entry on disk that must not be used; the message says why."""


class CacheUnwritable(Exception):
    """The cache's file system is full: an entry could not be written there."""


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """Everything that changes an optimized model. Its digest names the entry."""

    model_sha256: str
    onnxruntime_version: str
    providers: tuple[str, ...]
    optimization_level: str
    cpu: str
    overridable: tuple[str, ...]
    quantize: str = ""  # quantization applied before the rewrite, with its version ("int8-1")
    rewrite: str = ""  # graph rewrite applied before optimizing, with its version ("lora-1")
    format: int = CACHE_FORMAT

    def as_dict(self) -> dict[str, object]:
        return {
            **dataclasses.asdict(self),
            "providers": list(self.providers),
            "overridable": list(self.overridable),
        }

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    key: CacheKey
    directory: Path
    hit: bool
    build_seconds: float
    extra: dict  # what the builder recorded about the optimized model (kept in the manifest)
    cached: bool = True  # False: built in a temporary directory because the cache was full

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def data_path(self) -> Path:
        return self.directory / DATA_FILE

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())


def cpu_signature() -> str:
    """Architecture and instruction-set flags: optimized graphs may use kernels specific to them."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def external_data_files(model_path: Path) -> list[Path]:
    """The external data files a model file refers to, without loading them."""
    model = onnx.load(str(model_path), load_external_data=False)
    locations = set()
    for tensor in _all_initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return [model_path.parent / location for location in sorted(locations)]


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_initializers(subgraph)


def _sampled_digest(path: Path) -> str:
    """sha256 of the size and 32 spread 64 KiB blocks: catches truncation and most corruption
    without reading a multi-GB file on every start."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            digest.update(handle.read())
        else:
            for index in range(_SAMPLES):
                handle.seek((size - _SAMPLE_BYTES) * index // (_SAMPLES - 1))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


class ModelCache:
    """Optimized models under ``root``, shared by every worker process pointed at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._hash_memo_dir = root / "content-hashes"
        self._hash_memo_dir.mkdir(exist_ok=True)

    def content_sha256(self, model_path: Path) -> str:
        """sha256 over the model file and its external data, memoized by path, size and mtime."""
        files = [model_path, *external_data_files(model_path)]
        identity = [
            (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in files
        ]
        memo = self._hash_memo_dir / (hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32] + ".txt")
        try:
            cached = memo.read_text().strip()
            if len(cached) == 64:
                return cached
        except OSError:
            pass
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        value = digest.hexdigest()
        try:
            write_atomically(memo, value.encode())
        except OSError as exc:  # only a memo: the next load hashes again
            log.warning("cannot record the content hash of %s in %s: %s", model_path, memo, exc.strerror)
        return value

    def get_or_build(
        self,
        key: CacheKey,
        build: Callable[[Path], dict],
        *,
        label: str = "",
    ) -> CacheEntry:
        """The entry for ``key``. On a miss ``build(directory)`` writes MODEL_FILE (and DATA_FILE)
        and returns a JSON-able dict kept in the manifest and handed back on every hit.

        When the cache's file system is full the entry is built in a temporary directory instead
        (``cached`` False; the caller removes it when done) and the next load tries the cache again.
        """
        try:
            return self._get_or_build(key, build, label or key.digest)
        except CacheUnwritable as full:
            log.warning("%s; %s is served from an uncached build", full, label or key.digest)
            started = time.perf_counter()
            directory = Path(tempfile.mkdtemp(prefix=f"ortmux-uncached-{key.digest[:12]}-"))
            try:
                extra = build(directory)
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            return CacheEntry(
                key,
                directory,
                hit=False,
                build_seconds=time.perf_counter() - started,
                extra=extra,
                cached=False,
            )

    def _get_or_build(self, key: CacheKey, build: Callable[[Path], dict], label: str) -> CacheEntry:
        directory = self.root / key.digest
        try:
            return CacheEntry(key, directory, hit=True, build_seconds=0.0, extra=self.verify(directory, key))
        except CacheEntryInvalid as problem:
            if directory.exists():
                log.warning("cache entry %s is unusable (%s); rebuilding", directory, problem)
        with self._lock(key.digest):
            try:  # another process may have built it while this one waited
                return CacheEntry(
                    key, directory, hit=True, build_seconds=0.0, extra=self.verify(directory, key)
                )
            except CacheEntryInvalid:
                self.discard(directory)
            started = time.perf_counter()
            extra = self._build(directory, key, build, label)
            return CacheEntry(
                key, directory, hit=False, build_seconds=time.perf_counter() - started, extra=extra
            )

    def verify(self, directory: Path, key: CacheKey) -> dict:
        """The builder's record if ``directory`` is a complete entry built for ``key``; else
        CacheEntryInvalid."""
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise CacheEntryInvalid("no manifest") from None
        except (OSError, ValueError) as exc:
            raise CacheEntryInvalid(f"unreadable manifest: {exc}") from None
        if manifest.get("key") != key.as_dict():
            raise CacheEntryInvalid("manifest was written for another key")
        files = manifest.get("files")
        if not isinstance(files, dict) or MODEL_FILE not in files:
            raise CacheEntryInvalid("manifest lists no model file")
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                raise CacheEntryInvalid(f"{name} is missing")
            if path.stat().st_size != expected.get("size"):
                raise CacheEntryInvalid(
                    f"{name} has {path.stat().st_size} bytes, manifest says {expected.get('size')}"
                )
            if _sampled_digest(path) != expected.get("sampled_sha256"):
                raise CacheEntryInvalid(f"{name} content differs from the manifest")
        extra = manifest.get("extra", {})
        if not isinstance(extra, dict):
            raise CacheEntryInvalid("manifest extra is not an object")
        return extra

    def discard(self, directory: Path) -> None:
        """Remove an entry: renamed aside first, so no reader ever sees half of one."""
        if not directory.exists():
            return
        trash = self.root / f".discard-{directory.name}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _build(self, directory: Path, key: CacheKey, build: Callable[[Path], dict], label: str) -> dict:
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".build-{key.digest}-", dir=self.root))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheUnwritable(f"model cache {self.root} is full ({exc.strerror})") from None
            raise
        try:
            with _heartbeat(label):
                extra = build(staging)
            files = {}
            for path in sorted(staging.iterdir()):
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
                files[path.name] = {"size": path.stat().st_size, "sampled_sha256": _sampled_digest(path)}
            if MODEL_FILE not in files:
                raise RuntimeError(f"optimizing {label} wrote no {MODEL_FILE}")
            manifest = {"key": key.as_dict(), "files": files, "created_at": time.time(), "extra": extra}
            write_atomically(staging / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
            os.rename(staging, directory)
            fsync_dir(self.root)
            return extra
        except Exception as exc:
            # ONNX Runtime reports a failed write without its errno: a build that failed with
            # (next to) no space left on the cache's file system ran out of it.
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if full or _free_bytes(self.root) < _FULL_BELOW_BYTES:
                raise CacheUnwritable(
                    f"model cache {self.root} is full ({_free_bytes(self.root)} bytes free after "
                    f"a failed build: {exc})"
                ) from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def _lock(self, digest: str) -> Iterator[None]:
        with open(self.root / f".{digest}.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def _heartbeat(label: str) -> Iterator[None]:
    """Log progress while a long optimization runs (large bases can take minutes)."""
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(_HEARTBEAT_SECONDS):
            log.info("still optimizing %s (%.0f s)", label, time.perf_counter() - started)

    thread = threading.Thread(target=beat, name="ortmux-optimize-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def optimize_into(
    model: onnx.ModelProto,
    external_data_dir: Path,
    directory: Path,
    *,
    options: ort.SessionOptions,
    providers: Sequence[str],
    data_file: str = DATA_FILE,
) -> None:
    """Run ONNX Runtime's graph optimization on ``model`` (its external data read from
    ``external_data_dir``) and save the result, with its weights and prepacked blobs as external
    data, in ``directory`` (no prepacked blobs for a graph whose blobs ONNX Runtime reloads wrong:
    :func:`~ortmux.worker.engine.quantized_ops.unsavable_prepacking`)."""
    options.optimized_model_filepath = str(directory / MODEL_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    unpacked = unsavable_prepacking(model)
    if unpacked:
        log.info(
            "%d MatMulNBits at accuracy_level 4 are saved unpacked in %s; each session prepacks them "
            "(ONNX Runtime reloads their saved prepacked weights wrong)",
            unpacked,
            directory,
        )
    else:
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(external_data_dir)
    )
    ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))


def mark_overridable(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """List the named initializers as graph inputs too (ONNX's way to make them overridable), so
    no optimizer folds or prepacks them and their names survive optimization."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    already = {value.name for value in model.graph.input}
    for name in names:
        tensor = initializers[name]
        if name not in already:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
            )
