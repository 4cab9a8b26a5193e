"""What a model takes and gives: tensor specs read from ONNX Runtime, and request validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from ortmux.worker.errors import InvalidArgument

_NUMPY_NAME_BY_ORT_TYPE = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output: numpy dtype name, shape with -1 for dynamic dims, dim names."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim_names: tuple[str, ...]

    @classmethod
    def from_ort(cls, node_arg: object) -> TensorSpec:
        """From an onnxruntime NodeArg (``session.get_inputs()`` items)."""
        name: str = node_arg.name  # type: ignore[attr-defined]
        ort_type: str = node_arg.type  # type: ignore[attr-defined]
        dtype = _NUMPY_NAME_BY_ORT_TYPE.get(ort_type)
        if dtype is None:
            raise InvalidArgument(f"model tensor '{name}' has type {ort_type}, which cannot be served")
        dims = node_arg.shape or []  # type: ignore[attr-defined]
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in dims)
        dim_names = tuple(dim if isinstance(dim, str) else "" for dim in dims)
        return cls(name, dtype, shape, dim_names)

    @classmethod
    def from_onnx(cls, value: onnx.ValueInfoProto) -> TensorSpec:
        """From a graph input or output as the file declares it."""
        tensor = value.type.tensor_type
        dtype = (
            np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name if tensor.elem_type else ""
        )
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else -1 for dim in dims)
        return cls(value.name, dtype, shape, tuple(dim if isinstance(dim, str) else "" for dim in dims))

    def describe(self) -> str:
        dims = [
            (name or "?") if size < 0 else str(size)
            for size, name in zip(self.shape, self.dim_names, strict=True)
        ]
        return f"{self.dtype}[{', '.join(dims)}]"


def leading_rows(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows in a request: the leading dimension of its (first) input; 1 for a scalar."""
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def validate_inputs(model: str, specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> None:
    """Raise InvalidArgument naming the first input whose name, dtype or shape the model refuses.

    Symbolic dimensions with the same name (``batch``) must have one size across all inputs.
    """
    by_name = {spec.name: spec for spec in specs}
    expected = ", ".join(f"{spec.name}: {spec.describe()}" for spec in specs)
    for name in inputs:
        if name not in by_name:
            raise InvalidArgument(
                f"model '{model}' has no input '{name}'; it takes {expected}", field=f"inputs[{name}]"
            )
    for spec in specs:
        if spec.name not in inputs:
            raise InvalidArgument(
                f"input '{spec.name}' is missing; model '{model}' takes {expected}",
                field=f"inputs[{spec.name}]",
            )
    symbolic: dict[str, tuple[int, str]] = {}
    for spec in specs:
        array = inputs[spec.name]
        field = f"inputs[{spec.name}]"
        if array.dtype.name != spec.dtype:
            raise InvalidArgument(
                f"input '{spec.name}' has dtype {array.dtype.name}, model '{model}' expects {spec.dtype}",
                field=field,
            )
        if array.ndim != len(spec.shape):
            raise InvalidArgument(
                f"input '{spec.name}' has shape {list(array.shape)} ({array.ndim} dims), "
                f"model '{model}' expects {spec.describe()} ({len(spec.shape)} dims)",
                field=field,
            )
        for axis, (size, want, dim_name) in enumerate(
            zip(array.shape, spec.shape, spec.dim_names, strict=True)
        ):
            if want >= 0 and size != want:
                raise InvalidArgument(
                    f"input '{spec.name}' has size {size} in dimension {axis}, "
                    f"model '{model}' expects {spec.describe()}",
                    field=field,
                )
            if dim_name:
                seen = symbolic.setdefault(dim_name, (size, spec.name))
                if seen[0] != size:
                    raise InvalidArgument(
                        f"input '{spec.name}' has {dim_name}={size} in dimension {axis}, "
                        f"but input '{seen[1]}' has {dim_name}={seen[0]}",
                        field=field,
                    )


def validate_output_names(model: str, specs: Sequence[TensorSpec], requested: Sequence[str]) -> list[str]:
    """The output names to compute: all of them when none are requested."""
    known = [spec.name for spec in specs]
    if not requested:
        return known
    for name in requested:
        if name not in known:
            raise InvalidArgument(
                f"model '{model}' has no output '{name}'; it gives {', '.join(known)}", field="output_names"
            )
    if len(set(requested)) != len(requested):
        raise InvalidArgument("output_names repeats a name", field="output_names")
    return list(requested)
