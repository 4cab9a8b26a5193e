"""The base weights every session of one base model shares, held once per process.

On the CPU the arena is the cache entry's data file: ONNX Runtime memory-maps it in every
session, so the weights and prepacked blobs live once in the page cache, shared by every session
of every process on the node. Where weights must live in device memory (CUDA), or where a test
asks for it, the arena also owns tensors as OrtValues that every session receives through
``SessionOptions.add_initializer``, which uses them in place when they sit on the device ONNX
Runtime plans for them (never ``add_external_initializers``, which copies).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from ortmux.worker.engine.cache import BASE_DATA_FILE, CacheEntry

log = logging.getLogger(__name__)

_MIN_OWNED_BYTES = 1024


class Arena:
    def __init__(
        self, entry: CacheEntry, *, device: str = "cpu", owned: Collection[str] | None = None
    ) -> None:
        self.device = device
        data_files = (entry.data_path, entry.directory / BASE_DATA_FILE)
        self.mapped_bytes = sum(path.stat().st_size for path in data_files if path.is_file())
        self._host: dict[str, np.ndarray] = {}
        self._values: dict[str, ort.OrtValue] = {}
        self.owned_bytes = 0
        if owned is None and device != "cpu":
            owned = _large_initializers(entry)
        if owned:
            model = onnx.load(str(entry.model_path), load_external_data=False)
            tensors = {tensor.name: tensor for tensor in model.graph.initializer}
            for name in owned:
                # A writable C-order copy the arena owns; CPU OrtValues wrap it without copying.
                array = np.array(
                    numpy_helper.to_array(tensors[name], base_dir=str(entry.directory)), order="C"
                )
                self._host[name] = array
                self._values[name] = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
                self.owned_bytes += array.nbytes
            if device != "cpu":
                self._host.clear()  # the device copy is the one sessions use
            log.info("arena holds %d tensors (%d bytes) on %s", len(self._values), self.owned_bytes, device)

    @property
    def total_bytes(self) -> int:
        return self.mapped_bytes + self.owned_bytes

    @property
    def owned_names(self) -> tuple[str, ...]:
        return tuple(self._values)

    def host_array(self, name: str) -> np.ndarray:
        """The host buffer behind an owned CPU tensor (sessions read it in place)."""
        return self._host[name]

    def attach(self, options: ort.SessionOptions) -> None:
        """Give a session the arena's owned tensors, shared rather than copied."""
        for name, value in self._values.items():
            options.add_initializer(name, value)


def _large_initializers(entry: CacheEntry) -> list[str]:
    model = onnx.load(str(entry.model_path), load_external_data=False)
    names = []
    for tensor in model.graph.initializer:
        size = int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if size >= _MIN_OWNED_BYTES:
            names.append(tensor.name)
    return names
