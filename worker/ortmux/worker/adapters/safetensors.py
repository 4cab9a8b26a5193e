"""Reading and writing the safetensors format, strictly: every malformation is a clear error.

Layout: 8-byte little-endian header length N, N bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__"}), then data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np

from ortmux.worker.errors import InvalidArgument

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def load(data: bytes | memoryview, source: str = "safetensors") -> dict[str, np.ndarray]:
    """Tensors by name; BF16 is widened to float32. Raises InvalidArgument naming what is wrong."""
    view = memoryview(data)
    if len(view) < 8:
        raise InvalidArgument(f"{source}: {len(view)} bytes is too short for a safetensors file")
    (header_size,) = struct.unpack("<Q", view[:8])
    if header_size > min(MAX_HEADER_BYTES, len(view) - 8):
        raise InvalidArgument(f"{source}: header size {header_size} exceeds the file ({len(view)} bytes)")
    try:
        header = json.loads(bytes(view[8 : 8 + header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{source}: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{source}: header is not a JSON object")
    body = view[8 + header_size :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(source, name, info, body)
    return tensors


def _tensor(source: str, name: str, info: object, body: memoryview) -> np.ndarray:
    if not isinstance(info, dict):
        raise InvalidArgument(f"{source}: entry '{name}' is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InvalidArgument(f"{source}: tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise InvalidArgument(f"{source}: tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= len(body):
        raise InvalidArgument(f"{source}: tensor '{name}' data [{begin}, {end}) lies outside the file")
    count = math.prod(shape)
    raw = body[begin:end]
    if dtype_name == "BF16":
        if len(raw) != count * 2:
            raise InvalidArgument(
                f"{source}: tensor '{name}' has {len(raw)} bytes, BF16{shape} needs {count * 2}"
            )
        widened = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return widened.view(np.float32).reshape(shape)
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise InvalidArgument(f"{source}: tensor '{name}' has unsupported dtype {dtype_name!r}")
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(
            f"{source}: tensor '{name}' has {len(raw)} bytes, "
            f"{dtype_name}{shape} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def dump(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (C order, little-endian)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks = []
    offset = 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        raw = array.astype(dtype, copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[np.dtype(dtype.str)],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
