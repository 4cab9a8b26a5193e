"""What the Open Inference Protocol tests share: API keys, and test models of every datatype and
one that fails at run time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortmux.worker.api import oip_convert

IDS = np.arange(16, dtype=np.int64).reshape(2, 8) % 1000
ADMIN_KEY, TENANT_KEY = "oip-admin-key", "oip-tenant-key"
# Every numeric datatype the engine serves, as ONNX element types.
TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}


def types_model(path: Path, types: tuple[str, ...] = tuple(TYPES)) -> Path:
    """One input and one output per datatype, each output its input (Identity), batch first."""
    inputs = [helper.make_tensor_value_info(f"in_{t.lower()}", TYPES[t], ["batch", 3]) for t in types]
    outputs = [helper.make_tensor_value_info(f"out_{t.lower()}", TYPES[t], ["batch", 3]) for t in types]
    nodes = [helper.make_node("Identity", [f"in_{t.lower()}"], [f"out_{t.lower()}"]) for t in types]
    graph = helper.make_graph(nodes, "types", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))
    return path


def faulty_model(path: Path) -> Path:
    """Loads fine, fails at run time for an odd number of elements (Reshape to [2, -1])."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, -1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "faulty", [x], [y], [shape]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def sample(datatype: str, rows: int = 2) -> np.ndarray:
    dtype = oip_convert.DTYPE_BY_DATATYPE[datatype]
    values = np.arange(rows * 3).reshape(rows, 3) % 2 == 1 if datatype == "BOOL" else np.arange(rows * 3) + 1
    return np.asarray(values).reshape(rows, 3).astype(dtype)
