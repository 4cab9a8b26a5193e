from __future__ import annotations

import numpy as np
import pytest

from ortmux.common import tensors
from ortmux.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", tensors.SUPPORTED_DTYPES)
def test_round_trip_keeps_dtype_shape_and_values(dtype: str) -> None:
    array = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    decoded = tensors.decode(tensors.encode("x", array))
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == (2, 3, 4)
    np.testing.assert_array_equal(decoded, array)


def test_big_endian_and_non_contiguous_arrays_travel_as_little_endian_c_order() -> None:
    array = np.arange(12, dtype=">i4").reshape(3, 4).T
    message = tensors.encode("x", array)
    assert message.data == np.ascontiguousarray(array.astype("<i4")).tobytes()
    np.testing.assert_array_equal(tensors.decode(message), array)


def test_scalar_and_empty_tensors() -> None:
    np.testing.assert_array_equal(tensors.decode(tensors.encode("s", np.float32(2.5))), np.float32(2.5))
    assert tensors.decode(tensors.encode("e", np.zeros((0, 3), np.int64))).shape == (0, 3)


def test_data_size_mismatch_names_the_tensor_and_both_sizes() -> None:
    message = tensor_pb2.Tensor(name="x", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(tensors.TensorCodecError, match=r"tensor 'x': 20 bytes of data.*\[2, 3\] need 24"):
        tensors.decode(message)


def test_negative_dimension_is_refused() -> None:
    message = tensor_pb2.Tensor(name="x", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[-1, 3], data=b"")
    with pytest.raises(tensors.TensorCodecError, match="negative dimension"):
        tensors.decode(message)


@pytest.mark.parametrize("code", [tensor_pb2.DATA_TYPE_UNSPECIFIED, tensor_pb2.DATA_TYPE_BFLOAT16, 99])
def test_unsupported_wire_dtype_is_refused(code: int) -> None:
    message = tensor_pb2.Tensor(name="x", dtype=code, shape=[1], data=b"\0\0")
    with pytest.raises(tensors.TensorCodecError, match=r"tensor 'x': dtype .* is not supported"):
        tensors.decode(message)


@pytest.mark.parametrize("array", [np.array(["a"]), np.array([1 + 2j]), np.array([object()])])
def test_unsupported_numpy_dtype_cannot_be_encoded(array: np.ndarray) -> None:
    with pytest.raises(tensors.TensorCodecError, match=r"tensor 'x': dtype .* cannot be sent"):
        tensors.encode("x", array)


def test_decode_many_refuses_duplicates_and_empty_names() -> None:
    message = tensor_pb2.Tensor(name="x", dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[1], data=b"\1")
    with pytest.raises(tensors.TensorCodecError, match="more than once"):
        tensors.decode_many([message, message])
    with pytest.raises(tensors.TensorCodecError, match="no name"):
        tensors.decode_many([tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UINT8, shape=[1], data=b"\1")])
