"""Tensors on the wire: raw little-endian bytes with a dtype and a shape, checked on both ends."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ortmux.v1 import tensor_pb2

DataType = tensor_pb2.DataType

_NUMPY_NAME_BY_DTYPE: dict[int, str] = {
    tensor_pb2.DATA_TYPE_FLOAT32: "float32",
    tensor_pb2.DATA_TYPE_FLOAT16: "float16",
    tensor_pb2.DATA_TYPE_FLOAT64: "float64",
    tensor_pb2.DATA_TYPE_INT8: "int8",
    tensor_pb2.DATA_TYPE_INT16: "int16",
    tensor_pb2.DATA_TYPE_INT32: "int32",
    tensor_pb2.DATA_TYPE_INT64: "int64",
    tensor_pb2.DATA_TYPE_UINT8: "uint8",
    tensor_pb2.DATA_TYPE_UINT16: "uint16",
    tensor_pb2.DATA_TYPE_UINT32: "uint32",
    tensor_pb2.DATA_TYPE_UINT64: "uint64",
    tensor_pb2.DATA_TYPE_BOOL: "bool",
}
_DTYPE_BY_NUMPY_NAME: dict[str, int] = {name: code for code, name in _NUMPY_NAME_BY_DTYPE.items()}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPE_BY_NUMPY_NAME)


class TensorCodecError(ValueError):
    """A tensor cannot be encoded or decoded; the message names the tensor and what is wrong."""

    def __init__(self, message: str, *, tensor: str = "") -> None:
        super().__init__(message)
        self.tensor = tensor


def dtype_name(code: int) -> str:
    """The numpy dtype name of a wire dtype code ("float32", ...); the enum name if unsupported."""
    name = _NUMPY_NAME_BY_DTYPE.get(code)
    if name is not None:
        return name
    try:
        return tensor_pb2.DataType.Name(code)
    except ValueError:
        return f"unknown dtype code {code}"


def dtype_code(dtype: np.dtype | str) -> int:
    """The wire dtype code of a numpy dtype; TensorCodecError when it has none."""
    name = np.dtype(dtype).name
    code = _DTYPE_BY_NUMPY_NAME.get(name)
    if code is None:
        raise TensorCodecError(f"dtype {name} cannot be sent; supported: {', '.join(SUPPORTED_DTYPES)}")
    return code


def encode(name: str, array: np.ndarray, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode an array as a Tensor message (C order, little-endian)."""
    array = np.asarray(array)
    try:
        code = dtype_code(array.dtype)
    except TensorCodecError as exc:
        raise TensorCodecError(f"tensor '{name}': {exc}", tensor=name) from None
    wire = array.astype(array.dtype.newbyteorder("<"), copy=False)
    message = out if out is not None else tensor_pb2.Tensor()
    message.name = name
    message.dtype = code
    message.shape[:] = array.shape
    message.data = np.ascontiguousarray(wire).tobytes()
    return message


def element_count(shape: Sequence[int]) -> int:
    """Elements of a tensor of ``shape``, exactly (a product past int64 does not wrap to a small
    number, as numpy's would: [2**32, 2**32] is 2**64 elements, not 0)."""
    return math.prod(int(dim) for dim in shape)


def decode(message: tensor_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor message to a read-only array that views the message's bytes."""
    name = message.name
    numpy_name = _NUMPY_NAME_BY_DTYPE.get(message.dtype)
    if numpy_name is None:
        raise TensorCodecError(
            f"tensor '{name}': dtype {dtype_name(message.dtype)} is not supported; "
            f"supported: {', '.join(SUPPORTED_DTYPES)}",
            tensor=name,
        )
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise TensorCodecError(f"tensor '{name}': shape {list(shape)} has a negative dimension", tensor=name)
    dtype = np.dtype(numpy_name).newbyteorder("<")
    expected = element_count(shape) * dtype.itemsize
    if len(message.data) != expected:
        raise TensorCodecError(
            f"tensor '{name}': {len(message.data)} bytes of data, but dtype {numpy_name} and shape "
            f"{list(shape)} need {expected}",
            tensor=name,
        )
    array = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def encode_many(arrays: Mapping[str, np.ndarray], repeated: Iterable) -> None:
    """Append every array of ``arrays`` to a repeated Tensor field."""
    for name, array in arrays.items():
        encode(name, array, out=repeated.add())


def decode_many(messages: Sequence[tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
    """Decode repeated Tensor messages to a dict, refusing duplicate or empty names."""
    arrays: dict[str, np.ndarray] = {}
    for message in messages:
        if not message.name:
            raise TensorCodecError("a tensor has no name")
        if message.name in arrays:
            raise TensorCodecError(f"tensor '{message.name}' appears more than once", tensor=message.name)
        arrays[message.name] = decode(message)
    return arrays
